"""The Gradio explorer, API level: runs streamed and cancelled through gradio_client, views
rendered for saved runs, invalid settings and corrupt run dirs reported without a crash.

One app per module (embedded digits DiT, temporary runs dir, tiny calibration), runs shared
between tests in file order: run -> cancel -> views -> errors.
"""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from vq4dit.testbed import DIGITS_DIT_DIR  # noqa: E402

TINY = dict(iterations=1, sampling_steps=3, kmeans_iters=5)


def setup_args(method="vq4dit", bits=2, k=256, d=4, n=2, iterations=1, steps=3, kmeans=5, lr_l=5e-2, lr_c=1e-4,
               lam=1.0, seed=0):
    """Positional inputs of the /run endpoint, in the Set-up panel's order."""
    return (method, bits, k, d, n, iterations, steps, kmeans, lr_l, lr_c, lam, seed)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app import AppConfig, create_app
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("runs")
    demo = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), eval_per_class=1, eval_steps=3,
                                image_steps=3, warm_umap=False, **TINY))
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client, runs
    demo.close()


def val(x):
    """The value of an output (gradio_client passes gr.update(...) dicts through)."""
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def stream(job):
    """All outputs of a streaming job, in order."""
    outs = [o for o in job]
    final = job.outputs()
    return final if len(final) >= len(outs) else outs


def test_model_loads_and_page_serves(app):
    demo, client, runs = app
    eng = demo.engine
    assert eng.n_blocks == eng.teacher.config.num_layers >= 1
    assert eng.is_digits and eng.n_classes == 10
    assert client.predict(api_name="/cancel") == "No run in progress."


def test_run_streams_and_saves(app):
    demo, client, runs = app
    job = client.submit(*setup_args(), api_name="/run")
    outs = stream(job)
    statuses = [o[0] for o in outs]
    assert len(outs) >= 3, statuses                      # first yield, live updates, final
    assert any("step " in s for s in statuses[:-1]), statuses  # live step counter streamed
    assert statuses[-1].startswith("**Saved"), statuses[-1]
    run_ids = [p.name for p in runs.iterdir() if not p.name.startswith(".")]
    assert len(run_ids) == 1
    rd = runs / run_ids[0]
    meta = json.loads((rd / "run.json").read_text())
    assert meta["method"] == "vq4dit" and meta["bits"] == 2 and meta["status"] == "finished"
    assert meta["steps_done"] == meta["total_steps"] == 3
    assert 2.0 < meta["bits_per_weight"] < 2.3  # indices + fp16 codebooks + fp32 biases
    assert meta["block_mse"] > 0 and len(meta["per_block_mse"]) == demo.engine.n_blocks
    assert 0.0 <= meta["metrics"]["accuracy"] <= 1.0 and meta["metrics"]["psnr"] > 0
    assert (rd / "trace" / "steps.csv").is_file() and (rd / "model" / "vq4dit_config.json").is_file()
    from vq4dit.trace import Trace
    tr = Trace.load(rd / "trace")
    assert len(tr.steps) == 3 and tr.meta["stopped"] is None
    # the final yield points the Run dropdown at the new run
    assert run_ids[0] in json.dumps(outs[-1][3])


def test_cancel_mid_run_keeps_partial_trace(app):
    demo, client, runs = app
    before = {p.name for p in runs.iterdir()}
    job = client.submit(*setup_args(iterations=20, steps=3), api_name="/run")  # 60 steps: far longer than we wait
    cancelled_at = None
    for out in job:
        if cancelled_at is None and "step " in str(out[0]):
            cancelled_at = time.time()
            msg = client.predict(api_name="/cancel")
            assert msg.startswith("**Cancelling"), msg
    assert cancelled_at is not None, "never saw a calibration step"
    final = job.outputs()[-1][0]
    assert "cancelled" in final, final
    new = [p for p in runs.iterdir() if p.name not in before and not p.name.startswith(".")]
    assert len(new) == 1
    meta = json.loads((new[0] / "run.json").read_text())
    assert meta["status"] == "cancelled" and meta["stopped"] == "cancelled"
    assert 1 <= meta["steps_done"] < meta["total_steps"] == 60
    from vq4dit.trace import Trace
    tr = Trace.load(new[0] / "trace")
    assert tr.meta["stopped"] == "cancelled" and len(tr.steps) == meta["steps_done"]
    assert (new[0] / "model" / "model.safetensors").is_file()  # the partial model is saved too


