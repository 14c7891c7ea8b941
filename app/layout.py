"""The Gradio page: `build_layout` makes the components, `wire` connects their events to the
named handlers in handlers.py. All model work shares one queue slot.

Shared selection (LIT style): the `sel` State {run, block, layer, snap}, edited by the selection
bar (Run / Block / Layer / Snapshot), the per-block table and the Runs table; the visible tab's
views re-render from it on `sel.change`. The selection and the tab live in the URL (url_state.py):
a page load restores them; opening a tab that is up to date asks the server nothing.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from vq4dit.config import DEFAULT_METHOD, VQ_PRESETS

from .config import app_methods
from .engine import Engine
from .forms import ImageForm, SetupForm, ViewForm, form_event, form_inputs
from .handlers import LAYER_VIEWS, Handlers
from .handlers_runs import AUTO_COMPARE
from .live import LIVE_POKE_JS, LIVE_REFRESH_S, live_tick
from .text import method_description, methods_table, setting_choices
from .url_state import SET_URL_JS, TAB_JS, WRITE_URL_JS
from .views import FULL_CLUSTER_MAX, IMAGE_METRICS_COLUMNS, SIDE_BY_SIDE_COLUMNS, SIDE_BY_SIDE_MAX, Views

MODEL_QUEUE = dict(concurrency_id="model", concurrency_limit=1)  # one device job at a time

CAPTIONS = {
    "setup": (
        "**How to read this.** VQ4DiT replaces every weight sub-vector of length *d* by one of *k* codewords "
        "(bits/weight = log2(k)/d). Calibration then runs the full-precision model (the *teacher*) on random "
        "noise and nudges codewords and assignments so each transformer block's output matches the teacher's. "
        "Left: output error of each block (blue lines) and their mean (red) — lower is better. Middle: the "
        "regularizer L_r, which is 0 when every sub-vector has committed to one codeword. Right: share of "
        "sub-vectors already frozen to their codeword. Curves update about once a second while a run is going. "
        "The sawtooth of the block-MSE curve is one teacher trajectory per tooth (25 sampler steps: each starts "
        "from pure noise, where blocks are hardest to match), not instability. If the frozen share stays at 0 "
        "until the last step, progressive freezing never happened at this budget: every layer was made hard at "
        "the end (the *Mechanism* tab says so per run)."),
    "clusters": (
        "**How to read this.** Each dot is one weight sub-vector (a fixed random sample), each black cross a "
        "codeword; grey rings mark where the codewords started (k-means). Every dot is replaced by the codeword "
        "it is assigned to, so dots far from their cross mean a large weight error. Move the *Snapshot* slider "
        "to watch codewords move during calibration. *Colour by assignment changed* shows the sub-vectors that "
        "calibration moved to a different codeword than k-means chose — the thing codebook-only calibration "
        "cannot do. PCA is instant; UMAP is computed once per run and layer (a few seconds) and then cached. "
        "*All sub-vectors of the final model* replaces the sample by every sub-vector of the layer (up to 200,000) "
        "as a density image (darker = more sub-vectors), with the final codewords."),
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
        "mean). Right: share of sub-vector gradients pointing against their codeword's sum (each sub-vector is "
        "included in its own codeword's sum here, which biases it toward agreement; the *Mechanism* tab reads the "
        "unbiased leave-one-out version against a random-regrouping null and says whether there is an effect). "
        "Bottom: the least coherent codeword's gradients as arrows (projected to 2-D by PCA when d > 2); orange "
        "arrows oppose the sum."),
    "mechanism": (
        "**How to read this.** The paper's argument: sub-vectors sharing a codeword pull it in conflicting "
        "directions, so calibrating codebooks alone fails, and letting sub-vectors move to another codeword "
        "fixes it. Each line above tests one step of that on this run and its pair (same k×d, init and seed; "
        "codebook-only vs an assignment-training method), with a 95% interval over layers or blocks: "
        "**effect** only where the interval excludes 0, otherwise **no effect at this setting**. Left: per layer, "
        "the share of sub-vectors whose gradient points against the rest of its codeword (leave-one-out) at the "
        "first logged step, next to the share a random regrouping of the same gradients into codewords of the "
        "same sizes gives. Right: block-output MSE of the two runs (lower is better). The calibration curve's "
        "sawtooth in Set-up is one teacher trajectory per cycle (noisy, early timesteps first), not instability."),
    "changes": (
        "**How to read this.** Each cell is one layer (q, k, v attention projections shown separately, out "
        "projection, MLP fc1/fc2, adaLN modulation) of one transformer block: the % of its sub-vectors whose "
        "codeword at the selected snapshot differs from the one the run started from (step 0, so snapshot 0 "
        "reads 0; white = none). With a run picked in "
        "*Compare with*, the right panel shows this run minus that run's final map (red = this run changed more). "
        "Click a cell of the heatmap or of the table below to make that layer the current layer in every view. "
        "Right: block-output MSE against the FP model on held-out noise (bars; hatched = the compared "
        "run) and at the last calibration step (diamonds)."),
    "images": (
        "**How to read this.** Rows: the full-precision model (FP, the reference), the selected run and the "
        "run picked in *Compare with* (or, when none is picked, the newest finished run of every other method at "
        "the same bits), all sampled from the same noise, labels and sampler. Under each image, the digit classifier's prediction (green = the requested class, red with "
        "'!' = wrong). Below each quantized row, the per-pixel absolute difference to FP (white = identical, "
        "red = off by half the intensity range or more). Table: class accuracy, PSNR and MSE vs FP (the same "
        "noise, so any difference is the quantization's). FD-digits is not shown here: it needs >= 1,000 images "
        "to mean anything (see the README's benchmark)."),
    "runs": (
        "**How to read this.** Every finished or cancelled run is saved in the runs directory (trace, packed "
        "model, metrics) and listed here, newest first; unreadable directories are listed as such. Click a row "
        "(or a point of the plots) to load that run into every view. Demo runs ship with the app and are read-only. "
        "Plots: bits per weight (storage as packed: indices, codebooks, "
        "biases) against image MSE vs FP on the fixed evaluation set and against block-output MSE — points "
        "further down and left are better. FD-digits is listed only for evaluations of >= 1,000 images."),
}


def build_layout(engine: Engine, views: Views, init: Optional[dict] = None) -> SimpleNamespace:
    """The page's components, no behaviour. Returns them by name: `ui.demo`, `ui.setup` (the
    SetupForm's components), `ui.images` (ImageForm), `ui.view` (ViewForm) and the rest flat.
    `init` (`Handlers.first_open()`): what the page shows before any event, so the first paint
    already has data (the default run, usually a read-only demo run)."""
    store = engine.store
    cd = engine.calib_defaults
    init = init or {}
    su = init.get("setup") or {}   # the default run's settings, so Set-up matches the run on screen
    lv = dict(zip(LAYER_VIEWS, init.get("layer_views") or [None] * len(LAYER_VIEWS)))
    upd = lambda name, **default: {**default, **{k: v for k, v in (init.get(name) or {}).items() if k != "__type__"}}
    with gr.Blocks(title="VQ4DiT explorer") as demo:
        gr.Markdown(f"## VQ4DiT explorer — vector-quantized Diffusion Transformer\n"
                    f"Model: `{engine.cfg.model}` ({engine.n_blocks} transformer blocks, {engine.n_classes} classes, "
                    f"device {engine.device}) · runs dir: `{store.root}`")
        sel = gr.State(init.get("sel") or views.initial_selection(None))
        live_timer = gr.Timer(LIVE_REFRESH_S)  # the live run's new snapshots, when it is the selected run
        live_poke = gr.Textbox("", visible=False)  # changed by the page's script only while the URL's run is live
        with gr.Row(equal_height=True):
            run_dd = gr.Dropdown(label="Run", choices=views.run_choices(), value=init.get("run"), scale=3,
                                 interactive=True, allow_custom_value=True)  # load_run validates the id itself
            block_dd = gr.Dropdown(label="Block", scale=1, interactive=True, **upd("block", choices=[]))
            layer_dd = gr.Dropdown(label="Layer", scale=2, interactive=True, **upd("layer", choices=[]))
            snap_sl = gr.Slider(step=1, scale=3, elem_id="snap-slider",
                                **upd("snap", label="Snapshot", minimum=0, maximum=1, value=0))
            compare_dd = gr.Dropdown(label="Compare with", choices=[AUTO_COMPARE] + views.run_choices(), value="",
                                     scale=3, interactive=True, allow_custom_value=True,  # on_compare checks it
                                     info="any run, any bits; cancelled runs are used only when picked here")
        sel_md = gr.Markdown(lv["sel_md"] or views.describe(None))
        tab = gr.State(None)                               # API clients: no tab, every view is drawn
        rendered = gr.State(init.get("rendered") or {})    # per tab: the selection its views show
        # set by the page's scripts (TAB_JS), never by the server unless a page load restores a tab:
        tab_tb = gr.Textbox("setup", visible=False)        # the visible tab's id
        stale_tb = gr.Textbox("", visible=False)           # "tab:time" when that tab must be redrawn
        shown_tb = gr.Textbox("", visible=False)           # "images:time" when Images opens with no picture
        url_tb = gr.Textbox("", visible=False)             # the restored state's URL query, after a page load
        view_state = gr.HTML(init.get("view_state") or "{}", html_template="<span style='display:none'>${value}</span>",
                             elem_id="view-state", padding=False, container=False, min_height=0,
                             visible="hidden")  # in the DOM for the scripts, no space in the layout
        api_render = gr.Button(visible=False)              # /render_layer_views for API clients
        # plot clicks from the page's script (CLICK_JS) arrive here as JSON
        click_tb = gr.HTML("", html_template="<span style='display:none'>${value}</span>", js_on_load=CLICK_JS,
                           elem_id="plot-click", padding=False, container=False, min_height=0,
                           visible="hidden")

        with gr.Tabs() as tabs:
            with gr.Tab("Set up & calibrate", id="setup"):
                with gr.Row():
                    bits = gr.Slider(label="Bit-width (index bits per weight)", minimum=2, maximum=4, step=1,
                                     value=su.get("bits", 2))
                    setting = gr.Dropdown(label="Setting (k codewords × d)", choices=setting_choices(), value=su.get("setting", "W2"),
                                          info="XL-sharing: as many sub-vectors per codeword as DiT-XL/2 at W2")
                    method = gr.Dropdown(label="Method", choices=app_methods(), value=su.get("method", DEFAULT_METHOD),
                                         info="vq4dit's methods, then the peer libraries installed here")
                method_md = gr.Markdown(method_description(su.get("method", DEFAULT_METHOD)))
                with gr.Accordion("What the methods are", open=False):
                    gr.Markdown(methods_table())
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        k_nb = gr.Number(label="k (codewords, power of 2)", value=su.get("k", VQ_PRESETS[2][0]), precision=0)
                        d_nb = gr.Number(label="d (sub-vector length)", value=su.get("d", VQ_PRESETS[2][1]), precision=0)
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
                                "bit-width or the setting resets k and d (W2: 256×4, W2-budget: 64×4, XL-sharing: 16×4, "
                                "W3: 64×2, W4: 256×2).")
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary")
                    cancel_btn = gr.Button("Cancel", variant="stop", interactive=False)  # enabled while a run goes
                estimate_md = gr.Markdown()
                status_md = gr.Markdown("Idle. Press **Run** to quantize and calibrate the model.")
                live_plot = gr.Plot(label="Calibration curves", value=init.get("live") or views.calibration(None))
                gr.Markdown(CAPTIONS["setup"])
            with gr.Tab("Codebook clusters", id="clusters"):
                with gr.Row():
                    color_by = gr.Radio(label="Colour sub-vectors by", value="codeword",
                                        choices=["codeword", "top ratio", "assignment changed", "gradient agreement"])
                    projection = gr.Radio(label="Projection (d > 2)", value="PCA", choices=["PCA", "UMAP"])
                    full_cb = gr.Checkbox(label="All sub-vectors of the final model (density image)", value=False,
                                          info=f"up to {FULL_CLUSTER_MAX:,} points, from the weights; snapshots and UMAP "
                                               f"keep the trace's sample")
                cluster_plot = gr.Plot(label="Sub-vectors and codewords", value=lv["cluster_plot"])
                cluster_note = gr.Markdown(lv["cluster_note"])
                gr.Markdown(CAPTIONS["clusters"])
            with gr.Tab("Assignment evolution", id="evolution"):
                evol_plot = gr.Plot(label="Assignment ratios over calibration", value=lv["evol_plot"])
                evol_cmp_plot = gr.Plot(label="Assignment ratios of the compared run", visible=False)
                gr.Markdown(CAPTIONS["evolution"])
            with gr.Tab("Mechanism", id="mechanism"):
                mech_md = gr.Markdown(lv["mech_md"])
                mech_plot = gr.Plot(label="Mechanism measures", value=lv["mech_plot"])
                gr.Markdown(CAPTIONS["mechanism"])
            with gr.Tab("Gradient conflicts", id="conflicts"):
                conflict_note = gr.Markdown(lv["conflict_note"])
                other_btn = gr.Button(variant="secondary", **{**dict(value="Run", visible=False),
                                                              **{k: v for k, v in (lv["other_btn"] or {}).items()
                                                                 if k != "__type__"}})
                conflict_plot = gr.Plot(label="Gradient coherence per codeword", value=lv["conflict_plot"])
                summary_md = gr.Markdown(lv["summary_md"])
                summary_plot = gr.Plot(label="Model-wide conflict summary", value=lv["summary_plot"])
                worst_plot = gr.Plot(label="Worst codeword's gradients", value=lv["worst_plot"])
                gr.Markdown(CAPTIONS["conflicts"])
            with gr.Tab("Per-block changes", id="changes"):
                with gr.Row():
                    heat_plot = gr.Plot(label="Assignment changes since the run's start (click a cell to select that layer)", scale=3,
                                        value=lv["heat_plot"], elem_id="heat-plot")
                    mse_plot = gr.Plot(label="Per-block MSE", scale=2, value=lv["mse_plot"])
                changes_df = gr.Dataframe(label="Changed codewords (% of sub-vectors) — click a cell to select that layer",
                                          interactive=False, max_height=320, value=lv["changes_df"])
                gr.Markdown(CAPTIONS["changes"])
            with gr.Tab("Images", id="images"):
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
                image_metrics = gr.Dataframe(label="Image metrics", interactive=False, headers=IMAGE_METRICS_COLUMNS)
                gr.Markdown(CAPTIONS["images"])
            with gr.Tab("Runs", id="runs"):
                runs_df = gr.Dataframe(label="Saved runs (click a row to load it)", value=store.table(),
                                       interactive=False, max_height=360)
                with gr.Row():
                    refresh_btn = gr.Button("Refresh list")
                    dl_trace = gr.DownloadButton("Download trace (CSV zip)", value=init.get("dl_trace"))
                    dl_model = gr.DownloadButton("Download packed model (zip)", value=init.get("dl_model"))
                rd_plot = gr.Plot(label="Rate-distortion across runs (click a point to load that run)", value=init.get("rd"),
                                  elem_id="rd-plot")
                with gr.Column(elem_id="side-by-side"):
                    runs_pick = gr.CheckboxGroup(label=f"Runs side by side (tick up to {SIDE_BY_SIDE_MAX})",
                                                 choices=views.run_choices(), value=[], elem_id="runs-pick",
                                                 info="each labelled by method, k×d and bits/weight")
                    side_md = gr.Markdown("Tick two or more runs above to see them side by side.")
                    side_plot = gr.Plot(label="Key metrics side by side", elem_id="side-plot")
                    side_df = gr.Dataframe(label="Picked runs", interactive=False, elem_id="side-table",
                                           headers=SIDE_BY_SIDE_COLUMNS)
                    side_btn = gr.Button("Images side by side", variant="secondary")
                    side_img = gr.Image(label="Images side by side: FP and each picked run, same noise and labels",
                                        type="numpy", interactive=False, elem_id="side-images",
                                        buttons=["download", "fullscreen"])
                    side_img_df = gr.Dataframe(label="Image metrics of the picked runs", interactive=False,
                                               headers=IMAGE_METRICS_COLUMNS)
                gr.Markdown(CAPTIONS["runs"])

    return SimpleNamespace(
        demo=demo, sel=sel, live_timer=live_timer, live_poke=live_poke, tab=tab, rendered=rendered, tab_tb=tab_tb, stale_tb=stale_tb, shown_tb=shown_tb, url_tb=url_tb,
        view_state=view_state, api_render=api_render, runs_pick=runs_pick, side_md=side_md, side_plot=side_plot,
        side_df=side_df, side_btn=side_btn, side_img=side_img, side_img_df=side_img_df, click_tb=click_tb, setting=setting, run_dd=run_dd, compare_dd=compare_dd, evol_cmp_plot=evol_cmp_plot, block_dd=block_dd, layer_dd=layer_dd, snap_sl=snap_sl, sel_md=sel_md,
        method_md=method_md, run_btn=run_btn, cancel_btn=cancel_btn, status_md=status_md, live_plot=live_plot,
        cluster_plot=cluster_plot, cluster_note=cluster_note, evol_plot=evol_plot, conflict_note=conflict_note,
        other_btn=other_btn, conflict_plot=conflict_plot, worst_plot=worst_plot, heat_plot=heat_plot,
        mse_plot=mse_plot, changes_df=changes_df, gen_btn=gen_btn, image_out=image_out, image_note=image_note,
        image_metrics=image_metrics, runs_df=runs_df, refresh_btn=refresh_btn, dl_trace=dl_trace,
        dl_model=dl_model, rd_plot=rd_plot, estimate_md=estimate_md, tabs=tabs,
        summary_plot=summary_plot, summary_md=summary_md, mech_md=mech_md, mech_plot=mech_plot,
        setup=SimpleNamespace(method=method, bits=bits, k=k_nb, d=d_nb, n_candidates=n_nb, iterations=it_nb,
                              sampling_steps=st_nb, kmeans_iters=km_nb, lr_logits=lrl_nb, lr_codebook=lrc_nb,
                              lambda_r=lam_nb, seed=seed_nb),
        images=SimpleNamespace(run=run_dd, labels=labels_tb, seed=img_seed, guidance=guidance, steps=img_steps,
                               compare=compare_dd),
        view=SimpleNamespace(sel=sel, color_by=color_by, projection=projection, full=full_cb),
    )


# Plotly clicks -> the `click_tb` HTML component's value + its input event (gr.Plot has only a
# change event in Gradio 6). Every 500 ms the heatmap and rate-distortion plots get a plotly_click
# listener if they lack one (plotly re-creates its event emitter when a figure is replaced).
CLICK_JS = """
const send = (msg) => { props.value = JSON.stringify(Object.assign(msg, {t: Date.now()})); trigger('input'); };
const bind = () => {
  for (const [id, plot] of [['heat-plot', 'heat'], ['rd-plot', 'rd']]) {
    const gd = document.querySelector('#' + id + ' .js-plotly-plot');
    if (!gd || typeof gd.on !== 'function' || gd.on.__vqClick) continue;
    gd.on('plotly_click', (e) => {
      const p = e && e.points && e.points[0];
      if (p) send({plot: plot, x: p.x, y: p.y, id: p.customdata === undefined ? null : p.customdata});
    });
    gd.on.__vqClick = true;
  }
};
setInterval(bind, 500);
document.addEventListener('keydown', (e) => {   // Enter in the snapshot's number box = release
  if (e.key === 'Enter' && e.target && e.target.type === 'number' && e.target.closest('#snap-slider')) e.target.blur();
});
"""


def wire(ui: SimpleNamespace, h: Handlers):
    """Connect every event to its handler (inside the Blocks context)."""
    setup = form_inputs(SetupForm, ui.setup)
    images = form_inputs(ImageForm, ui.images)
    view = form_inputs(ViewForm, ui.view)
    run_outputs = [ui.status_md, ui.live_plot, ui.runs_df, ui.run_dd, ui.rd_plot]
    image_outputs = [ui.image_out, ui.image_metrics, ui.image_note]
    layer_outputs = [getattr(ui, n) for n in LAYER_VIEWS]
    view_plots = [ui.cluster_plot, ui.evol_plot, ui.conflict_plot, ui.summary_plot, ui.worst_plot, ui.heat_plot,
                  ui.mse_plot, ui.changes_df]  # loading overlay on these while the selection changes
    make_images = form_event(h.make_images, ImageForm)
    render_cluster = form_event(h.render_cluster, ViewForm)

    run_buttons = [ui.run_btn, ui.other_btn, ui.cancel_btn]
    ui.setup.bits.input(h.preset, [ui.setup.bits, ui.setup.method],
                        [ui.setting, ui.setup.k, ui.setup.d, ui.run_dd, ui.status_md],
                        queue=False, api_name="bits")  # user moves only (load_run sets bits too)
    ui.setting.input(h.choose_setting, [ui.setting, ui.setup.method],
                     [ui.setup.bits, ui.setup.k, ui.setup.d, ui.run_dd, ui.status_md], queue=False, api_name="setting")
    ui.setup.method.change(h.describe_method, ui.setup.method, ui.method_md, queue=False)
    ui.setup.method.input(h.choose_setting, [ui.setting, ui.setup.method],  # the same run lookup as the slider
                          [ui.setup.bits, ui.setup.k, ui.setup.d, ui.run_dd, ui.status_md], queue=False,
                          api_name="method")
    estimate = form_event(h.estimate, SetupForm)
    gr.on([c.change for c in setup], estimate, setup, ui.estimate_md, queue=False,
          trigger_mode="always_last", api_name="estimate")
    for btn, fn, inputs, name in ((ui.run_btn, form_event(h.run, SetupForm), setup, "run"),
                                  (ui.other_btn, form_event(h.run_missing, SetupForm, lead=1), [ui.sel] + setup,
                                   "run_missing")):
        ran = btn.click(h.lock_run, None, run_buttons, queue=False).then(
            fn, inputs, run_outputs, api_name=name, **MODEL_QUEUE)
        ran.success(make_images, images, image_outputs, **MODEL_QUEUE)
        ran.then(h.unlock_run, None, run_buttons, queue=False)
        ran.then(h.compare_choices, ui.sel, ui.compare_dd, queue=False)  # the new run is comparable at once
        ran.then(h.pick_choices, ui.runs_pick, ui.runs_pick, queue=False)  # ... and can be put side by side
        ran.then(estimate, setup, ui.estimate_md, queue=False, api_name=False)  # new timing -> next estimate
    ui.cancel_btn.click(h.cancel, None, ui.status_md, api_name="cancel", concurrency_limit=None)
    ui.gen_btn.click(form_event(h.check_images, ImageForm), images, None, concurrency_limit=None).success(
        make_images, images, image_outputs, api_name="images", **MODEL_QUEUE)

    ui.run_dd.change(h.load_run, [ui.run_dd, ui.sel],
                     [ui.block_dd, ui.layer_dd, ui.snap_sl, ui.sel, ui.live_plot, ui.dl_trace, ui.dl_model],
                     api_name="load_run", show_progress="full",
                     show_progress_on=[ui.live_plot, ui.rd_plot] + view_plots).success(h.run_context, ui.run_dd, [ui.rd_plot] + image_outputs + setup + [ui.setting, ui.status_md],
                                                  api_name="run_context")
    # every view shows it is being redrawn; a newer selection replaces one still waiting (always_last)
    busy = dict(show_progress="full", show_progress_on=view_plots, trigger_mode="always_last")
    ui.block_dd.input(h.on_block, [ui.sel, ui.block_dd], [ui.layer_dd, ui.sel], **busy)
    ui.layer_dd.input(h.on_layer, [ui.sel, ui.layer_dd], ui.sel, **busy)
    # on release (end of a drag; a typed number on Enter or blur), not on every value passed while dragging
    ui.snap_sl.release(h.on_snap, [ui.sel, ui.snap_sl], ui.sel, **busy)
    ui.changes_df.select(h.on_cell, ui.sel, [ui.block_dd, ui.layer_dd, ui.sel], **busy)
    ui.click_tb.input(h.on_plot_click, [ui.sel, ui.click_tb], [ui.block_dd, ui.layer_dd, ui.sel, ui.run_dd],
                      api_name="plot_click", **busy)
    ui.runs_df.select(h.on_run_row, None, ui.run_dd)
    # the page draws the visible tab's views (and tells its script what they show); API clients get all
    page_outputs = layer_outputs + [ui.rendered, ui.view_state]
    ui.sel.change(form_event(h.render_page, ViewForm, lead=2), [ui.tab_tb, ui.rendered] + view, page_outputs,
                  concurrency_limit=4, trigger_mode="always_last", show_progress="full", api_name=False)
    ui.api_render.click(form_event(h.render_layer_views, ViewForm, lead=2), [ui.tab, ui.rendered] + view,
                        layer_outputs + [ui.rendered], api_name="render_layer_views")
    # a tab opened: the script (no server call) notes the tab, writes the URL, and only when that tab's
    # views show another selection (or Images has no picture yet) changes a box that asks the server
    tab_boxes = [ui.tab_tb, ui.stale_tb, ui.shown_tb]
    ui.tabs.select(None, [ui.view_state] + tab_boxes, tab_boxes, js=TAB_JS)
    ui.stale_tb.change(form_event(h.open_tab, ViewForm, lead=2), [ui.stale_tb, ui.rendered] + view, page_outputs,
                       concurrency_limit=4, trigger_mode="always_last", show_progress="full", api_name=False)
    ui.shown_tb.change(form_event(h.auto_images, ImageForm, lead=1), [ui.tab_tb] + images, image_outputs,
                       api_name="auto_images")  # Images opened: shipped / cached images at once
    # the URL follows; a tab opened while its render was under way is drawn after it
    ui.view_state.change(None, [ui.view_state, ui.tab_tb, ui.stale_tb], ui.stale_tb, js=WRITE_URL_JS)
    # the live run: a new snapshot re-issues the selection, then the open tab redraws (a no-op when
    # `rendered` already shows that selection: a timer's State update alone did not redraw in the browser)
    # (the tick itself runs in the page: no server call unless the run in the URL is the live one)
    ui.live_timer.tick(None, ui.live_poke, ui.live_poke, js=LIVE_POKE_JS)
    ui.live_poke.change(partial(live_tick, h.engine, h.views), ui.sel, [ui.snap_sl, ui.sel, ui.run_dd], queue=False,
                        show_progress="hidden", api_name=False).then(
        form_event(h.render_page, ViewForm, lead=2), [ui.tab_tb, ui.rendered] + view, page_outputs,
        concurrency_limit=4, trigger_mode="always_last", show_progress="hidden", api_name=False)
    ui.view.color_by.change(render_cluster, view, [ui.cluster_plot, ui.cluster_note])
    ui.view.projection.change(render_cluster, view, [ui.cluster_plot, ui.cluster_note])
    ui.view.full.change(render_cluster, view, [ui.cluster_plot, ui.cluster_note])
    ui.compare_dd.input(h.on_compare, [ui.sel, ui.compare_dd], [ui.sel] + image_outputs, api_name="compare", **busy)
    # a page load restores the URL's run / block / layer / snapshot / tab (else the defaults), then lists runs
    restored = ui.demo.load(h.restore, ui.sel, [ui.run_dd, ui.block_dd, ui.layer_dd, ui.snap_sl, ui.sel, ui.live_plot,
                                                ui.dl_trace, ui.dl_model, ui.tabs, ui.tab_tb, ui.url_tb], api_name=False)
    restored.then(None, ui.url_tb, None, js=SET_URL_JS)   # the address bar shows what was restored
    for ev in (ui.refresh_btn.click(h.list_runs, ui.sel, [ui.runs_df, ui.run_dd, ui.rd_plot], api_name="list_runs"),
               restored.then(h.list_runs, ui.sel, [ui.runs_df, ui.run_dd, ui.rd_plot], api_name=False)):
        ev.then(h.compare_choices, ui.sel, ui.compare_dd, queue=False)
        ev.then(h.pick_choices, ui.runs_pick, ui.runs_pick, queue=False)
    # runs side by side: metrics at once (and images when shipped / cached); the button samples images
    side_in = [ui.runs_pick] + images
    ui.runs_pick.change(form_event(h.compare_runs, ImageForm, lead=1), side_in,
                        [ui.side_md, ui.side_plot, ui.side_df, ui.side_img, ui.side_img_df], trigger_mode="always_last",
                        api_name="compare_runs")
    ui.side_btn.click(form_event(h.compare_runs_images, ImageForm, lead=1), side_in, [ui.side_img, ui.side_img_df],
                      api_name="compare_runs_images", **MODEL_QUEUE)
    ui.demo.load(estimate, setup, ui.estimate_md, queue=False, api_name=False)
    # plotly sizes a plot drawn in a hidden tab to half width: re-layout on every tab switch
    ui.tabs.select(None, None, None, js="() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }")


def build_app(engine: Engine) -> gr.Blocks:
    views = Views(engine)
    h = Handlers(engine, views)
    ui = build_layout(engine, views, h.first_open())
    with ui.demo:
        wire(ui, h)
    ui.demo.views = views  # for tests and scripting
    ui.demo.engine = engine
    ui.demo.ui = ui
    return ui.demo
