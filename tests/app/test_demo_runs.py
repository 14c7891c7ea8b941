"""Demo runs shipped with the app (assets/demo_runs/, built by `python -m app.demo build`):
every one loads with the current trace and packed-model format, the compact format reads back
the same values, demo runs are read-only and confined to their directory, and an app with an
empty runs dir opens on a demo run with data in every view.
"""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_dit

from app.demo import DEMO_RUNS, DEMO_TRACE_SAMPLES, demo_id
from app.demo import DEMO_METHOD
from app.store import DEMO_DIR, RunStore
from vq4dit.config import SETTINGS, setting_kd

DEMO_IDS = [demo_id(m, s) for m, s in DEMO_RUNS]
# packed W3 indices alone are 2.6 MiB on the digits DiT, and the trace keeps every sub-vector's start
# assignment (the "changed" reference of the full-weight views): 1.7 MiB at W2, 3.4 MiB at W3 (uint8)
MAX_DEMO_MIB = 9.0


@pytest.fixture(scope="module")
def base():
    from vq4dit.io import load_dit
    from vq4dit.testbed import DIGITS_DIT_DIR
    return load_dit(DIGITS_DIT_DIR).transformer


@pytest.fixture(scope="module")
def demo_store(base):
    return RunStore(tempfile.mkdtemp(prefix="vq4dit-empty-"), demo_root=DEMO_DIR, fp_base=base)


def test_demo_dir_holds_every_demo_run():
    have = sorted(p.name for p in DEMO_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert have == sorted(DEMO_IDS), f"rebuild with `python -m app.demo build`: have {have}"


@pytest.mark.parametrize("rid", DEMO_IDS)
def test_demo_run_loads_with_current_format(demo_store, rid):
    """run.json, the compact trace and the packed model (FP parts from the embedded model) all
    load, and hold what the id says: method, k x d, a finished calibration with snapshots."""
    store = demo_store
    method, setting = next((m, s) for m, s in DEMO_RUNS if demo_id(m, s) == rid)
    info = next(r for r in store.list() if r.id == rid)
    assert info.error is None, info.error
    meta = store.meta(rid)
    assert meta["method"] == method and meta["bits"] == SETTINGS[setting]["bits"]
    assert (meta["k"], meta["d"]) == setting_kd(setting)
    assert meta["status"] == "finished" and meta["steps_done"] == meta["total_steps"] > 0
    assert meta["block_mse"] > 0 and 0 <= meta["metrics"]["accuracy"] <= 1
    size = sum(f.stat().st_size for f in store.run_dir(rid).rglob("*") if f.is_file()) / 2 ** 20
    assert size < MAX_DEMO_MIB, f"{rid} is {size:.2f} MiB"

    tr = store.trace(rid)
    assert tr.meta["compact"]["n_samples"] == DEMO_TRACE_SAMPLES
    assert len(tr.layer_names) == 7 * meta["n_blocks"] and len(tr.steps) == meta["steps_done"]
    for layer in tr.layer_names:
        fp, idx = tr.samples(layer)
        assert fp.dtype == np.float32 and fp.shape == (DEMO_TRACE_SAMPLES, meta["d"]) and np.isfinite(fp).all()
        steps = tr.snapshot_steps(layer)
        assert steps[0] == 0 and steps[-1] == meta["steps_done"] and len(steps) >= 3
        last = tr.snapshot(layer, steps[-1])
        assert last.codebook.shape == (meta["k"], meta["d"]) and np.isfinite(last.codebook).all()
        assert last.assign.dtype == np.int64 and 0 <= last.assign.min() and last.assign.max() < meta["k"]
        assert ((last.top_ratio > 0) & (last.top_ratio <= 1.0)).all()
    assert len(tr.conflict_summary()) == len(tr.layer_names)  # gradients were recorded

    b = store.model(rid)
    assert b.quantized_meta["fp_base"]["keys"]  # the FP parts come from the embedded model
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = b.transformer(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 7])).sample
    assert torch.isfinite(out).all() and out.abs().max() > 0
    # the packed indices agree with the trace's final assignment of the sampled sub-vectors
    layer = tr.layer_names[0]
    lin = dict(b.transformer.named_modules())[layer]
    np.testing.assert_array_equal(lin.indices().numpy()[tr.samples(layer)[1]],
                                  tr.snapshot(layer, tr.snapshot_steps(layer)[-1]).assign)


