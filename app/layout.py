"""The Gradio page: components and event wiring. All model work shares one queue slot.

Shared selection (LIT style): the `sel` State {run, block, layer, snap}, edited by the selection
bar (Run / Block / Layer / Snapshot), the per-block table and the Runs table; every view
re-renders from it on `sel.change`.
"""
from __future__ import annotations

import math
import time

import gradio as gr

from vq4dit.config import METHODS, VQ_PRESETS

from . import plots
from .runs import Engine, RunSettings
from .views import Views

MODEL_QUEUE = dict(concurrency_id="model", concurrency_limit=1)  # one device job at a time

CAPTIONS = {
    "setup": (
        "**How to read this.** VQ4DiT replaces every weight sub-vector of length *d* by one of *k* codewords "
        "(bits/weight = log2(k)/d). Calibration then runs the full-precision model (the *teacher*) on random "
        "noise and nudges codewords and assignments so each transformer block's output matches the teacher's. "
        "Left: output error of each block (blue lines) and their mean (red) — lower is better. Middle: the "
        "regularizer L_r, which is 0 when every sub-vector has committed to one codeword. Right: share of "
        "sub-vectors already frozen to their codeword. Curves update about once a second while a run is going."),
    "clusters": (
        "**How to read this.** Each dot is one weight sub-vector (a fixed random sample), each black cross a "
        "codeword; grey rings mark where the codewords started (k-means). Every dot is replaced by the codeword "
        "it is assigned to, so dots far from their cross mean a large weight error. Move the *Snapshot* slider "
        "to watch codewords move during calibration. *Colour by assignment changed* shows the sub-vectors that "
        "calibration moved to a different codeword than k-means chose — the thing codebook-only calibration "
        "cannot do. PCA is instant; UMAP is computed once per run and layer (a few seconds) and then cached."),
    "evolution": (
        "**How to read this.** During calibration each sub-vector mixes its *n* candidate codewords with "
        "learnable ratios. Top: for every logged step, how many sub-vectors have each value of their largest "
        "ratio (dark at the top = most sub-vectors have committed). Middle: share frozen (ratio above 0.99, "
        "fixed for good). Bottom: the ratio of the k-means codeword for 8 sample sub-vectors — a line falling "
        "to 0 means that sub-vector switched codeword. The red dashed line marks when the whole layer switched "
        "to hard (one index per sub-vector); the grey dotted line is the selected snapshot."),
    "conflicts": (
        "**How to read this.** A codeword is shared by many sub-vectors, and each pulls it in the direction of "
        "its own loss gradient. Coherence = |sum of the gradients| / sum of their lengths: 1 means they all "
        "agree, near 0 means they cancel and the codeword cannot move usefully. Heatmaps: distribution of the "
        "coherence over all codewords of this layer at each logged step (one per method; the line is the "
        "mean). Right: share of sub-vector gradients pointing against their codeword's sum. The paper's "
        "argument: with codebook-only calibration this conflict stays; VQ4DiT lets conflicting sub-vectors "
        "move to another codeword, so conflict should drop. Bottom: the least coherent codeword's gradients "
        "as arrows (projected to 2-D by PCA when d > 2); orange arrows oppose the sum."),
    "changes": (
        "**How to read this.** Each cell is one layer (q, k, v attention projections shown separately, out "
        "projection, MLP fc1/fc2, adaLN modulation) of one transformer block: the % of its sub-vectors whose "
        "final codeword differs from the k-means one. Click a cell in the table below to make that layer the "
        "current layer in every view (plots here are not clickable). Right: block-output MSE against the FP "
        "model on held-out noise (bars) and at the last calibration step (diamonds)."),
    "images": (
        "**How to read this.** Rows: the full-precision model (FP, the reference), the selected run and the "
        "newest saved run of every other method at the same bits, all sampled from the same noise, labels and "
        "sampler. Under each image, the digit classifier's prediction (green = the requested class, red with "
        "'!' = wrong). Below each quantized row, the per-pixel absolute difference to FP (white = identical, "
        "red = off by half the intensity range or more). Table: class accuracy, FD-digits (Fréchet distance of "
        "classifier features to real digits; noisy with few images), PSNR vs FP (higher = closer to FP)."),
    "runs": (
        "**How to read this.** Every finished or cancelled run is saved in the runs directory (trace, packed "
        "model, metrics) and listed here, newest first; unreadable directories are listed as such. Click a row "
        "to load that run into every view. Plots: bits per weight (storage incl. codebooks) against image "
        "quality (FD-digits on the fixed evaluation set) and against block-output MSE — points further down "
        "and left are better."),
}


