"""Issue 11, the explorer through gradio_client: run ids confined to the runs dir, exports of app files
only, bad run.json files isolated, bounded inputs, deleted runs dir, analytics off, host/port/auth."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from vq4dit.testbed import DIGITS_DIT_DIR  # noqa: E402

TINY = dict(iterations=1, sampling_steps=3, kmeans_iters=5)


def setup_args(method="rtn", bits=2, k=256, d=4, n=2, iterations=1, steps=3, kmeans=5, lr_l=5e-2, lr_c=1e-4,
               lam=1.0, seed=0):
    return (method, bits, k, d, n, iterations, steps, kmeans, lr_l, lr_c, lam, seed)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app import AppConfig, create_app
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("safety-app")
    runs = base / "runs"
    demo = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), demo_runs=False, eval_per_class=1, eval_steps=3,
                                image_steps=3, warm_umap=False, **TINY))
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client, runs, base
    demo.close()


def good_run(demo) -> str:
    ids = demo.engine.store.readable_ids()
    assert ids, "test_deleted_runs_dir_is_recreated makes the first run"
    return ids[0]


def app_main():
    spec = importlib.util.spec_from_file_location("app_main_for_tests", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- item 7 (runs first: it makes the run the other tests use) --------------------------------

def test_deleted_runs_dir_is_recreated(app):
    demo, client, runs, _ = app
    shutil.rmtree(runs)                                   # deleted while the app runs
    outs = list(client.submit(*setup_args(), api_name="/run"))
    final = client.predict(*setup_args(), api_name="/run")  # a second run too: the dir stays usable
    assert outs[-1][0].startswith("**Saved") and final[0].startswith("**Saved"), (outs[-1][0], final[0])
    ids = demo.engine.store.readable_ids()
    assert len(ids) == 2
    meta = json.loads((runs / ids[0] / "run.json").read_text())
    assert meta["method"] == "rtn" and (runs / ids[0] / "model" / "model.safetensors").is_file()


# -- item 1 ----------------------------------------------------------------------------------

def test_run_ids_are_confined_to_the_runs_dir(app):
    demo, client, runs, base = app
    rid = good_run(demo)
    outside = base / "outside"                           # a directory that looks like a run, elsewhere
    shutil.copytree(runs / rid, outside)
    exports = demo.engine.store.export_dir()
    before = set(os.listdir(exports))
    texts = []
    for bad in (str(outside), os.path.relpath(outside, runs), "../outside", "/etc/passwd", "/no/such/dir",
                "..", ".", rid + "/model", "a" * 300):
        with pytest.raises(AppError) as e:
            client.predict(bad, api_name="/load_run")
        texts.append(str(e.value))
        assert "invalid run id" in str(e.value), str(e.value)
    # existing and missing paths get the same answer: nothing about the disk leaks
    assert texts[3].replace("/etc/passwd", "X") == texts[4].replace("/no/such/dir", "X")
    assert not any(w in t for t in texts for w in ("No such file", "not found", "Permission"))
    os.symlink(outside, runs / "linked-run")              # a link inside the runs dir pointing out
    with pytest.raises(AppError, match="invalid run id"):
        client.predict("linked-run", api_name="/load_run")
    assert set(os.listdir(exports)) == before              # no export was written for any of them
    store = demo.engine.store
    for call in (store.meta, store.trace, store.model, lambda r: store.export_zip(r, "model")):
        with pytest.raises(ValueError, match="invalid run id"):
            call(str(outside))
    table = store.table()
    assert table[table["run"] == "linked-run"].iloc[0]["status"].startswith("unreadable")
    (runs / "linked-run").unlink()


def test_exports_contain_only_files_the_app_wrote(app):
    demo, client, runs, base = app
    rid = good_run(demo)
    store = demo.engine.store
    (runs / rid / "model" / "secret.txt").write_text("not the app's")
    os.symlink("/etc/hostname", runs / rid / "model" / "link.txt")
    for f in store.export_dir().rglob(f"{rid}-*.zip"):
        f.unlink()
    out = client.predict(rid, api_name="/load_run")
    zpath = out[-1]
    names = set(zipfile.ZipFile(zpath).namelist())
    assert names == {f"{rid}/model/vq4dit_config.json", f"{rid}/model/model.safetensors",
                     f"{rid}/model/scheduler/scheduler_config.json"}
    assert store.export_dir() in Path(store.export_zip(rid, "model")).parents  # the private export dir
    with pytest.raises(ValueError, match="unknown export"):
        store.export_zip(rid, "../../etc")


# -- item 12 ---------------------------------------------------------------------------------

def test_bad_run_json_is_isolated(app):
    demo, client, runs, base = app
    from app import AppConfig, create_app
    rid = good_run(demo)
    bad = {}
    for name, patch in (("oops-metrics", {"metrics": "oops"}), ("abc-bits", {"bits": "abc"}),
                        ("weird-method", {"method": ["x"]}), ("list-json", None)):
        d = runs / f"20000101-000000-{name}"
        shutil.copytree(runs / rid, d)
        meta = json.loads((d / "run.json").read_text())
        (d / "run.json").write_text(json.dumps([1, 2] if patch is None else {**meta, **patch}))
        bad[name] = d.name
    table, choices, _ = client.predict(api_name="/list_runs")
    status = {row[0]: row[-1] for row in table["data"]}
    for name in bad.values():
        assert str(status[name]).startswith("unreadable"), (name, status[name])
    assert rid in [c[1] if isinstance(c, (list, tuple)) else c for c in choices["choices"]]
    img, metrics, note = client.predict(rid, "3", 0, 4.0, 2, api_name="/images")  # Images view still works
    assert len(metrics["data"]) >= 2
    with pytest.raises(AppError, match="unreadable"):
        client.predict(bad["abc-bits"], api_name="/load_run")
    # a new app on the same runs dir starts
    demo2 = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), demo_runs=False, warm_umap=False, **TINY))
    assert set(bad.values()) <= set(demo2.engine.store.table()["run"])
    for d in bad.values():
        shutil.rmtree(runs / d)


# -- item 13 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [(dict(iterations=10 ** 12), "iterations must be in"),
                                    (dict(steps=10 ** 9), "sampling steps must be in"),
                                    (dict(kmeans=10 ** 9), "k-means iterations must be in"),
                                    (dict(seed=-1), "seed must be in"),
                                    (dict(n=1000), "candidates n must be in"),
                                    (dict(method="vq4dit", iterations=5000, steps=1000), "over the app's limit")])
def test_app_run_inputs_are_capped_before_work(app, kw, msg):
    demo, client, runs, _ = app
    n_runs = len(list(runs.iterdir()))
    with pytest.raises(AppError, match=msg):
        client.predict(*setup_args(**kw), api_name="/run")
    assert len(list(runs.iterdir())) == n_runs and not demo.engine.busy()


@pytest.mark.parametrize("labels,seed,guidance,steps,msg", [
    ("0-30000000", 0, 4.0, 2, "at most 32 images"), ("0-9," * 5, 0, 4.0, 2, "at most 32 images"),
    ("1" * 2000, 0, 4.0, 2, "too long"), ("3", 0, 4.0, 10 ** 6, "sampler steps must be in"),
    ("3", -5, 4.0, 2, "image seed must be in"), ("3", 0, 4.0, 0, "sampler steps must be in"),
])
def test_app_image_inputs_are_capped_before_work(app, labels, seed, guidance, steps, msg):
    demo, client, runs, _ = app
    with pytest.raises(AppError, match=msg):
        client.predict(None, labels, seed, guidance, steps, api_name="/images")


def test_run_settings_reject_non_finite_numbers():
    from app.config import RunRequest, image_params
    for calib, msg in ((dict(iterations=float("inf")), "iterations"), (dict(lr_logits=float("nan")), "lr_logits"),
                       (dict(lambda_r=float("inf")), "lambda_r")):
        with pytest.raises(ValueError, match=msg):
            RunRequest(method="vq4dit", calib=dict(dict(iterations=1, num_sampling_steps=1), **calib)).config()
    for args in ((0, float("nan"), 2), (0, float("inf"), 2), (0, 4.0, float("inf")), (float("nan"), 4.0, 2)):
        with pytest.raises(ValueError):
            image_params(*args)
    assert image_params(3, 4, 25) == (3, 4.0, 25)


# -- item 3 ----------------------------------------------------------------------------------

def test_gradio_analytics_off_by_default(app):
    demo, *_ = app
    if os.environ.get("GRADIO_ANALYTICS_ENABLED") not in (None, "False"):
        pytest.skip("analytics explicitly configured in this environment")
    assert demo.analytics_enabled is False
    r = subprocess.run([sys.executable, "-c", "import os, app; print(os.environ['GRADIO_ANALYTICS_ENABLED'])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"})
    assert r.stdout.strip() == "False", r.stderr[-2000:]


# -- item 15 + GRADIO_SERVER_NAME / GRADIO_SERVER_PORT -----------------------------------------

def test_bind_address_port_and_auth_resolution():
    m = app_main()
    a = lambda *argv: m.parse_args(list(argv))  # noqa: E731
    s = m.resolve_server(a(), env={})
    assert (s.host, s.port, s.auth, s.exposed) == ("127.0.0.1", 7860, None, False)
    s = m.resolve_server(a(), env={"GRADIO_SERVER_NAME": "localhost", "GRADIO_SERVER_PORT": "8001"})
    assert (s.host, s.port, s.exposed) == ("localhost", 8001, False)
    s = m.resolve_server(a(), env={"VQ4DIT_HOST": "::1", "GRADIO_SERVER_NAME": "0.0.0.0", "VQ4DIT_PORT": "9000",
                                   "GRADIO_SERVER_PORT": "8001"})
    assert (s.host, s.port, s.exposed) == ("::1", 9000, False)
    s = m.resolve_server(a("--host", "127.0.0.1", "--port", "7000"),
                         env={"VQ4DIT_HOST": "0.0.0.0", "VQ4DIT_PORT": "9000"})
    assert (s.host, s.port, s.exposed) == ("127.0.0.1", 7000, False)
    for env in ({"VQ4DIT_HOST": "0.0.0.0"}, {"GRADIO_SERVER_NAME": "0.0.0.0"}, {"GRADIO_SERVER_NAME": "192.168.1.5"}):
        with pytest.raises(ValueError, match="reachable from the network.*--auth.*--no-auth"):
            m.resolve_server(a(), env=env)
    with pytest.raises(ValueError, match="reachable from the network"):
        m.resolve_server(a("--host", "0.0.0.0"), env={})
    s = m.resolve_server(a("--host", "0.0.0.0"), env={"VQ4DIT_AUTH": "ann:pw:with:colons"})
    assert s.exposed and s.auth == ("ann", "pw:with:colons") and "login required" in s.banner()
    s = m.resolve_server(a("--host", "0.0.0.0", "--auth", "bob:x"), env={"VQ4DIT_AUTH": "ann:pw"})
    assert s.auth == ("bob", "x")
    s = m.resolve_server(a("--host", "0.0.0.0", "--no-auth"), env={})
    assert s.exposed and s.auth is None and s.banner().startswith("WARNING") and "WITHOUT credentials" in s.banner()
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            m.resolve_server(a("--auth", bad), env={})
    for env, msg in (({"VQ4DIT_PORT": "abc"}, "VQ4DIT_PORT='abc'"), ({"GRADIO_SERVER_PORT": "70000"}, "GRADIO_SERVER_PORT"),
                     ({"VQ4DIT_PORT": "-1"}, "VQ4DIT_PORT")):
        with pytest.raises(ValueError, match=msg):
            m.resolve_server(a(), env=env)


def _wait_for_port(port: int, proc, deadline_s: float = 300):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("app did not start")


def test_exposed_app_requires_login(tmp_path):
    """GRADIO_SERVER_NAME=0.0.0.0 + GRADIO_SERVER_PORT are honoured; credentials are then required."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port), VQ4DIT_AUTH="ann:s3cret",
               OMP_NUM_THREADS="1", VQ4DIT_CACHE="off")
    env.pop("VQ4DIT_HOST", None), env.pop("VQ4DIT_PORT", None)
    p = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--runs-dir", str(tmp_path / "runs"),
                          "--no-umap-warmup"], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        _wait_for_port(port, p)
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/cancel")
        c = Client(f"http://127.0.0.1:{port}/", auth=("ann", "s3cret"), verbose=False)
        assert c.predict(api_name="/cancel") == "No run in progress."
    finally:
        p.terminate()
        _, err = p.communicate(timeout=60)
    assert f"on http://0.0.0.0:{port}: reachable from the network; login required (user 'ann')" in err


# -- item 14 (app) ---------------------------------------------------------------------------

def test_app_start_errors_are_one_line():
    def run(*argv, env=None):
        r = subprocess.run([sys.executable, str(ROOT / "app.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, **(env or {})))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, r.stderr
        return lines[0]

    assert "VQ4DIT_PORT='abc' is not a port number" in run(env={"VQ4DIT_PORT": "abc"})
    assert "unknown device 'banana'" in run("--device", "banana")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in run("--device", "cuda")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        line = run("--port", str(busy.getsockname()[1]), "--host", "127.0.0.1")
        assert "cannot listen on 127.0.0.1" in line and "port busy" in line
    finally:
        busy.close()