def test_compact_trace_and_shared_fp_round_trip(tmp_path):
    """Trace.compact keeps the sample prefix in float16 (same values to fp16 precision, same
    indices); a packed model saved with fp_base reloads bit-identically only with that base."""
    from vq4dit import method_config, quantize
    from vq4dit.io import load_dit, save_quantized
    from vq4dit.trace import Trace
    teacher = make_tiny_dit()
    model = make_tiny_dit()
    tr = quantize(model, method_config("vq4dit", bits=2, kmeans_iters=5, calib=dict(
        iterations=1, num_sampling_steps=4, trace_samples=64)), teacher=teacher, progress=False)
    tr.save(tmp_path / "full")
    tr.compact(32).save(tmp_path / "small")
    a, c = Trace.load(tmp_path / "full"), Trace.load(tmp_path / "small")
    assert (tmp_path / "small" / "snapshots.safetensors").stat().st_size < \
        0.5 * (tmp_path / "full" / "snapshots.safetensors").stat().st_size
    for layer in a.layer_names:
        fa, ia = a.samples(layer)
        fc, ic = c.samples(layer)
        assert fc.dtype == np.float32 and fc.shape == (32, fa.shape[1])
        np.testing.assert_allclose(fc, fa[:32], rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(ic, ia[:32])
        assert a.snapshot_steps(layer) == c.snapshot_steps(layer)
        for s in a.snapshot_steps(layer):
            sa, sc = a.snapshot(layer, s), c.snapshot(layer, s)
            np.testing.assert_array_equal(sc.assign, sa.assign[:32])
            np.testing.assert_allclose(sc.codebook, sa.codebook, rtol=1e-3, atol=1e-4)
            if sa.worst_grads is not None:  # rescaled: same directions
                g = sa.worst_grads / np.abs(sa.worst_grads).max()
                np.testing.assert_allclose(sc.worst_grads, g, atol=2e-3)
    pd_a, pd_c = a.layer_stats(), c.layer_stats()
    np.testing.assert_allclose(pd_c["changed_frac"].to_numpy(), pd_a["changed_frac"].to_numpy(), rtol=1e-4)  # 5 digits

    save_quantized(model, tmp_path / "full-model")
    save_quantized(model, tmp_path / "shared", fp_base=teacher)
    assert (tmp_path / "shared" / "model.safetensors").stat().st_size < \
        (tmp_path / "full-model" / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="fp_base"):
        load_dit(tmp_path / "shared")
    with pytest.raises(ValueError, match="checksum|quantized from"):
        load_dit(tmp_path / "shared", fp_base=make_tiny_dit(seed=1))
    x = torch.randn(2, 1, 8, 8)
    kw = dict(timestep=torch.tensor([3, 700]), class_labels=torch.tensor([0, 9]))
    with torch.no_grad():
        ref = load_dit(tmp_path / "full-model").transformer(x, **kw).sample
        got = load_dit(tmp_path / "shared", fp_base=teacher).transformer(x, **kw).sample
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    other = make_tiny_dit(seed=2)
    with pytest.raises(ValueError, match="differs"):
        save_quantized(model, tmp_path / "bad", fp_base=other)


def _fake_run(d: Path, rid: str, method=DEMO_METHOD, bits=2):
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(dict(id=rid, method=method, bits=bits, status="finished", k=256, d=4)))