def build_app(engine: Engine) -> gr.Blocks:
    views = Views(engine)
    store = engine.store
    cd = engine.calib_defaults

    # -------------------------------------------------------------------------------------
    # Handlers
    # -------------------------------------------------------------------------------------
    def settings_from(method, bits, k, d, n, iters, steps, km, lr_l, lr_c, lam, seed) -> RunSettings:
        def i(v, name):
            if v is None or v == "":
                raise ValueError(f"{name} is empty")
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite whole number, got {v}")
            if float(v) != int(float(v)):
                raise ValueError(f"{name} must be a whole number, got {v}")
            return int(float(v))
        calib = dict(cd, iterations=i(iters, "iterations"), num_sampling_steps=i(steps, "sampling steps"),
                     lr_logits=float(lr_l), lr_codebook=float(lr_c), lambda_r=float(lam), seed=i(seed, "seed"))
        return RunSettings(method=method, bits=i(bits, "bits"), k=i(k, "k"), d=i(d, "d"),
                           n_candidates=i(n, "candidates n"), kmeans_iters=i(km, "k-means iterations"),
                           seed=i(seed, "seed"), calib=calib)

    def runs_outputs(current=None):
        ids = store.readable_ids()
        table = store.table()
        fp_fd = None
        if current:
            try:
                fp_fd = (store.meta(current).get("fp_metrics") or {}).get("fd_digits")
            except ValueError:
                pass
        if fp_fd is None:
            for rid in reversed(ids):
                fp_fd = (store.meta(rid).get("fp_metrics") or {}).get("fd_digits")
                if fp_fd is not None:
                    break
        return table, ids, plots.rd_figure(table, fp_fd, current)

    def status_text(a) -> str:
        s = a.settings
        el = time.time() - a.t0
        done = len(a.rows)
        head = f"**{s.method} W{s.bits}** — "
        if a.phase == "calibrating" and a.total_steps and done >= a.total_steps:
            return head + f"calibration done ({done} steps), measuring block MSE vs FP… ({el:.0f} s)"
        if a.phase == "calibrating" and a.total_steps:
            r = a.rows[-1]
            eta = el / max(done, 1) * (a.total_steps - done)
            return (head + f"step {done}/{a.total_steps}, loss {r['loss']:.4g}, frozen {100 * r['frozen_frac']:.1f}%, "
                           f"{el:.0f} s elapsed, ~{eta:.0f} s of calibration left"
                           + (" — **cancelling…**" if a.stop.is_set() else ""))
        return head + f"{a.phase}… ({el:.0f} s)" + (" — **cancelling…**" if a.stop.is_set() else "")

    def stream_run(s: RunSettings):
        try:
            a = engine.start_run(s)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e), print_exception=False)
        live_rev = f"live-{a.t0}"
        yield status_text(a), plots.calibration_figure(None), gr.skip(), gr.skip(), gr.skip()
        last = time.time()
        while not a.done.wait(timeout=0.2):
            if time.time() - last >= 1.0:  # throttle: ~1 figure per second
                last = time.time()
                fig = plots.calibration_figure(a.steps_frame(), title="Live calibration", uirevision=live_rev,
                                               total_steps=a.total_steps)
                yield status_text(a), fig, gr.skip(), gr.skip(), gr.skip()
        if a.error is not None:
            raise gr.Error(f"{s.method} W{s.bits} failed: {a.error}", print_exception=False)
        table, ids, rd = runs_outputs(a.run_id)
        m = store.meta(a.run_id)
        met = m.get("metrics") or {}
        extra = ", ".join(f"{k} {met[k]:.3g}" for k in ("accuracy", "fd_digits", "psnr") if met.get(k) is not None)
        msg = (f"**Saved `{a.run_id}`** — {m['status']} after {m.get('steps_done') or 0}/{m.get('total_steps') or 0} "
               f"steps in {m['seconds']:.0f} s; {m['bits_per_weight']:.3f} bits/weight, block MSE {m['block_mse']:.4g}"
               + (f"; {extra}" if extra else "") + ". Loaded into every view.")
        fig = plots.calibration_figure(a.steps_frame(), title=f"Calibration of {a.run_id}", uirevision=live_rev,
                                       total_steps=a.total_steps)
        yield msg, fig, table, gr.update(choices=ids, value=a.run_id), rd

    def run(method, bits, k, d, n, iters, steps, km, lr_l, lr_c, lam, seed):
        try:
            s = settings_from(method, bits, k, d, n, iters, steps, km, lr_l, lr_c, lam, seed)
            s.config()
        except (ValueError, TypeError) as e:
            raise gr.Error(f"Invalid settings: {e}", print_exception=False)
        yield from stream_run(s)

    def run_missing(sel, method, bits, k, d, n, iters, steps, km, lr_l, lr_c, lam, seed):
        """Run the method missing from the conflict comparison, at the selected run's bits."""
        if not sel or not sel.get("run"):
            raise gr.Error("Select a run first.", print_exception=False)
        _, missing = views.conflict_pair(sel["run"])
        if not missing:
            raise gr.Error("Both sides of the comparison already exist.", print_exception=False)
        rb = int(store.meta(sel["run"])["bits"])
        kk, dd = VQ_PRESETS[rb] if rb in VQ_PRESETS else (k, d)
        yield from run(missing, rb, kk, dd, n, iters, steps, km, lr_l, lr_c, lam, seed)

    def cancel():
        a = engine.active
        if a is None or a.done.is_set():
            return "No run in progress."
        a.stop.set()
        return (f"**Cancelling {a.settings.method} W{a.settings.bits}** — calibration stops after the current "
                f"optimizer step; the partial trace and model are saved.")

    def load_run(run_id, sel):
        """Run dropdown changed: new choices for block/layer/snapshot, run-level plots, downloads."""
        if not run_id:
            new = views.initial_selection(None)
            m = plots.message_figure("No run selected.")
            return (gr.update(choices=[], value=None), gr.update(choices=[], value=None),
                    gr.update(maximum=1, value=0), new, m, None, None)
        try:
            views.trace(run_id)
            new = views.initial_selection(run_id, (sel or {}).get("block"), (sel or {}).get("layer"))
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)
        n_blocks = int(store.meta(run_id).get("n_blocks") or engine.n_blocks)
        steps = views.steps_of(run_id)
        return (gr.update(choices=[(f"block {b}", b) for b in range(n_blocks)], value=new["block"]),
                gr.update(choices=views.layer_choices(run_id, new["block"]), value=new["layer"]),
                gr.update(minimum=0, maximum=max(len(steps) - 1, 1), value=new["snap"], interactive=len(steps) > 1,
                          label=f"Snapshot (0 = k-means init … {len(steps) - 1} = final)"),
                new, views.calibration(run_id),
                store.export_zip(run_id, "trace"), store.export_zip(run_id, "model"))

    def on_block(sel, block):
        if not sel or not sel.get("run") or block is None:
            return gr.skip(), gr.skip()
        new = views.initial_selection(sel["run"], int(block), sel.get("layer"))
        new["snap"] = sel.get("snap", new["snap"])
        return gr.update(choices=views.layer_choices(sel["run"], new["block"]), value=new["layer"]), new

    def on_layer(sel, layer):
        if not sel or not layer:
            return gr.skip()
        return dict(sel, layer=layer)

    def on_snap(sel, snap):
        if not sel:
            return gr.skip()
        return dict(sel, snap=int(snap))

    def on_cell(sel, evt: gr.SelectData):
        """A cell of the per-block table: that block + layer kind becomes the current layer."""
        if not sel or not sel.get("run"):
            return gr.skip(), gr.skip(), gr.skip()
        row, col = evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, 0)
        cols = ["block"] + plots.LAYER_COLUMNS
        kind = cols[col] if 0 < col < len(cols) else plots.short_layer(sel.get("layer") or "")
        choices = views.layer_choices(sel["run"], int(row))
        layer = next((v for _, v in choices if plots.short_layer(v) == kind), None)
        if layer is None:
            return gr.skip(), gr.skip(), gr.skip()
        new = dict(sel, block=int(row), layer=layer)
        return gr.update(value=int(row)), gr.update(choices=choices, value=layer), new

    def on_run_row(evt: gr.SelectData):
        table = store.table()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(table):
            return gr.skip()
        if str(table.iloc[row]["status"]).startswith("unreadable"):
            gr.Warning(f"Run {table.iloc[row]['run']} is unreadable ({table.iloc[row]['status']}): skipped.")
            return gr.skip()
        return gr.update(value=table.iloc[row]["run"])

    def render_layer_views(sel, color_by, projection):
        try:
            cfig, cnote = views.cluster(sel, color_by, projection)
            efig = views.evolution(sel)
            note, missing, kfig, wfig = views.conflicts(sel)
            heat, table, mse = views.changes(sel)
            desc = views.describe(sel)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)
        btn = gr.update(visible=missing is not None, value=f"Run {missing} at these bits" if missing else "Run")
        return desc, cfig, cnote, efig, note, btn, kfig, wfig, heat, table, mse

    def render_cluster(sel, color_by, projection):
        try:
            return views.cluster(sel, color_by, projection)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)

    def make_images(run_id, labels, seed, guidance, steps):
        try:
            return views.images(run_id, labels, seed, guidance, steps)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)

    def refresh_runs(sel):
        table, ids, rd = runs_outputs((sel or {}).get("run"))
        cur = (sel or {}).get("run")
        value = cur if cur in ids else (ids[-1] if ids else None)
        return table, gr.update(choices=ids, value=value), rd

    def preset(bits):
        k, d = VQ_PRESETS.get(int(bits), (None, None))
        return gr.update(value=k), gr.update(value=d)

    # -------------------------------------------------------------------------------------
    # Layout
    # -------------------------------------------------------------------------------------
    ids = store.readable_ids()
    with gr.Blocks(title="VQ4DiT explorer") as demo:
        gr.Markdown(f"## VQ4DiT explorer — vector-quantized Diffusion Transformer\n"
                    f"Model: `{engine.cfg.model}` ({engine.n_blocks} transformer blocks, {engine.n_classes} classes, "
                    f"device {engine.device}) · runs dir: `{store.root}`")
        sel = gr.State(views.initial_selection(None))
        with gr.Row(equal_height=True):
            run_dd = gr.Dropdown(label="Run", choices=ids, value=None, scale=3, interactive=True,
                                 allow_custom_value=True)  # load_run validates the id itself
            block_dd = gr.Dropdown(label="Block", choices=[], scale=1, interactive=True)
            layer_dd = gr.Dropdown(label="Layer", choices=[], scale=2, interactive=True)
            snap_sl = gr.Slider(label="Snapshot", minimum=0, maximum=1, step=1, value=0, scale=3)
        sel_md = gr.Markdown(views.describe(None))

        with gr.Tabs():
            with gr.Tab("Set up & calibrate"):
                with gr.Row():
                    bits = gr.Slider(label="Bit-width (index bits per weight)", minimum=2, maximum=4, step=1, value=2)
                    method = gr.Dropdown(label="Method", choices=list(METHODS), value="vq4dit")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        k_nb = gr.Number(label="k (codewords, power of 2)", value=VQ_PRESETS[2][0], precision=0)
                        d_nb = gr.Number(label="d (sub-vector length)", value=VQ_PRESETS[2][1], precision=0)
                        n_nb = gr.Number(label="candidates n", value=2, precision=0)
                        km_nb = gr.Number(label="k-means iterations", value=engine.kmeans_default, precision=0)
                    with gr.Row():
                        it_nb = gr.Number(label="iterations (trajectories)", value=cd["iterations"], precision=0)
                        st_nb = gr.Number(label="sampling steps per trajectory", value=cd["num_sampling_steps"], precision=0)
                        seed_nb = gr.Number(label="seed", value=0, precision=0)
                    with gr.Row():
                        lrl_nb = gr.Number(label="learning rate: assignment logits", value=cd["lr_logits"])
                        lrc_nb = gr.Number(label="learning rate: codebooks", value=cd["lr_codebook"])
                        lam_nb = gr.Number(label="lambda_r (ratio regularizer weight)", value=cd["lambda_r"])
                    gr.Markdown("Defaults: the library's calibration recipe for this model; one optimizer step per "
                                "sampling step, so a run takes iterations × sampling steps steps. Changing the "
                                "bit-width resets k and d to the paper's preset (2: 256×4, 3: 64×2, 4: 256×2).")
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary")
                    cancel_btn = gr.Button("Cancel", variant="stop")
                status_md = gr.Markdown("Idle. Press **Run** to quantize and calibrate the model.")
                live_plot = gr.Plot(label="Calibration curves", value=views.calibration(None))
                gr.Markdown(CAPTIONS["setup"])
            with gr.Tab("Codebook clusters"):
                with gr.Row():
                    color_by = gr.Radio(label="Colour sub-vectors by", value="codeword",
                                        choices=["codeword", "top ratio", "assignment changed"])
                    projection = gr.Radio(label="Projection (d > 2)", value="PCA", choices=["PCA", "UMAP"])
                cluster_plot = gr.Plot(label="Sub-vectors and codewords")
                cluster_note = gr.Markdown()
                gr.Markdown(CAPTIONS["clusters"])
            with gr.Tab("Assignment evolution"):
                evol_plot = gr.Plot(label="Assignment ratios over calibration")
                gr.Markdown(CAPTIONS["evolution"])
            with gr.Tab("Gradient conflicts"):
                conflict_note = gr.Markdown()
                other_btn = gr.Button("Run", visible=False, variant="secondary")
                conflict_plot = gr.Plot(label="Gradient coherence per codeword")
                worst_plot = gr.Plot(label="Worst codeword's gradients")
                gr.Markdown(CAPTIONS["conflicts"])
            with gr.Tab("Per-block changes"):
                with gr.Row():
                    heat_plot = gr.Plot(label="Assignment changes vs k-means", scale=3)
                    mse_plot = gr.Plot(label="Per-block MSE", scale=2)
                changes_df = gr.Dataframe(label="Changed codewords (% of sub-vectors) — click a cell to select that layer",
                                          interactive=False, max_height=320)
                gr.Markdown(CAPTIONS["changes"])
            with gr.Tab("Images"):
                with gr.Row():
                    labels_tb = gr.Textbox(label="Class labels", value="0-9" if engine.n_classes >= 10 else "0",
                                           info="comma-separated or ranges, e.g. 0-9 or 3,3,7")
                    img_seed = gr.Number(label="Image seed", value=0, precision=0)
                    guidance = gr.Slider(label="Guidance scale", minimum=1.0, maximum=10.0, step=0.5, value=4.0)
                    img_steps = gr.Number(label="Sampler steps", value=engine.cfg.image_steps, precision=0)
                gen_btn = gr.Button("Generate images", variant="primary")
                image_out = gr.Image(label="Samples: FP vs quantized", type="numpy", interactive=False, elem_id="samples",
                                     buttons=["download", "fullscreen"])
                image_note = gr.Markdown()
                image_metrics = gr.Dataframe(label="Image metrics", interactive=False)
                gr.Markdown(CAPTIONS["images"])
            with gr.Tab("Runs"):
                runs_df = gr.Dataframe(label="Saved runs (click a row to load it)", value=store.table(),
                                       interactive=False, max_height=360)
                with gr.Row():
                    refresh_btn = gr.Button("Refresh list")
                    dl_trace = gr.DownloadButton("Download trace (CSV zip)", value=None)
                    dl_model = gr.DownloadButton("Download packed model (zip)", value=None)
                rd_plot = gr.Plot(label="Rate-distortion across runs")
                gr.Markdown(CAPTIONS["runs"])

        # ---------------------------------------------------------------------------------
        # Events
        # ---------------------------------------------------------------------------------
        setup_inputs = [method, bits, k_nb, d_nb, n_nb, it_nb, st_nb, km_nb, lrl_nb, lrc_nb, lam_nb, seed_nb]
        run_outputs = [status_md, live_plot, runs_df, run_dd, rd_plot]
        image_inputs = [run_dd, labels_tb, img_seed, guidance, img_steps]
        image_outputs = [image_out, image_metrics, image_note]
        layer_outputs = [sel_md, cluster_plot, cluster_note, evol_plot, conflict_note, other_btn, conflict_plot,
                         worst_plot, heat_plot, changes_df, mse_plot]

        bits.change(preset, bits, [k_nb, d_nb], queue=False)
        run_btn.click(run, setup_inputs, run_outputs, api_name="run", **MODEL_QUEUE).success(
            make_images, image_inputs, image_outputs, **MODEL_QUEUE)
        other_btn.click(run_missing, [sel] + setup_inputs, run_outputs, api_name="run_missing", **MODEL_QUEUE).success(
            make_images, image_inputs, image_outputs, **MODEL_QUEUE)
        cancel_btn.click(cancel, None, status_md, api_name="cancel", concurrency_limit=None)
        gen_btn.click(make_images, image_inputs, image_outputs, api_name="images", **MODEL_QUEUE)

        run_dd.change(load_run, [run_dd, sel], [block_dd, layer_dd, snap_sl, sel, live_plot, dl_trace, dl_model],
                      api_name="load_run")
        block_dd.input(on_block, [sel, block_dd], [layer_dd, sel])
        layer_dd.input(on_layer, [sel, layer_dd], sel)
        snap_sl.release(on_snap, [sel, snap_sl], sel)
        changes_df.select(on_cell, sel, [block_dd, layer_dd, sel])
        runs_df.select(on_run_row, None, run_dd)
        sel.change(render_layer_views, [sel, color_by, projection], layer_outputs, concurrency_limit=4)
        color_by.change(render_cluster, [sel, color_by, projection], [cluster_plot, cluster_note])
        projection.change(render_cluster, [sel, color_by, projection], [cluster_plot, cluster_note])
        refresh_btn.click(refresh_runs, sel, [runs_df, run_dd, rd_plot], api_name="list_runs")
        demo.load(refresh_runs, sel, [runs_df, run_dd, rd_plot])
    demo.views = views  # for tests and scripting
    demo.engine = engine
    return demo
