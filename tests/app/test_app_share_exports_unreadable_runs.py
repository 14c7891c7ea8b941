"""The explorer against hostile or unlucky input: no public link without a login, exports created fresh and private, unreadable
runs isolated (huge, truncated, nested, non-numeric), app flags checked at start."""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from vq4dit.testbed import DIGITS_DIT_DIR  # noqa: E402

TINY = dict(iterations=1, sampling_steps=3, kmeans_iters=5)
RTN = ("rtn", 2, 256, 4, 2, 1, 3, 5, 5e-2, 1e-4, 1.0, 0)  # the Set-up panel's inputs for a quick RTN run


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A running app with one saved RTN run."""
    from app import AppConfig, create_app
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("safety-21")
    runs = base / "runs"
    demo = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), demo_runs=False, eval_per_class=1,
                                eval_steps=3, image_steps=3, warm_umap=False, **TINY))
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    assert client.predict(*RTN, api_name="/run")[0].startswith("**Saved")
    yield demo, client, runs, base
    demo.close()


def app_main():
    spec = importlib.util.spec_from_file_location("app_main_for_tests_21", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_errors(*argv, env=None):
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r


# -- item 1: the app decides sharing itself ----------------------------------------------------

def test_gradio_share_env_never_opens_a_public_link(monkeypatch, tmp_path, capsys):
    """GRADIO_SHARE=True in the environment: launch() gets share=False, Gradio keeps it off, the banner says so."""
    import gradio as gr
    m = app_main()
    monkeypatch.setenv("GRADIO_SHARE", "True")
    seen = {}
    real_launch = gr.Blocks.launch

    def launch(self, **kw):
        seen.update(kw)
        real_launch(self, **kw, prevent_thread_lock=True, quiet=True)
        seen["demo_share"] = self.share
        self.close()
    monkeypatch.setattr(gr.Blocks, "launch", launch)
    port = free_port()
    assert m.main(["--port", str(port), "--runs-dir", str(tmp_path / "runs"), "--no-umap-warmup",
                   "--no-demo-runs"]) == 0
    err = capsys.readouterr().err
    assert seen["share"] is False and seen["demo_share"] is False
    assert "(loopback only)" in err and "GRADIO_SHARE='True' is ignored" in err


def test_share_flag_needs_credentials_and_banner_says_public():
    m = app_main()
    a = lambda *argv: m.parse_args(list(argv))  # noqa: E731
    s = m.resolve_server(a(), env={"GRADIO_SHARE": "true"})
    assert s.share is False and "loopback only" in s.banner() and "ignored" in s.banner()
    for argv in ((), ("--no-auth",), ("--host", "0.0.0.0", "--no-auth")):
        with pytest.raises(ValueError, match="--share.*needs --auth"):
            m.resolve_server(a("--share", *argv), env={})
    s = m.resolve_server(a("--share"), env={"VQ4DIT_AUTH": "ann:pw"})
    assert s.share is True and s.auth == ("ann", "pw")
    assert "PUBLIC" in s.banner() and "loopback" not in s.banner() and "login required" in s.banner()
    r = start_errors("--share")
    assert r.returncode == 2 and "--share opens a public link" in r.stderr


# -- item 2: exports are created fresh in a private directory -------------------------------------

def test_exports_are_private_fresh_and_never_follow_planted_files(app, tmp_path):
    demo, client, runs, base = app
    store = demo.engine.store
    rid = store.readable_ids()[0]
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    # another local user plants files where the old code looked: the shared, fixed folder
    shared = Path(tempfile.gettempdir()) / "vq4dit-app-exports"
    shared.mkdir(exist_ok=True)
    for what in ("model", "trace"):
        planted = shared / f"{rid}-{what}.zip"
        planted.unlink(missing_ok=True)
        planted.symlink_to(secret)
    d = store.export_dir()
    assert d != shared and d.parent == Path(tempfile.gettempdir())
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o700
    out = client.predict(rid, api_name="/load_run")
    zpath = out[-1]
    names = set(zipfile.ZipFile(zpath).namelist())
    assert f"{rid}/model/model.safetensors" in names
    z1 = store.export_zip(rid, "model")
    # a file planted inside the private dir under the cached zip's name is not served
    os.unlink(z1)
    os.symlink(secret, z1)
    z2 = store.export_zip(rid, "model")
    assert z2 != z1 and not os.path.islink(z2) and Path(z2).name == f"{rid}-model.zip"
    assert b"private key" not in Path(z2).read_bytes()
    assert zipfile.ZipFile(z2).read(f"{rid}/model/vq4dit_config.json")
    for what in ("model", "trace"):
        (shared / f"{rid}-{what}.zip").unlink()


def test_export_sources_are_never_links(app, tmp_path):
    demo, client, runs, base = app
    store = demo.engine.store
    rid = store.readable_ids()[0]
    cfg = runs / rid / "model" / "vq4dit_config.json"
    keep = cfg.read_bytes()
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    cfg.unlink()
    cfg.symlink_to(secret)
    try:
        for f in store.export_dir().rglob("*.zip"):
            f.unlink()
        names = zipfile.ZipFile(store.export_zip(rid, "model")).namelist()
        assert f"{rid}/model/vq4dit_config.json" not in names and f"{rid}/model/model.safetensors" in names
    finally:
        cfg.unlink()
        cfg.write_bytes(keep)


# -- items 7, 9, 11: one bad run is marked unreadable, the app always starts -----------------------

def _copy_run(runs: Path, rid: str, name: str, **patch) -> Path:
    d = runs / name
    shutil.copytree(runs / rid, d)
    meta = json.loads((d / "run.json").read_text())
    (d / "run.json").write_text(json.dumps({**meta, **patch}))
    return d


def _calibrated_run(runs: Path, name: str) -> Path:
    """A calibrated run (with a trace) in the runs dir: a copy of a shipped demo run under a normal id."""
    d = runs / name
    shutil.copytree(ROOT / "assets" / "demo_runs" / "demo-vq4dit-ste-W2", d)
    return d


def test_bad_runs_never_stop_start_up_and_are_marked(app):
    from app import AppConfig, create_app
    demo, client, runs, base = app
    rid = demo.engine.store.readable_ids()[0]
    made = {
        "huge-blocks": _copy_run(runs, rid, "29990101-000001-huge-blocks", n_blocks=10 ** 9),
        "soon": _copy_run(runs, rid, "29990101-000002-soon", quantize_seconds="soon"),
        "nan-seconds": _copy_run(runs, rid, "29990101-000003-nan-seconds", seconds=float("nan")),
    }
    nested = _copy_run(runs, rid, "29990101-000004-nested")
    (nested / "run.json").write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    made["nested"] = nested
    trunc = _calibrated_run(runs, "29990101-000005-truncated")   # the newest run
    snap = trunc / "trace" / "snapshots.safetensors"
    snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    made["truncated"] = trunc
    linked = _calibrated_run(runs, "29990101-000006-linked-trace")
    shutil.rmtree(linked / "trace")
    (linked / "trace").symlink_to(trunc / "trace")
    made["linked"] = linked
    try:
        demo2 = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), demo_runs=False,
                                     warm_umap=False, **TINY))                  # starts
        table = demo2.engine.store.table()
        status = dict(zip(table["run"], table["status"]))
        for key in ("huge-blocks", "soon", "nan-seconds", "nested", "linked"):
            assert str(status[made[key].name]).startswith("unreadable"), (key, status[made[key].name])
        with pytest.raises(Exception, match="unreadable"):
            client.predict(made["truncated"].name, api_name="/load_run")
        assert str(dict(zip(*[demo.engine.store.table()[c] for c in ("run", "status")]))[
            made["truncated"].name]).startswith("unreadable")
        from app.handlers import SetupForm, estimate_text
        assert estimate_text(demo2.engine, SetupForm(*RTN)).startswith("**Estimate before running:**")
        assert client.predict(rid, api_name="/load_run")                         # a good run still loads
    finally:
        for d in made.values():
            shutil.rmtree(d) if not d.is_symlink() else d.unlink()


def test_stale_save_temps_are_removed_at_start(app):
    from app import RunStore
    demo, client, runs, base = app
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = runs / f".20990101-000000-rtn-w2-tmp{dead.pid}-abcd"
    (stale / "model").mkdir(parents=True)
    live = runs / f".20990101-000000-rtn-w2-tmp{os.getpid()}-efgh"
    live.mkdir()
    old = runs / ".20990101-000001-rtn-w2-xyz"                                 # pid-less, from older versions
    old.mkdir()
    os.utime(old, (1, 1))
    store = RunStore(runs)
    assert not stale.exists() and not old.exists() and live.exists()
    assert sorted(store.cleaned) == sorted([stale.name, old.name])
    live.rmdir()


def test_app_numeric_flags_are_checked_at_start():
    for flag, value in (("--eval-steps", "0"), ("--eval-per-class", "-3"), ("--image-steps", "nan"),
                        ("--iterations", "10000000"), ("--threads", "0")):
        r = start_errors(flag, value)
        assert r.returncode == 2 and f"argument {flag}" in r.stderr, r.stderr[-1000:]


def test_port_check_reuses_a_time_wait_port():
    import socket
    m = app_main()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()                 # the server side closes first: its end of the connection sits in TIME_WAIT
    c.close()
    srv.close()
    m.check_port_free("127.0.0.1", port)   # a crashed app's port is free for the restarted one