def test_demo_runs_read_only_and_confined(tmp_path):
    demo, runs = tmp_path / "demo", tmp_path / "runs"
    _fake_run(demo / "demo-codebook-only-W2", "demo-codebook-only-W2", method="codebook-only")
    _fake_run(demo / f"demo-{DEMO_METHOD}-W2", f"demo-{DEMO_METHOD}-W2")
    _fake_run(runs / "demo-sneaky", "demo-sneaky")          # a demo-prefixed dir in the runs dir: ignored
    (tmp_path / "outside").mkdir()
    (demo / "demo-link").symlink_to(tmp_path / "outside")   # a link out of the demo dir: refused
    store = RunStore(runs, demo_root=demo)
    listed = {r.id: r.error for r in store.list()}
    assert list(listed)[:3] == ["demo-codebook-only-W2", "demo-link", f"demo-{DEMO_METHOD}-W2"]
    assert "demo-sneaky" not in listed and "invalid run id" in listed["demo-link"]  # listed as unreadable
    assert store.run_dir(f"demo-{DEMO_METHOD}-W2").parent == demo
    for bad in ("demo-../runs", "demo-x/../../etc", "../demo/demo-codebook-only-W2", "demo-link"):
        with pytest.raises(ValueError, match="invalid run id"):
            store.run_dir(bad)
    with pytest.raises(ValueError, match="reserved"):
        store.save(f"demo-{DEMO_METHOD}-W2", None, {})
    assert not (runs / f"demo-{DEMO_METHOD}-W2").exists()
    # a user run saved later is listed after (newer than) the demo runs
    _fake_run(runs / "20260101-000000-vq4dit-w2", "20260101-000000-vq4dit-w2", method="vq4dit")
    assert [r.id for r in store.list()][-1] == "20260101-000000-vq4dit-w2"
    assert not store.is_demo("20260101-000000-vq4dit-w2") and store.is_demo("demo-codebook-only-W2")
    assert not RunStore(runs).is_demo("demo-sneaky")  # no demo dir attached: a plain id


def _arr(v):
    """A plotly JSON array (plain list or plotly 6's base64 typed array {'bdata', 'dtype', 'shape'})."""
    if isinstance(v, dict) and "bdata" in v:
        import base64
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def test_first_open_shows_a_demo_run_in_every_view(tmp_path):
    """An empty runs dir: the page is built with the default demo run already in every view
    (values set before any event), labelled as a demo run with what it is (k x d, bits/weight); the
    default is the demo method at XL-sharing (FIRST_DEMO: where the pair shows an effect)."""
    from app import AppConfig, create_app
    from app.demo import FIRST_DEMO
    demo = create_app(AppConfig(runs_dir=str(tmp_path / "runs"), warm_umap=False, spare_worker=False))
    ui = demo.ui
    want = FIRST_DEMO
    assert want == demo_id(DEMO_METHOD, "XL-sharing")
    assert ui.run_dd.value == want and ui.sel.value["run"] == want
    labels = {v: k for k, v in ui.run_dd.choices}
    assert all(labels[r].endswith("— demo") for r in DEMO_IDS)
    assert "16×4" in labels[want] and "1.1" in labels[want] and "b/w" in labels[want]
    assert "demo run" in ui.sel_md.value
    plot = lambda c: json.loads(c.value["plot"])
    cluster = plot(ui.cluster_plot)
    assert len(_arr(cluster["data"][0]["x"])) == DEMO_TRACE_SAMPLES
    assert any(t.get("name") == "codewords (this step)" and len(_arr(t["x"])) == 16 for t in cluster["data"])
    heat = [t for t in plot(ui.heat_plot)["data"] if t["type"] == "heatmap"][0]
    z = _arr(heat["z"]).astype(float)
    assert z.shape == (demo.engine.n_blocks, 7) and np.isfinite(z).all() and z.max() > 0
    assert any(t["type"] == "heatmap" for t in plot(ui.evol_plot)["data"])
    assert any(t["type"] == "heatmap" for t in plot(ui.conflict_plot)["data"])  # both sides (codebook-only demo)
    assert "lower for" in ui.summary_md.value  # model-wide conflict summary of the pair
    assert len(_arr(plot(ui.mse_plot)["data"][0]["x"])) == demo.engine.n_blocks
    assert len(plot(ui.live_plot)["data"]) > 3 and len(plot(ui.rd_plot)["data"]) >= 2
    dl = ui.dl_model.value
    dl = dl.get("path") if isinstance(dl, dict) else dl   # a FileData dict once postprocessed
    assert dl and Path(dl).is_file() and str(dl).endswith(f"{want}-model.zip")