def first_run(runs, status="finished"):
    for p in sorted(runs.iterdir()):
        if (p / "run.json").is_file() and json.loads((p / "run.json").read_text()).get("status") == status:
            return p.name
    pytest.skip("no saved run (an earlier test failed)")


def test_load_run_and_views(app):
    demo, client, runs = app
    views = demo.views
    rid = first_run(runs)
    out = client.predict(rid, api_name="/load_run")  # sets this client session's selection
    block, layer, snap = val(out[0]), val(out[1]), val(out[2])
    assert len(out[1]["choices"]) == 7  # q, k, v, out, fc1, fc2, adaLN
    assert block == 0 and layer.startswith("transformer_blocks.0.")
    sel = views.initial_selection(rid)
    assert sel == dict(run=rid, block=0, layer=layer, snap=snap)
    assert len(views.layer_choices(rid, 0)) == 7  # q, k, v, out, fc1, fc2, adaLN
    steps = views.steps_of(rid)
    assert steps[0] == 0 and steps[-1] == 3 and snap == len(steps) - 1
    assert str(out[4]).endswith("-trace.zip") and str(out[5]).endswith("-model.zip")

    # clusters: 512 sampled sub-vectors + 256 codewords (and the k-means codewords as rings)
    sel = dict(sel, layer="transformer_blocks.1.ff.net.0.proj", block=1)
    for color_by in ("codeword", "top ratio", "assignment changed"):
        fig, note = views.cluster(sel, color_by, "PCA")
        codewords = [t for t in fig.data if t.name == "codewords (this step)"]
        assert codewords and len(codewords[0].x) == 256
        assert "512 of" in note.replace(",", "")
    fig, _ = views.cluster(sel, "codeword", "PCA")
    assert len(fig.data[0].x) == 512 and np.isfinite(np.asarray(fig.data[0].x, float)).all()
    fig0, _ = views.cluster(dict(sel, snap=0), "codeword", "PCA")
    assert not any(t.name == "codewords at k-means init" for t in fig0.data)  # step 0 is k-means itself
    # UMAP on request, cached per (run, layer)
    t0 = time.time()
    figu, noteu = views.cluster(sel, "codeword", "UMAP")
    assert "UMAP" in noteu and len(figu.data[0].x) == 512
    t0 = time.time()
    views.cluster(dict(sel, snap=1), "codeword", "UMAP")
    assert time.time() - t0 < 2.0  # cached: scrubbing is a redraw

    # evolution: ratio histogram heatmap over the logged steps + 8 sample trajectories
    efig = views.evolution(sel)
    heat = [t for t in efig.data if t.type == "heatmap"][0]
    assert np.asarray(heat.z).shape[0] == 10 and len(heat.x) >= 4
    assert sum(1 for t in efig.data if t.name and t.name.startswith("sample ")) == 8

    # conflicts: codebook-only side missing -> said so, button offered
    note, missing, kfig, wfig = views.conflicts(sel)
    assert missing == "codebook-only" and "No saved codebook-only run" in note
    assert any(t.type == "heatmap" for t in kfig.data)
    assert any("sum" in (t.name or "") for t in wfig.data)  # worst codeword's arrows

    # per-block changes: blocks x (q,k,v,out,fc1,fc2,adaLN), values in %
    heatfig, table, msefig = views.changes(sel)
    assert table.shape == (demo.engine.n_blocks, 8)
    vals = table.drop(columns="block").to_numpy(float)
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 100).all()
    assert len(msefig.data[0].x) == demo.engine.n_blocks

    # calibration curves: one line per block + mean, L_r, frozen %
    cfig = views.calibration(rid)
    assert sum(1 for t in cfig.data if (t.name or "").startswith("block ")) == demo.engine.n_blocks

    # images: FP + this run + the cancelled run as baseline? (same method: excluded) -> 2 model rows
    img, metrics, note = views.images(rid, "0,1,7", 0, 4.0, 3)
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > 3 * 64
    assert list(metrics["model"])[0].startswith("FP") and len(metrics) == 2
    assert metrics["PSNR vs FP (dB)"].iloc[1] > 0 and 0 <= metrics["accuracy"].iloc[1] <= 1
    t0 = time.time()
    views.images(rid, "0,1,7", 0, 4.0, 3)
    assert time.time() - t0 < 1.0  # cached by (model, labels, seed, cfg, steps)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        views.images(rid, "0,12", 0, 4.0, 3)

    # the whole layer-view render path through the UI handler (gradio_client)
    res = client.predict("top ratio", "PCA", api_name="/render_layer_views")
    assert rid in res[0] and "block 0" in res[0]
    assert len(res[-2]["data"]) == demo.engine.n_blocks  # the per-block table


