"""The Gradio explorer, API level: runs streamed and cancelled through gradio_client, views
rendered for saved runs, invalid settings and corrupt run dirs reported without a crash.

One app per module (embedded digits DiT, temporary runs dir, tiny calibration), runs shared
between tests in file order: run -> cancel -> views -> errors.
"""
import json
import shutil
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, free_port

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
    demo = create_app(AppConfig(model=str(DIGITS_DIT_DIR), runs_dir=str(runs), demo_runs=False, eval_per_class=1, eval_steps=3,
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
    # the embedded model's recipe, as the CLI builds it (Engine._work runs the config build_config made)
    assert meta["config"]["calib"]["recipe"] == "small" and meta["config"]["kmeans_points_per_codeword"] is None
    assert meta["config"]["calib"]["teacher_sampler"] == "ddim"
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


def test_compact_copy_of_a_run_keeps_its_config_and_loads(app, tmp_path):
    """`python -m app.demo build` ships compact copies of finished runs (trace subsampled, FP parts
    shared with the base model): the copy loads, predicts like the run, and keeps its method config."""
    from app.demo import compact_run
    from vq4dit.io import load_dit
    demo, client, runs = app
    eng = demo.engine
    rid = first_run(runs)
    dst = compact_run(eng.store, rid, tmp_path, "demo-test-copy", eng.teacher, 64, 10)
    src_cfg = json.loads((runs / rid / "model" / "vq4dit_config.json").read_text())
    dst_cfg = json.loads((dst / "model" / "vq4dit_config.json").read_text())
    assert dst_cfg["config"] == src_cfg["config"] and dst_cfg["config"]["calib"]
    assert dst_cfg["extra"]["run"] == "demo-test-copy" and "fp_base" in dst_cfg
    assert json.loads((dst / "run.json").read_text())["id"] == "demo-test-copy"
    a = load_dit(runs / rid / "model").transformer
    b = load_dit(dst / "model", fp_base=eng.teacher).transformer
    c = eng.teacher.config
    x, t, y = torch.randn(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(a(x, timestep=t, class_labels=y).sample, b(x, timestep=t, class_labels=y).sample)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


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
    # rows say what each run is (method, k x d, bits/weight), not the nominal "W2"
    assert len(metrics) == 3 and "codebook-only 256×4, 2.20 b/w" in list(metrics["model"])
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
    from app.store import RunStore
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
    root = ROOT
    r = subprocess.run([sys.executable, str(root / "app.py"), "--model", str(tmp_path), "--no-umap-warmup"],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "not a DiT model directory" in lines[0]


def test_app_reads_runs_only_through_trace_api():
    """No storage keys, no meta layout, no hard-coded method lists in the app (issue 8)."""
    import re
    src = {p.name: p.read_text() for p in (ROOT / "app").rglob("*.py")}
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
    from vq4dit.peers import PEERS, describe, installed
    peers = [n for n, c in PEERS.items() if installed(c.library)]
    assert [c[1] for c in ui.setup.method.choices] == list(METHODS) + peers   # vq4dit's first, then peers
    assert METHODS[DEFAULT_METHOD].description in ui.method_md.value
    for name, spec in METHODS.items():
        assert spec.description in client.predict(name, api_name="/describe_method")
    for name in peers[:2]:
        assert describe(PEERS[name]) in client.predict(name, api_name="/describe_method")


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


# ----------------------------------------------------------------------------------------
# Never stale, never silent (issue 10)
# ----------------------------------------------------------------------------------------


def deps(demo, component, event):
    """The functions an event of `component` triggers first, then their .then/.success chain."""
    fns = list(demo.fns.values())
    first = [f for f in fns if (component._id, event) in f.targets]
    chain, todo = [], list(first)
    while todo:
        f = todo.pop(0)
        chain.append(f)
        todo += [g for g in fns if g.trigger_after == f._id]
    return first, chain


def plot_json(x):
    """A gr.Plot output as received by gradio_client -> the plotly figure dict."""
    x = val(x)
    return json.loads(x["plot"]) if isinstance(x, dict) and "plot" in x else x


def test_run_buttons_disabled_while_running(app):
    demo, client, runs = app
    ui = demo.ui
    for btn, api in ((ui.run_btn, "run"), (ui.other_btn, "run_missing")):
        first, chain = deps(demo, btn, "click")
        assert [f.name for f in first] == ["lock_run"]
        assert [o._id for o in first[0].outputs] == [ui.run_btn._id, ui.other_btn._id, ui.cancel_btn._id]
        assert [u["interactive"] for u in first[0].fn()] == [False, False, True]  # Cancel only while running
        names = [f.name for f in chain]
        assert api in names and "unlock_run" in names and names.index("unlock_run") > names.index(api)
        unlock = next(f for f in chain if f.name == "unlock_run")
        assert unlock.trigger_only_on_success is False  # re-enabled after a failed run too
        assert [u["interactive"] for u in unlock.fn()] == [True, True, False]
    assert ui.cancel_btn.interactive is False  # idle: Cancel does not look active


def test_typing_a_snapshot_number_updates_the_selection(app):
    demo, client, runs = app
    ui = demo.ui
    first, _ = deps(demo, ui.snap_sl, "release")  # end of a drag, or the number box on Enter / blur
    assert [f.name for f in first] == ["on_snap"]
    sel = dict(run="r", block=0, layer="x", snap=3)
    h = first[0].fn
    assert h(sel, 1) == dict(sel, snap=1)
    assert h(sel, 3)["__type__"] == "update"  # same value (set by load_run): no re-render


def test_run_switch_clears_images_restores_settings_and_moves_rd_highlight(app):
    demo, client, runs = app
    ids = demo.engine.store.readable_ids()
    assert len(ids) >= 2
    a, b = ids[0], ids[-1]
    client.predict(a, api_name="/load_run")
    img, table, note = client.predict(a, "1,2", 0, 4.0, 3, api_name="/images")
    assert img is not None and "(selected)" in json.dumps(table)
    client.predict(b, api_name="/load_run")
    first, chain = deps(demo, demo.ui.run_dd, "change")
    assert [f.name for f in chain[:2]] == ["load_run", "run_context"] and chain[1].trigger_only_on_success
    out = client.predict(b, api_name="/run_context")  # rd, images x3, setup x12
    img_out, note_out = out[1], out[3]
    assert val(img_out) is None and b in note_out  # never the previous run's images
    meta = demo.engine.store.meta(b)
    setup = out[4:]
    assert val(setup[0]) == meta["settings"]["method"] and val(setup[1]) == meta["bits"]
    assert val(setup[2]) == meta["k"] and val(setup[3]) == meta["d"]
    assert setup[5] == setup[6] == {"__type__": "update"}   # its budget is not copied into Set-up unasked
    rd = plot_json(out[0])
    sizes = {}
    for t in rd["data"]:
        for r, s in zip(t.get("text") or [], t["marker"]["size"] if isinstance(t["marker"]["size"], list) else []):
            sizes[r.split(" (")[0]] = s  # partial runs: "id (cancelled)"
    assert sizes[b] == 14 and sizes[a] == 9  # the highlight follows the selection
    symbols = {r.split(" (")[0]: sym for t in rd["data"] for r, sym in zip(t.get("text") or [], t["marker"]["symbol"])}
    for rid in ids:
        assert (symbols[rid] == "circle-open") == (demo.engine.store.meta(rid)["status"] != "finished")


def test_invalid_image_input_keeps_previous_result(app):
    """Generate validates in a first step without outputs; only on success does make_images (which
    owns the image outputs) run, so an error never blanks the images on screen."""
    demo, client, runs = app
    from gradio_client.exceptions import AppError
    ui = demo.ui
    first, chain = deps(demo, ui.gen_btn, "click")
    assert [f.name for f in first] == ["check_images"] and first[0].outputs == []
    assert [f.name for f in chain] == ["check_images", "make_images"] and chain[1].trigger_only_on_success
    import gradio as gr
    with pytest.raises(gr.Error, match=r"\[0, 9\]"):
        first[0].fn(None, "0,12", 0, 4.0, 3, "")
    first[0].fn(None, "0,1", 0, 4.0, 3, "")  # valid input passes
    with pytest.raises(AppError, match=r"\[0, 9\]"):
        client.predict(demo.engine.store.readable_ids()[0], "0,12", 0, 4.0, 3, api_name="/images")


def test_cluster_plot_is_svg_not_webgl(app):
    demo, client, runs = app
    rid = first_run(runs)
    client.predict(rid, api_name="/load_run")
    fig, note = client.predict("codeword", "PCA", api_name="/render_cluster")
    types = {t["type"] for t in plot_json(fig)["data"]}
    assert types == {"scatter"}, types


def test_status_line_and_eta():
    """Status shows block MSE and L_r (not the summed loss), and an ETA from the calibration clock:
    990 s of k-means before the first step must not inflate it (was '~2182 s left' with 37 s left)."""
    from app.text import status_text
    from app.config import RunRequest
    from app.engine import ActiveRun
    a = ActiveRun(settings=RunRequest(method="vq4dit", bits=2), total_steps=100, phase="calibrating")
    a.t0 -= 1000
    a.rows = [dict(step=i, loss=0.5, block_loss=0.002, l_r=0.498, frozen_frac=0.1, seconds=i) for i in range(1, 11)]
    s = status_text(a)
    assert "block MSE 0.002" in s and "L_r 0.498" in s and "loss" not in s
    eta = float(s.split("~")[1].split(" s")[0])
    assert 45 <= eta <= 180, s  # truth: 90 s
    # the phases in order: k-means done, calibration 10% through, evaluation and saving to come
    assert "● k-means → **▶ calibration █░░░░░░░░░ 10%** → ○ evaluation → ○ saving" in s
    a = ActiveRun(settings=RunRequest(), total_steps=0, phase="k-means init", layers_done=10, layers_total=40)
    a.t0 -= 20
    assert "layer 10/40" in status_text(a) and "~60 s left" in status_text(a)


def test_estimate_before_run_matches_saved_size(app):
    demo, client, runs = app
    eng = demo.engine
    rid = first_run(runs)
    meta = eng.store.meta(rid)
    from app.forms import SetupForm
    st = meta["settings"]
    form = SetupForm(st["method"], st["bits"], st["k"], st["d"], st["n_candidates"], st["calib"]["iterations"],
                     st["calib"]["num_sampling_steps"], st["kmeans_iters"], st["calib"]["lr_logits"],
                     st["calib"]["lr_codebook"], st["calib"]["lambda_r"], st["seed"])
    est = eng.estimate(eng.run_config(form.settings(eng.calib_defaults)))
    assert est["bits_per_weight"] == pytest.approx(meta["bits_per_weight"], rel=1e-9)
    assert est["seconds"] is not None and est["seconds"] > 0  # earlier runs at this k x d exist
    text = client.predict(*setup_args(bits=3, k=64, d=2), api_name="/estimate")
    bpw = float(text.split("bits/weight")[0].split()[-1])
    assert 3.0 < bpw < 3.3 and "MiB packed" in text  # log2(64)/2 index bits + codebooks + biases


def test_cancel_after_calibration_skips_evaluation_and_is_cancelled(app):
    demo, client, runs = app
    eng = demo.engine
    before = {p.name for p in runs.iterdir()}
    job = client.submit(*setup_args(iterations=1, steps=3), api_name="/run")
    t0 = time.time()
    while not (eng.active and eng.active.total_steps and len(eng.active.rows) >= 3):
        assert time.time() - t0 < 300, "calibration did not finish"
        time.sleep(0.01)
    assert client.predict(api_name="/cancel").startswith("**Cancelling")  # late: calibration is done
    final = stream(job)[-1][0]
    assert "cancelled during" in final and "image evaluation skipped" in final, final
    new = [p for p in runs.iterdir() if p.name not in before and not p.name.startswith(".")]
    meta = json.loads((new[0] / "run.json").read_text())
    assert meta["status"] == "cancelled" and meta["metrics"] == {} and meta["steps_done"] == 3


def test_cancel_during_kmeans_says_nothing_saved(app):
    demo, client, runs = app
    before = {p.name for p in runs.iterdir()}
    job = client.submit(*setup_args(method="kmeans", kmeans=50), api_name="/run")
    for out in job:
        if "k-means" in str(out[0]):
            client.predict(api_name="/cancel")
            break
    final = stream(job)[-1][0]
    assert "cancelled during k-means" in final and "nothing saved" in final, final
    assert {p.name for p in runs.iterdir() if not p.name.startswith(".")} == {b for b in before if not b.startswith(".")}


def test_conflict_summary_model_wide(app):
    """Model-wide conflict share per layer, the assignment-training run vs codebook-only."""
    demo, client, runs = app
    views = demo.views
    rid = first_run(runs)
    pair, missing = views.conflict_pair(rid)
    assert missing is None and all(pair.values())  # run_missing ran codebook-only earlier
    fig, md = views.conflict_summary(views.initial_selection(rid))
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2
    n_layers = len(views.trace(rid).layer_names)
    for t, rid_side in zip(bars, pair.values()):
        s = views.trace(rid_side).conflict_summary()
        assert len(t.y) == n_layers == len(s)
        assert f"{100 * s['conflict_share'].mean():.1f}%" in md
    assert "Model-wide conflict share" in md and f"of {n_layers} layers" in md


def test_compare_any_two_runs_in_every_view(app):
    """Pick a comparison run (here a cancelled one): every view compares against it; cancelled
    runs are labelled and never picked automatically."""
    demo, client, runs = app
    views, store = demo.views, demo.engine.store
    rid = first_run(runs)
    other = first_run(runs, status="cancelled")
    labels = dict((v, l) for l, v in views.run_choices())
    assert "cancelled" in labels[other] and "cancelled" not in labels[rid]
    # a label says what the run is: method, k x d, bits/weight, and which run (its timestamp)
    assert labels[rid].startswith("vq4dit 256×4, 2.2") and "b/w" in labels[rid] and labels[rid].endswith(rid[:15])
    assert other not in views.baselines(rid) and all(store.meta(b)["status"] == "finished" for b in views.baselines(rid))
    # baselines pair by (k, d, init): every one shares the run's codebook shape and init
    assert all(store.pair_key(store.meta(b)) == store.pair_key(store.meta(rid)) for b in views.baselines(rid))
    pair, _ = views.conflict_pair(rid)
    assert other not in pair.values()

    client.predict(rid, api_name="/load_run")
    img, table, note = client.predict(other, api_name="/compare")
    assert img is None and other in note
    res = client.predict("codeword", "PCA", api_name="/render_layer_views")
    from app.handlers import LAYER_VIEWS
    res = dict(zip([n for n in LAYER_VIEWS if n != "other_btn"], res))  # API clients get no button outputs
    assert other in res["sel_md"] and "Compared with" in res["sel_md"]
    assert val(res["evol_cmp_plot"]) is not None and res["evol_cmp_plot"].get("visible") is True  # compared evolution
    assert other in res["conflict_note"] and "picked" in res["conflict_note"]          # conflicts note
    assert other in res["mech_md"] and "paired with" in res["mech_md"]                 # mechanism: the picked pair

    sel = dict(views.initial_selection(rid), other=other)
    heat, table, mse = views.changes(sel)
    assert sum(t.type == "heatmap" for t in heat.data) == 2             # this run + difference
    diff = np.asarray(heat.data[1].z, float)
    np.testing.assert_allclose(diff, views.change_table(rid, None)[plots_cols()].to_numpy(float)
                               - views.change_table(other)[plots_cols()].to_numpy(float), atol=1e-9)
    assert sum(t.type == "bar" for t in mse.data) == 2
    fig, md = views.conflict_summary(sel)
    assert sum(t.type == "bar" for t in fig.data) == 2
    img, metrics, note = views.images(rid, "0,1", 0, 4.0, 3, compare=other)
    assert list(metrics["run"]) == ["-", rid, other] and "[cancelled]" in metrics["model"].iloc[2]
    assert "picked" in note


def plots_cols():
    from app.plots import LAYER_COLUMNS
    return LAYER_COLUMNS


def test_evolution_marks_finalize_and_codebook_only_has_no_ratios(app):
    demo, client, runs = app
    views, store = demo.views, demo.engine.store
    rid = first_run(runs)
    tr = views.trace(rid)
    sel = views.initial_selection(rid)
    fig = views.evolution(sel)
    notes = " ".join(a.text for a in fig.layout.annotations)
    if sel["layer"] in tr.hard_steps():
        assert f"switched to hard at step {tr.hard_steps()[sel['layer']]}" in notes
    else:  # 3 steps: no hard switch during the run -> the final step is marked as the finalize
        assert f"made hard by the final step ({tr.steps_done})" in notes
    cb = next(r.id for r in store.list() if r.meta and r.meta.get("method") == "codebook-only")
    fig = views.evolution(views.initial_selection(cb))
    assert "no assignment ratios" in fig.layout.annotations[0].text


def test_bit_width_slider_shows_matching_run_or_offers_to_calibrate(app):
    demo, client, runs = app
    views = demo.views
    want = views.newest(lambda sp: sp is not None and sp.name == "vq4dit", kd=(256, 4))
    assert want is not None
    setting, k, d, run, msg = client.predict(2, "vq4dit", api_name="/bits")
    assert val(setting) == "W2" and (val(k), val(d)) == (256, 4) and val(run) == want and want in msg
    setting, k, d, run, msg = client.predict(4, "vq4dit", api_name="/bits")
    assert val(setting) == "W4" and (val(k), val(d)) == (256, 2) and "No finished **vq4dit W4** run" in msg


def test_named_settings_next_to_the_slider(app):
    """W2-budget and XL-sharing share the 2-bit slider position; the setting sets k x d and picks
    only runs of that codebook shape (a W2 run is never shown as XL-sharing)."""
    demo, client, runs = app
    client.predict(4, "vq4dit", api_name="/bits")  # the setting list does not depend on the slider
    bits, k, d, run, msg = client.predict("XL-sharing", "vq4dit", api_name="/setting")
    assert (val(bits), val(k), val(d)) == (2, 16, 4)
    assert "No finished **vq4dit XL-sharing** run yet (16×4)" in msg
    bits, k, d, run, msg = client.predict("W2-budget", "codebook-only", api_name="/setting")
    assert (val(k), val(d)) == (64, 4)
    bits, k, d, run, msg = client.predict("W2", "vq4dit", api_name="/setting")
    assert (val(k), val(d)) == (256, 4) and val(run) == demo.views.newest(
        lambda sp: sp is not None and sp.name == "vq4dit", kd=(256, 4))


def test_evolution_shows_switched_subvectors(app):
    """Sub-vectors that changed codeword appear as trajectories ending at 0 (the k-means codeword lost)."""
    demo, client, runs = app
    views = demo.views
    rid = first_run(runs)
    tr = views.trace(rid)
    from app.views import switched_paths
    for layer in tr.layer_names:
        steps = tr.snapshot_steps(layer)
        first, last = tr.snapshot(layer, steps[0]), tr.snapshot(layer, steps[-1])
        n_moved = int((first.assign != last.assign).sum())
        sw = switched_paths(tr, layer)
        if n_moved == 0:
            assert sw is None
            continue
        assert sw["sample"].nunique() == min(8, n_moved)
        final = sw[sw["step"] == steps[-1]]
        np.testing.assert_allclose(final["ratio_nearest"], 0.0)          # hard at the end, codeword lost
        start = sw[sw["step"] == steps[0]]
        assert (start["ratio_nearest"] >= 0.5).all()                      # k-means codeword on top at init
        fig = views.evolution(dict(views.initial_selection(rid, tr.layer_info(layer).block, layer)))
        assert sum(1 for t in fig.data if (t.name or "").startswith("switched ")) == min(8, n_moved)
        break
    else:
        pytest.skip("no sampled sub-vector switched codeword in this tiny run")