# ----------------------------------------------------------------------------------------
# The app on the demo runs (gradio_client): plot clicks, full-weight clusters, loading states
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from app import AppConfig, create_app
    from conftest import free_port
    demo = create_app(AppConfig(runs_dir=str(tmp_path_factory.mktemp("runs")), warm_umap=False, spare_worker=False))
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def _val(x):
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def test_plot_clicks_select_like_the_table(demo_app):
    """A heatmap cell (x = layer kind, y = 'block N') selects that block + layer; a rate-distortion
    point (customdata = run id) loads that run; anything else changes nothing. (Outputs: block,
    layer, run; the selection State is not sent to API clients.)"""
    demo, client = demo_app
    rid = demo_id(DEMO_METHOD, "W2")
    client.predict(rid, api_name="/load_run")
    block, layer, run = client.predict(json.dumps(dict(plot="heat", x="fc1", y="block 2")), api_name="/plot_click")
    assert _val(block) == 2 and _val(layer) == "transformer_blocks.2.ff.net.0.proj"
    block, layer, run = client.predict(json.dumps(dict(plot="heat", x="adaLN", y="block 5")), api_name="/plot_click")
    assert _val(block) == 5 and _val(layer) == "transformer_blocks.5.norm1.linear"
    other = demo_id(DEMO_RUNS[1][0], DEMO_RUNS[1][1])
    out = client.predict(json.dumps(dict(plot="rd", x=2.2, y=0.01, id=other)), api_name="/plot_click")
    assert _val(out[2]) == other and all(_val(o) is None or o == {"__type__": "update"} for o in out[:2])
    for bad in ('{"plot": "heat", "x": "fc1", "y": "block 99"}', '{"plot": "heat", "x": "nope", "y": "block 1"}',
                '{"plot": "rd", "id": "../etc"}', "not json"):
        out = client.predict(bad, api_name="/plot_click")
        assert all(_val(o) is None or o == {"__type__": "update"} for o in out), (bad, out)
    # the rate-distortion points carry their run ids, which is what the page's click script sends
    rd = demo.views.store.table()
    from app.plots import rd_figure
    ids = {c for t in rd_figure(rd).data for c in (t.customdata or [])}
    assert set(DEMO_IDS) <= ids


def test_full_weight_cluster_view(demo_app, monkeypatch):
    """On request the final state's every sub-vector is drawn as a density image (counts add up to
    the layer's sub-vectors); above FULL_CLUSTER_MAX it says 'sampled N of M'; snapshots and UMAP
    keep the trace's sample."""
    demo, _ = demo_app
    import app.views.clusters as V
    views = demo.views
    rid = demo_id(DEMO_METHOD, "W2")
    sel = dict(views.initial_selection(rid), block=1, layer="transformer_blocks.1.ff.net.0.proj")
    info = views.trace(rid).layer_info(sel["layer"])
    fig, note = views.cluster(sel, "codeword", "PCA", full=True)
    heat = fig.data[0]
    assert heat.type == "heatmap" and int(np.nansum(np.asarray(heat.customdata, float))) == info.n_subvectors
    assert f"all {info.n_subvectors:,}" in note.replace("**", "")
    assert len([t for t in fig.data if t.name == "codewords (final)"][0].x) == info.k
    fig, note = views.cluster(sel, "assignment changed", "PCA", full=True)
    if views.trace(rid).start_assignment(sel["layer"]) is None:   # traces recorded before it was kept
        assert "does not keep every sub-vector's start assignment" in note and "different codeword" not in note
    else:   # "changed" = differs from the start assignment (never the nearest plain-Euclidean codeword)
        share = np.asarray(fig.data[0].z, float)
        assert np.nanmax(share) <= 100 and np.nanmin(share) >= 0 and np.isfinite(share).sum() > 100
    # every sub-vector's final codeword is the packed model's
    fw = views.full_weights(rid, sel["layer"])
    lin = dict(views.store.model(rid).transformer.named_modules())[sel["layer"]]
    np.testing.assert_array_equal(fw["assign"], lin.indices().numpy())
    # over the cap: an evenly strided sample, said so
    monkeypatch.setattr(V, "FULL_CLUSTER_MAX", 1000)
    views._proj.clear()
    fig, note = views.cluster(sel, "codeword", "PCA", full=True)
    assert f"sampled 1,000 of {info.n_subvectors:,}" in note.replace("**", "")
    assert int(np.nansum(np.asarray(fig.data[0].customdata, float))) == 1000
    # UMAP and earlier snapshots keep the trace's sample
    for s, method in ((dict(sel, snap=0), "PCA"), (sel, "UMAP")):
        fig, note = views.cluster(s, "codeword", method, full=True)
        assert fig.data[0].type == "scatter" and len(fig.data[0].x) == DEMO_TRACE_SAMPLES
        assert "showing the trace's sample" in note