def test_run_missing_side_for_conflicts(app):
    demo, client, runs = app
    rid = first_run(runs)
    sel = demo.views.initial_selection(rid)
    client.predict(rid, api_name="/load_run")  # the session's selection = the vq4dit run
    job = client.submit(*setup_args(), api_name="/run_missing")
    outs = stream(job)
    assert outs[-1][0].startswith("**Saved") and "codebook-only" in outs[-1][0]
    note, missing, kfig, _ = demo.views.conflicts(sel)
    assert missing is None and "codebook-only" in note
    heat_titles = [a.text for a in kfig.layout.annotations]
    assert any(t.startswith("vq4dit") for t in heat_titles) and any(t.startswith("codebook-only") for t in heat_titles)
    share = [t for t in kfig.data if t.type == "scatter" and t.name in ("vq4dit", "codebook-only")]
    assert {t.name for t in share} == {"vq4dit", "codebook-only"}
    # images now include the codebook-only baseline at the same bits
    _, metrics, _ = demo.views.images(rid, "3", 0, 4.0, 3)
    assert len(metrics) == 3 and "codebook-only W2" in list(metrics["model"])
    # runs table + rate-distortion
    table, choices, rd = client.predict(api_name="/list_runs")
    assert len(table["data"]) == 3
    from app.plots import rd_figure
    fig = rd_figure(demo.engine.store.table())
    assert {t.name for t in fig.data if t.showlegend is not False} >= {"vq4dit", "codebook-only"}


def test_invalid_settings_are_clear_errors(app):
    demo, client, runs = app
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="power of two"):
        client.predict(*setup_args(k=100), api_name="/run")
    with pytest.raises(AppError, match="candidates|n_candidates"):
        client.predict(*setup_args(n=0), api_name="/run")
    with pytest.raises(AppError, match="iterations"):
        client.predict(*setup_args(iterations=0), api_name="/run")
    with pytest.raises(AppError, match="lr_logits"):
        client.predict(*setup_args(lr_l=-1), api_name="/run")
    # d=3 does not divide the layer widths: found by the library when quantizing -> reported, not a trace
    with pytest.raises(AppError, match="divisible by d=3"):
        client.predict(*setup_args(d=3), api_name="/run")
    # the app still serves runs after the errors
    assert client.predict(api_name="/cancel") == "No run in progress."


def test_corrupt_run_dirs_are_reported(app):
    demo, client, runs = app
    from gradio_client.exceptions import AppError
    rid = first_run(runs)
    bad_json = runs / "99990101-000000-broken-json"
    bad_json.mkdir()
    (bad_json / "run.json").write_text("{not json")
    bad_trace = runs / "99990101-000001-vq4dit-w2"
    shutil.copytree(runs / rid, bad_trace)
    (bad_trace / "trace" / "meta.json").write_text("{truncated")
    table = demo.engine.store.table()
    row = table[table["run"] == bad_json.name].iloc[0]
    assert row["status"].startswith("unreadable") and "run.json" in row["status"]
    with pytest.raises(AppError, match="corrupt|unreadable"):
        client.predict(bad_trace.name, api_name="/load_run")
    table = demo.engine.store.table()
    assert table[table["run"] == bad_trace.name].iloc[0]["status"].startswith("unreadable")
    assert bad_trace.name not in demo.engine.store.readable_ids()
    # still responsive: a good run loads, the list renders
    out = client.predict(rid, api_name="/load_run")
    assert val(out[0]) == 0 and val(out[1]).startswith("transformer_blocks.0.")
    listed = client.predict(api_name="/list_runs")
    assert len(listed[0]["data"]) == len([p for p in runs.iterdir() if not p.name.startswith(".")])