def test_selection_changes_show_loading_and_update_the_visible_views(demo_app):
    """Every selection event puts the loading overlay on every view; the render step draws the
    views of the visible tab (others are drawn when their tab opens) and remembers what it drew."""
    demo, _ = demo_app
    ui = demo.ui
    fns = list(demo.fns.values())
    view_ids = {c._id for c in (ui.cluster_plot, ui.evol_plot, ui.conflict_plot, ui.heat_plot, ui.mse_plot)}
    for comp, event in ((ui.block_dd, "input"), (ui.layer_dd, "input"), (ui.snap_sl, "release"),
                        (ui.changes_df, "select"), (ui.click_tb, "input"), (ui.run_dd, "change"),
                        (ui.compare_dd, "input")):
        f = next(f for f in fns if (comp._id, event) in f.targets)
        assert f.show_progress == "full" and view_ids <= {c._id for c in f.show_progress_on}, (f.name, event)
        if comp in (ui.block_dd, ui.layer_dd, ui.snap_sl):   # a newer selection replaces one still waiting
            assert f.trigger_mode == "always_last", (f.name, event)
    assert not any((ui.snap_sl._id, "change") in f.targets for f in fns)   # dragging: one update, on release
    render = next(f for f in fns if f.name == "render_page" and (ui.sel._id, "change") in f.targets)
    assert render.show_progress == "full" and render.trigger_mode == "always_last"
    from app.forms import ViewForm
    from app.handlers import LAYER_VIEWS
    h = render.fn
    sel = dict(demo.views.initial_selection(demo_id(DEMO_METHOD, "W2")), block=3)
    sel["layer"] = demo.views.layer_choices(sel["run"], 3)[0][1]
    out = h("clusters", {}, sel, "codeword", "PCA", False)[:-1]   # (the page's view_state last)
    views, rendered = dict(zip(LAYER_VIEWS, out[:-1])), out[-1]
    assert "block 3" in views["cluster_note"] or "block 3" in json.dumps(views["cluster_plot"].to_plotly_json()["layout"]["title"])
    skipped = lambda v: isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1
    assert all(skipped(views[n]) for n in ("heat_plot", "evol_plot", "conflict_plot")) and "block 3" in views["sel_md"]
    assert set(rendered) == {"clusters"}
    out = h("clusters", rendered, sel, "codeword", "PCA", False)[:-1]   # same selection again: nothing redrawn
    assert skipped(dict(zip(LAYER_VIEWS, out))["cluster_plot"])
    out = h("changes", rendered, sel, "codeword", "PCA", False)[:-1]    # tab opened: its views drawn
    assert not skipped(dict(zip(LAYER_VIEWS, out))["heat_plot"]) and set(out[-1]) == {"clusters", "changes"}
    assert ViewForm(sel, "codeword", "PCA").full is False


def test_shipped_images_match_fresh_samples_and_open_the_images_tab(demo_app):
    """Each demo run ships its and FP's images at the Images tab's defaults (so the tab shows images on
    first open); they equal fresh samples from the current code (the default demo run is re-sampled)."""
    demo, _ = demo_app
    from safetensors import safe_open

    from app.store import DEMO_SAMPLES
    from vq4dit.sampling import sample
    eng, views = demo.engine, demo.views
    for rid in DEMO_IDS:
        with safe_open(str(DEMO_DIR / rid / DEMO_SAMPLES), "pt") as f:
            meta = f.metadata()
            assert meta == dict(labels="0,1,2,3,4,5,6,7,8,9", seed="0", guidance="4.0", steps=str(eng.cfg.image_steps))
            assert f.get_tensor("run").shape == f.get_tensor("fp").shape == (10, 1, 16, 16)
    rid = demo_id(DEMO_METHOD, "W2")
    labels = list(range(10))
    shipped = eng.shipped_images(rid, tuple(labels), 0, 4.0, eng.cfg.image_steps)
    fresh = sample(eng.store.model(rid).transformer, labels, num_steps=eng.cfg.image_steps, guidance_scale=4.0,
                   seed=0, scheduler=eng.bundle.scheduler)
    torch.testing.assert_close(shipped, fresh, atol=2e-3, rtol=0)   # float16 storage
    fp = eng.shipped_images("fp", tuple(labels), 0, 4.0, eng.cfg.image_steps)
    torch.testing.assert_close(fp, sample(eng.teacher, labels, num_steps=eng.cfg.image_steps, guidance_scale=4.0,
                                          seed=0, scheduler=eng.bundle.scheduler), atol=2e-3, rtol=0)
    assert eng.shipped_images(rid, tuple(labels), 1, 4.0, eng.cfg.image_steps) is None  # other seed: not shipped
    # opening the Images tab shows them (no sampling); a request that needs sampling is left to Generate
    from app.forms import ImageForm
    auto = next(f for f in demo.fns.values() if f.name == "auto_images").fn
    assert views.images_ready(rid, "0-9", 0, 4.0, eng.cfg.image_steps)
    img, table, note = auto("images", rid, "0-9", 0, 4.0, eng.cfg.image_steps, "")
    assert img.shape[2] == 3 and len(table) >= 2 and table["PSNR vs FP (dB)"].iloc[1] > 5
    out = auto("images", rid, "0-9", 123, 4.0, eng.cfg.image_steps, "")
    assert all(isinstance(o, dict) and o.get("__type__") == "update" for o in out)
    assert auto("clusters", rid, "0-9", 0, 4.0, eng.cfg.image_steps, "")[0] == {"__type__": "update"}
    assert ImageForm(rid, "0-9", 0, 4.0, 25).compare is None