def test_runs_survive_restart_and_download(app):
    demo, client, runs = app
    from app.runs import RunStore
    store = RunStore(runs)  # a fresh process would see the same list
    ids = store.readable_ids()
    assert len(ids) >= 3
    import zipfile
    z = store.export_zip(ids[0], "trace")
    names = zipfile.ZipFile(z).namelist()
    assert any(n.endswith("steps.csv") for n in names) and any(n.endswith("layers.csv") for n in names)
    zm = store.export_zip(ids[0], "model")
    assert any(n.endswith("model.safetensors") for n in zipfile.ZipFile(zm).namelist())
    # the packed model reloads with the library and samples
    from vq4dit.io import load_dit
    b = load_dit(runs / ids[0] / "model")
    assert b.quantized_meta["format"] == "vq4dit-packed"


def test_bad_model_dir_exits_with_one_line(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "app.py"), "--model", str(tmp_path), "--no-umap-warmup"],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "not a DiT model directory" in lines[0]


def test_app_reads_runs_only_through_trace_api():
    """No storage keys, no meta layout, no hard-coded method lists in the app (issue 8)."""
    import re
    src = {p.name: p.read_text() for p in (Path(__file__).resolve().parent.parent / "app").glob("*.py")}
    for name, text in src.items():
        for pat in (r'\|codebook', r'\|sample_fp', r'\|worst_grads', r'\.snapshots\[', r'\bmeta\[\s*"layers"',
                    r'ratio_hist_', r'coherence_hist_', r'CALIBRATED', r'_fix_hard_ratios',
                    r'(?<!kind == )"(vq4dit|vq4dit-ref|vq4dit-ste|codebook-only|kmeans|rtn|rtn-tensor)"'):
            assert not re.search(pat, text), f"app/{name} matches {pat!r}"


def test_method_dropdown_default_and_descriptions(app):
    demo, client, runs = app
    from vq4dit.config import DEFAULT_METHOD, METHODS
    ui = demo.ui
    assert ui.setup.method.value == DEFAULT_METHOD
    assert [c[1] for c in ui.setup.method.choices] == list(METHODS)
    assert METHODS[DEFAULT_METHOD].description in ui.method_md.value
    for name, spec in METHODS.items():
        assert spec.description in client.predict(name, api_name="/describe_method")


def test_trace_logs_hard_ratios_as_kept_or_moved():
    """Once a layer is hard the recorder logs ratio_nearest = 1 (kept the k-means codeword) or 0
    (moved), so the app needs no rewrite of those rows."""
    from conftest import make_tiny_dit
    from vq4dit import method_config, quantize
    tr = quantize(make_tiny_dit(), method_config("vq4dit", bits=3, kmeans_iters=5, calib=dict(
        iterations=2, num_sampling_steps=5, lr_logits=0.5, force_hard_at=0.5, trace_every=1)), progress=False)
    hard, total, moved = tr.hard_steps(), 0, 0
    assert hard and all(s <= 5 for s in hard.values())
    for layer in tr.layer_names:
        p = tr.ratio_paths(layer)
        first = p[p["step"] == p["step"].min()].set_index("sample")["codeword"]
        h = p[p["step"] >= hard.get(layer, tr.steps_done)]
        kept = (h["codeword"].to_numpy() == first.reindex(h["sample"]).to_numpy()).astype(float)
        np.testing.assert_array_equal(h["ratio_nearest"].to_numpy(), kept)
        total, moved = total + len(h), moved + int((kept == 0).sum())
    assert total > 100 and moved >= 1  # some sampled sub-vectors really switched codeword