def test_first_open_and_plot_clicks_in_browser(tmp_path):
    """Real browser, empty runs dir: the page opens on the demo run with data; clicking a heatmap
    cell selects that block + layer, clicking a rate-distortion point loads that run, the Images tab
    shows the shipped images at once, and the full-weight cluster mode says how many it drew."""
    from conftest import CHROMIUM, CHROMIUM_ARGS, AppServer
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import expect, sync_playwright

    with AppServer(["--runs-dir", tmp_path / "runs", "--no-umap-warmup"], tmp_path / "server.log") as app:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(app.url)
            from app.demo import FIRST_DEMO
            expect(page.get_by_text(f"Calibration of {FIRST_DEMO}")).to_be_visible(timeout=60_000)

            # the Mechanism tab states a verdict per measure (this demo pair: codebook-only at the same k x d)
            page.get_by_role("tab", name="Mechanism").click()
            expect(page.get_by_text("Hard switch:", exact=False).first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Block MSE, ", exact=False).first).to_be_visible()
            expect(page.get_by_text("should drop", exact=False)).to_have_count(0)

            page.get_by_role("tab", name="Per-block changes").click()
            page.wait_for_function("() => document.querySelector('#heat-plot .js-plotly-plot .hm') !== null", timeout=60_000)
            page.locator("#heat-plot").scroll_into_view_if_needed()
            page.wait_for_timeout(1200)  # the click script binds every 500 ms
            xy = page.evaluate("""() => { const gd = document.querySelector('#heat-plot .js-plotly-plot');
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                return [r.left + xa._offset + xa.l2p(4), r.top + ya._offset + ya.l2p(2)]; }""")  # fc1, block 2
            page.mouse.click(*xy)
            expect(page.get_by_label("Block", exact=True)).to_have_value("block 2", timeout=30_000)
            expect(page.get_by_label("Layer", exact=True)).to_have_value("fc1 (ff.net.0.proj)")

            page.get_by_role("tab", name="Images").click()
            expect(page.locator("#samples img")).to_be_visible(timeout=30_000)  # shipped: no sampling

            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function("() => document.querySelector('#rd-plot .js-plotly-plot .scatterlayer .point') !== null",
                                   timeout=60_000)
            page.locator("#rd-plot").scroll_into_view_if_needed()
            page.wait_for_timeout(1200)
            target = demo_id(DEMO_RUNS[3][0], DEMO_RUNS[3][1])   # codebook-only W3: alone at 3.1 bits, top-right
            xy = page.evaluate("""(rid) => { const gd = document.querySelector('#rd-plot .js-plotly-plot');
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                for (const t of gd._fullData) { const i = (t.customdata || []).indexOf(rid);
                  if (i >= 0 && t.xaxis === 'x') return [r.left + xa._offset + xa.d2p(t.x[i]),
                                                         r.top + ya._offset + ya.d2p(t.y[i])]; }
                return null; }""", target)
            assert xy is not None
            page.mouse.click(*xy)
            expect(page.get_by_text(f"Run {target}", exact=False).first).to_be_visible(timeout=30_000)

            page.get_by_role("tab", name="Codebook clusters").click()
            page.get_by_label("All sub-vectors of the final model (density image)").check()
            expect(page.get_by_text("as a density image").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("all 131,072").first).to_be_visible()   # W3 (d=2): fc1 of block 2, 1024x256/2
            page.screenshot(path=str(tmp_path / "full.png"), full_page=True)
            browser.close()


@pytest.mark.parametrize("setting", ["W2", "W3", "XL-sharing"])
def test_demo_kmeans_init_is_what_todays_code_computes(demo_store, base, setting):
    """The codebook-only demo run keeps its start assignment, so its step-0 snapshot is the k-means
    init it was built from: recompute that init with today's config of the same request (first, middle
    and last layer) and compare the sampled sub-vectors' codewords and the codebook."""
    from app.demo import _FIXED, demo_request
    from vq4dit.config import build_config
    from vq4dit.layers import VQLinear
    from vq4dit.mechanism import changed_shares  # noqa: F401  (the same "start" the views read)
    rid = demo_id(_FIXED, setting)
    tr = demo_store.trace(rid)
    req = demo_request(_FIXED, setting)
    cfg = req.config(model=base)
    assert cfg.to_dict() == build_config(_FIXED, bits=req.bits, k=req.k, d=req.d, recipe="small", seed=0,
                                         calib=dict(iterations=req.calib["iterations"], seed=0)).to_dict()
    mods = dict(base.named_modules())
    names = tr.layer_names
    for name in (names[0], names[len(names) // 2], names[-1]):
        # quantize seeds layer i (in the order it visits them, the trace's layer order) with seed + i
        q = VQLinear.from_linear(mods[name], cfg, name=name, seed=cfg.seed + names.index(name))
        _, idx = tr.samples(name)
        shipped = tr.snapshot(name, 0)
        same = float((q.assignment.numpy()[idx] == shipped.assign).mean())
        assert same > 0.99, f"{rid} {name}: only {100 * same:.1f}% of sampled codewords match today's k-means"
        np.testing.assert_allclose(shipped.codebook, q.codebook.detach().numpy(), rtol=2e-3, atol=2e-3)
