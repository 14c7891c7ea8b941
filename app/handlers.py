"""Behaviour of the page: one named function per event, each taking one form object.

Gradio passes component values positionally; `form_event` turns them into the form dataclass
(`SetupForm`, `ImageForm`, `ViewForm`) so a handler reads `form.bits`, not its 7th argument.
layout.py builds the components and wires events to these handlers; nothing here creates a
component.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import fields, replace

import gradio as gr

from vq4dit.config import INITS, SETTINGS, VQ_PRESETS, setting_kd, settings_for_bits
from vq4dit.naming import layer_kind

from . import plots
from .config import RunRequest, app_methods, image_params, is_peer
from .engine import Engine
from .forms import ImageForm, SetupForm, ViewForm
from .handlers_runs import RunsHandlers
from .store import pair_key, run_label
from .text import estimate_text, method_description, status_text
from .url_state import TAB_VIEWS, page_query, parse_query, selection_key, view_state
from .views import Views

# The outputs of `Handlers.render_layer_views`, in order (names of the ui components); the views each
# tab shows are `TAB_VIEWS` (url_state.py, tab ids as in layout.py; the other tabs show no layer view).
LAYER_VIEWS = ["sel_md", "cluster_plot", "cluster_note", "evol_plot", "evol_cmp_plot", "mech_md", "mech_plot",
               "conflict_note", "other_btn",
               "conflict_plot", "worst_plot", "summary_plot", "summary_md", "heat_plot", "changes_df", "mse_plot"]


def _error(e: Exception) -> gr.Error:
    return gr.Error(str(e), print_exception=False)


# ----------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------


class Handlers(RunsHandlers):
    """Every event of the page. Reads runs through `Views` (and so through the Trace API)."""

    def __init__(self, engine: Engine, views: Views):
        self.engine, self.views, self.store = engine, views, engine.store

    # -- set-up panel ----------------------------------------------------------------------
    def preset(self, bits, method):
        """Bit-width slider moved: the setting becomes the bit-width's first (the paper's preset),
        and `choose_setting` does the rest."""
        name = settings_for_bits(int(bits))[0]
        return (gr.update(value=name), *self.choose_setting(name, method)[1:])

    def choose_setting(self, setting, method):
        """Setting picked (W2, W2-budget, XL-sharing, ...): k and d follow it, and the newest finished
        run of this method with the same k x d (if any) becomes the selected run in every view;
        otherwise the status line offers to calibrate it."""
        k, d = setting_kd(setting)
        bits = SETTINGS[setting]["bits"]
        if is_peer(method):  # a fixed scheme: the setting does not apply to it
            rid = self.views.newest(None, method=method)
            msg = (f"Showing the newest **{method}** run, `{rid}`, in every view (a peer scheme: the setting "
                   f"does not apply)." if rid else f"No **{method}** run yet: press **Run** to make one (a peer "
                   f"scheme, calibration-free: the setting does not apply).")
            return gr.update(value=bits), gr.update(value=k), gr.update(value=d), gr.update(value=rid) if rid \
                else gr.skip(), msg
        rid = self.views.newest(lambda sp: sp is not None and sp.name == method, kd=(k, d))
        if rid is None:
            msg = f"No finished **{method} {setting}** run yet ({k}×{d}): press **Run** to calibrate it."
            return gr.update(value=bits), gr.update(value=k), gr.update(value=d), gr.skip(), msg
        msg = (f"Showing the newest finished **{method} {setting}** run, `{rid}`, in every view. "
               f"Press **Run** for a new one.")
        return gr.update(value=bits), gr.update(value=k), gr.update(value=d), gr.update(value=rid), msg

    def describe_method(self, method):
        return method_description(method)

    def estimate(self, form: SetupForm):
        return estimate_text(self.engine, form)

    def lock_run(self):
        """While a run streams, Run buttons are disabled (a second click would only queue silently) and
        Cancel is enabled; it is disabled while idle."""
        return gr.update(interactive=False), gr.update(interactive=False), gr.update(interactive=True)

    def unlock_run(self):
        return gr.update(interactive=True), gr.update(interactive=True), gr.update(interactive=False)

    def run(self, form: SetupForm):
        """Validate the Set-up form, then stream the run (status, live curves, runs list)."""
        try:
            s = form.settings(self.engine.calib_defaults)
            self.engine.run_config(s)
        except (ValueError, TypeError) as e:
            raise gr.Error(f"Invalid settings: {e}", print_exception=False)
        yield from self._stream_run(s)

    def run_missing(self, sel, form: SetupForm):
        """Run the method missing from the conflict comparison, at the selected run's bits."""
        if not sel or not sel.get("run"):
            raise gr.Error("Select a run first.", print_exception=False)
        _, missing = self.views.conflict_pair(sel["run"])
        if not missing:
            raise gr.Error("Both sides of the comparison already exist.", print_exception=False)
        meta = self.store.meta(sel["run"])
        rb = int(meta["bits"])
        k, d = meta.get("k") or VQ_PRESETS.get(rb, (form.k, form.d))[0], meta.get("d") or VQ_PRESETS.get(rb, (form.k, form.d))[1]
        try:  # the missing side pairs with the selected run: same k, d and init (`pair_key`)
            s = SetupForm(**{**vars(form), "method": missing, "bits": rb, "k": k, "d": d}).settings(
                self.engine.calib_defaults)
            s = replace(s, init=INITS[1] if pair_key(meta)[2] else INITS[0])  # (plain k-means, act-aware)
            self.engine.run_config(s)
        except (ValueError, TypeError) as e:
            raise gr.Error(f"Invalid settings: {e}", print_exception=False)
        yield from self._stream_run(s)

    def cancel(self):
        a = self.engine.active
        if a is None or a.done.is_set():
            return "No run in progress."
        a.stop.set()
        return (f"**Cancelling {a.settings.method} W{a.settings.bits}** — calibration stops after the current "
                f"optimizer step; the partial trace and model are saved.")

    def _stream_run(self, s: RunRequest):
        engine, store = self.engine, self.store
        try:
            a = engine.start_run(s)
        except (ValueError, RuntimeError) as e:
            raise _error(e)
        live_rev = f"live-{a.t0}"
        yield status_text(a), plots.calibration_figure(None), gr.skip(), gr.skip(), gr.skip()
        last, live_seen = time.time(), 0
        while not a.done.wait(timeout=0.2):
            if time.time() - last >= 1.0:  # throttle: ~1 figure per second
                last = time.time()
                fig = plots.calibration_figure(a.steps_frame(), title="Live calibration", uirevision=live_rev,
                                               total_steps=a.total_steps)
                # a new snapshot of the run: the run picker offers (and labels) the live run
                picker = gr.update(choices=self.views.run_choices()) if store.live_version != live_seen else gr.skip()
                live_seen = store.live_version
                yield status_text(a), fig, gr.skip(), picker, gr.skip()
        if a.phase == "cancelled":
            yield f"**{s.method} W{s.bits} {a.error}.**", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if a.error is not None:  # in the status line (it stays) and as a notice
            yield f"**{s.method} W{s.bits} failed:** {a.error}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            raise gr.Error(f"{s.method} W{s.bits} failed: {a.error}", print_exception=False)
        table, _, rd = self._runs_outputs(a.run_id)
        m = store.meta(a.run_id)
        met = m.get("metrics") or {}
        extra = ", ".join(f"{k} {met[k]:.3g}" for k in ("accuracy", "image_mse", "psnr")
                          if met.get(k) is not None and math.isfinite(met[k]))
        how = f" during {m['cancelled_in']}, image evaluation skipped" if m.get("cancelled_in") else ""
        msg = (f"**Saved `{a.run_id}`** — {m['status']}{how} after {m.get('steps_done') or 0}/{m.get('total_steps') or 0} "
               f"steps in {m['seconds']:.0f} s; {m['bits_per_weight']:.3f} bits/weight, block MSE {m['block_mse']:.4g}"
               + (f"; {extra}" if extra else "") + ". Loaded into every view.")
        fig = plots.calibration_figure(a.steps_frame(), title=f"Calibration of {a.run_id}", uirevision=live_rev,
                                       total_steps=a.total_steps)
        yield msg, fig, table, gr.update(choices=self.views.run_choices(), value=a.run_id), rd

    def first_open(self) -> dict:
        """What the page shows before any event: the default run (`Views.default_run`, a demo run
        when the runs dir has no finished run) loaded into every view, so the first paint has data,
        and its settings in Set-up (so the method there is the run's on screen).
        Keys: run, block, layer, snap (updates), sel, live, dl_trace, dl_model, rd, layer_views, rendered, setup,
        view_state (for the page's script: what each tab shows, `url_state.view_state`)."""
        rid = self.views.default_run()
        if not rid:
            return {}
        try:
            block, layer, snap, sel, live, dl_trace, dl_model = self.load_run(rid, None)
            *layer_views, rendered = self.render_layer_views(None, None, ViewForm(sel, "codeword", "PCA"))
        except gr.Error:
            return {}
        setup = {f.name: u.get("value") for f, u in zip(fields(SetupForm), self._setup_of(rid))
                 if isinstance(u, dict) and "value" in u}
        st = self._setting_of(rid)
        if isinstance(st, dict) and "value" in st:
            setup["setting"] = st["value"]
        return dict(run=rid, block=block, layer=layer, snap=snap, sel=sel, live=live, dl_trace=dl_trace,
                    dl_model=dl_model, rd=plots.rd_figure(self.store.table(), rid), layer_views=layer_views,
                    rendered=rendered, setup=setup,
                    view_state=view_state(sel, selection_key(sel, "codeword", "PCA", False), rendered))

    def restore(self, sel, request: gr.Request):
        """Page load: the run, block, layer, snapshot and tab of the URL's query (`url_state.parse_query`);
        without one (or for values that are not valid here: an unknown run, a block out of range) the
        defaults: the newest finished run of the runs dir, else the demo run. Outputs: run, block, layer,
        snapshot, sel, live plot, downloads, the Tabs, the tab box and the URL the page then shows (the
        restored state, so a bad query does not stay in the address bar). The run dropdown's change event
        then loads the run's context (Set-up, status) when it differs from the page's first paint."""
        q = parse_query(request.query_params if request is not None else {})
        tab = q["tab"] or "setup"
        rid = q["run"] if q["run"] in self.store.readable_ids() else self.views.default_run()
        url = lambda s: "?" + page_query(s, tab)
        if not rid:
            return (*[gr.skip()] * 8, gr.Tabs(selected=tab), tab, url(None))
        asked = {k: q[k] for k in ("block", "layer", "snap") if q[k] is not None} if q["run"] == rid else {}
        if sel and sel.get("run") == rid and all(
                (layer_kind(sel.get("layer") or "") if k == "layer" else sel.get(k)) == v for k, v in asked.items()):
            return (*[gr.skip()] * 8, gr.Tabs(selected=tab), tab, url(sel))   # the first paint shows it already
        want = dict(run=rid, block=q["block"], layer=q["layer"], snap=q["snap"], other=(sel or {}).get("other"))
        if q["run"] != rid:   # the query's block / layer / snapshot belonged to a run that is not here
            want.update(block=(sel or {}).get("block"), layer=(sel or {}).get("layer"), snap=None)
        try:
            out = self.load_run(rid, want)
        except gr.Error:
            return (*[gr.skip()] * 8, gr.Tabs(selected=tab), tab, url(None))
        return (gr.update(value=rid), *out, gr.Tabs(selected=tab), tab, url(out[3]))

    # -- selection -------------------------------------------------------------------------
    def load_run(self, run_id, sel):
        """Run dropdown changed: new choices for block/layer/snapshot, run-level plots, downloads.
        (`run_context` follows: RD highlight, cleared images, the run's settings.)"""
        views = self.views
        if not run_id:
            new = views.initial_selection(None)
            m = plots.message_figure("No run selected.")
            return (gr.update(choices=[], value=None), gr.update(choices=[], value=None),
                    gr.update(maximum=1, value=0), new, m, None, None)
        try:
            views.trace(run_id)
            new = views.initial_selection(run_id, (sel or {}).get("block"), (sel or {}).get("layer"))
            if (sel or {}).get("other") and sel["other"] != run_id:
                new["other"] = sel["other"]
        except ValueError as e:
            raise _error(e)
        n_blocks = int(self.store.meta(run_id).get("n_blocks") or self.engine.n_blocks)
        steps = views.steps_of(run_id)
        snap = (sel or {}).get("snap")
        if (sel or {}).get("run") == run_id and isinstance(snap, int) and 0 <= snap < len(steps):
            new["snap"] = snap   # the same run (a restored URL): its snapshot stays; a new run opens on the final
        return (gr.update(choices=[(f"block {b}", b) for b in range(n_blocks)], value=new["block"]),
                gr.update(choices=views.layer_choices(run_id, new["block"]), value=new["layer"]),
                gr.update(minimum=0, maximum=max(len(steps) - 1, 1), value=new["snap"], interactive=len(steps) > 1,
                          label=f"Snapshot (0 = k-means init … {len(steps) - 1} = final)"),
                new, views.calibration(run_id),
                self.store.export_zip(run_id, "trace"), self.store.export_zip(run_id, "model"))

    def run_context(self, run_id):
        """After a run loads: the rate-distortion highlight moves to it, the previous run's images are
        cleared (never shown as this run's), and the Set-up panel shows the run's settings."""
        rd = self._runs_outputs(run_id)[2]
        if not run_id:
            return rd, None, None, "", *[gr.skip()] * len(fields(SetupForm)), gr.skip(), ""
        note = f"Images cleared: press **Generate images** to sample `{run_id}`."
        m = self.store.meta(run_id)
        c = (m.get("config") or {}).get("calib") or {}
        budget = (f" Its budget ({c['iterations']} × {c['num_sampling_steps']} steps) is **not** copied: Set-up "
                  f"keeps its own iterations and sampling steps." if c.get("iterations") else "")
        status = (f"Loaded `{run_id}` ({run_label(m)}). **Set-up now holds its method, bits and k×d**; change "
                  f"them before pressing Run for a different run.{budget}")
        return rd, None, None, note, *self._setup_of(run_id), self._setting_of(run_id), status

    def _setting_of(self, run_id):
        """The Setting dropdown for a saved run: the named setting with its bits and k x d, if any."""
        m = self.store.meta(run_id)
        bits, kd = m.get("bits"), (m.get("k"), m.get("d"))
        if bits is None:
            return gr.skip()
        names = [n for n in settings_for_bits(int(bits)) if setting_kd(n) == kd]
        return gr.update(value=names[0]) if names else gr.skip()

    def _setup_of(self, run_id) -> list:
        """Updates for the SetupForm components from a saved run's settings (skip what it lacks). The
        budget (iterations, sampling steps) is never copied: a demo run's short budget must not become
        the next run's unasked."""
        st = self.store.meta(run_id).get("settings") or {}
        c = st.get("calib") or {}
        vals = dict(method=st.get("method") if st.get("method") in app_methods() else None, bits=st.get("bits"),
                    k=st.get("k"), d=st.get("d"), n_candidates=st.get("n_candidates"), iterations=None,
                    sampling_steps=None, kmeans_iters=st.get("kmeans_iters"),
                    lr_logits=c.get("lr_logits"), lr_codebook=c.get("lr_codebook"), lambda_r=c.get("lambda_r"),
                    seed=st.get("seed"))
        return [gr.skip() if vals[f.name] is None else gr.update(value=vals[f.name]) for f in fields(SetupForm)]

    def on_block(self, sel, block):
        if not sel or not sel.get("run") or block is None:
            return gr.skip(), gr.skip()
        new = self.views.initial_selection(sel["run"], int(block), sel.get("layer"))
        new["snap"] = sel.get("snap", new["snap"])
        return gr.update(choices=self.views.layer_choices(sel["run"], new["block"]), value=new["layer"]), new

    def on_compare(self, sel, other):
        """'Compare with' picked: every view compares the selected run with that run ('' = automatic);
        images of the previous comparison are cleared, never shown under the new one."""
        if not sel:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if other and other not in self.store.readable_ids():
            raise gr.Error(f"run {other!r} is not a readable saved run", print_exception=False)
        if other and other == sel.get("run"):
            gr.Warning("That is the selected run itself: comparing with the automatic baselines instead.")
            other = ""
        what = f"`{other}`" if other else "the automatic baselines"
        return dict(sel, other=other or None), None, None, f"Images cleared: press **Generate images** to compare with {what}."

    def on_layer(self, sel, layer):
        if not sel or not layer:
            return gr.skip()
        return dict(sel, layer=layer)

    def on_snap(self, sel, snap):
        """Snapshot slider changed (dragged or typed); a programmatic set to the same value is a no-op."""
        if not sel or snap is None or int(snap) == sel.get("snap"):
            return gr.skip()
        return dict(sel, snap=int(snap))

    def on_cell(self, sel, evt: gr.SelectData):
        """A cell of the per-block table: that block + layer kind becomes the current layer."""
        if not sel or not sel.get("run"):
            return gr.skip(), gr.skip(), gr.skip()
        row, col = evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, 0)
        cols = ["block"] + plots.LAYER_COLUMNS
        kind = cols[col] if 0 < col < len(cols) else layer_kind(sel.get("layer") or "")
        return self._select_cell(sel, int(row), kind)

    def _select_cell(self, sel, row: int, kind: str):
        """(block, layer, sel) updates selecting layer `kind` of block `row` (skips if it has none)."""
        n_blocks = int(self.store.meta(sel["run"]).get("n_blocks") or self.engine.n_blocks)
        if not 0 <= row < n_blocks:
            return gr.skip(), gr.skip(), gr.skip()
        choices = self.views.layer_choices(sel["run"], int(row))
        layer = next((v for _, v in choices if layer_kind(v) == kind), None)
        if layer is None:
            return gr.skip(), gr.skip(), gr.skip()
        new = dict(sel, block=int(row), layer=layer)
        return gr.update(value=int(row)), gr.update(choices=choices, value=layer), new

    # -- views -----------------------------------------------------------------------------
    def render_layer_views(self, tab, rendered, form: ViewForm):
        """Every layer view for the shared selection, as outputs in LAYER_VIEWS order, plus the
        updated `rendered` state. Only the views of the visible `tab` are computed (the others are
        skipped and drawn when their tab is opened: `rendered` remembers, per tab, which selection
        its views show). tab None (an API client that never switches tabs): every view."""
        sel = form.sel
        key = selection_key(sel, form.color_by, form.projection, form.full)
        tabs = list(TAB_VIEWS) if tab is None else [tab]
        rendered = dict(rendered or {})
        out = {"sel_md": gr.skip()}
        try:
            out["sel_md"] = self.views.describe(sel)
            for t in tabs:
                if t not in TAB_VIEWS or (tab is not None and rendered.get(t) == key):
                    continue
                out.update(self._tab_views(t, form))
                rendered[t] = key
        except ValueError as e:
            raise _error(e)
        return (*[out.get(n, gr.skip()) for n in LAYER_VIEWS], rendered)

    def _tab_views(self, tab: str, form: ViewForm) -> dict:
        views, sel = self.views, form.sel
        if tab == "clusters":
            cfig, cnote = views.cluster(sel, form.color_by, form.projection, bool(form.full))
            return dict(cluster_plot=cfig, cluster_note=cnote)
        if tab == "evolution":
            other = (sel or {}).get("other")
            ofig = views.evolution(dict(sel, run=other, snap=10**6)) if other else None
            return dict(evol_plot=views.evolution(sel),
                        evol_cmp_plot=gr.update(value=ofig, visible=True) if ofig is not None
                        else gr.update(value=None, visible=False))
        if tab == "mechanism":
            md, fig = views.mechanism(sel)
            return dict(mech_md=md, mech_plot=fig)
        if tab == "conflicts":
            note, missing, kfig, wfig = views.conflicts(sel)
            sfig, smd = views.conflict_summary(sel)
            btn = gr.update(visible=missing is not None, value=f"Run {missing} at these bits" if missing else "Run")
            return dict(conflict_note=note, other_btn=btn, conflict_plot=kfig, worst_plot=wfig, summary_plot=sfig,
                        summary_md=smd)
        if tab == "changes":
            heat, table, mse = views.changes(sel)
            return dict(heat_plot=heat, changes_df=table, mse_plot=mse)
        return {}

    def render_page(self, tab, rendered, form: ViewForm):
        """`render_layer_views` for the page: also the `view_state` its script reads (the URL it writes,
        and which tabs are up to date, so opening one of those asks the server nothing)."""
        out = self.render_layer_views(tab, rendered, form)
        return (*out, view_state(form.sel, selection_key(form.sel, form.color_by, form.projection, form.full),
                                 out[-1]))

    def open_tab(self, stale, rendered, form: ViewForm):
        """A tab whose views show another selection was opened (the page's script wrote `tab:time` to the
        `stale` box): draw its views."""
        tab = str(stale or "").split(":")[0]
        if tab not in TAB_VIEWS:
            return (*[gr.skip()] * (len(LAYER_VIEWS) + 1), gr.skip())
        return self.render_page(tab, rendered, form)

    def on_plot_click(self, sel, payload):
        """A click on a plotly plot, sent by the page's script as JSON {plot, x, y, id}: a cell of
        the per-block heatmap selects that block + layer (like the table), a rate-distortion point
        loads that run."""
        try:
            ev = json.loads(payload or "{}")
        except ValueError:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if ev.get("plot") == "rd":
            rid = ev.get("id")
            if isinstance(rid, str) and rid in self.store.readable_ids() and rid != (sel or {}).get("run"):
                return gr.skip(), gr.skip(), gr.skip(), gr.update(value=rid)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if ev.get("plot") == "heat" and sel and sel.get("run"):
            y, kind = str(ev.get("y", "")), str(ev.get("x", ""))
            if not y.startswith("block ") or not y[6:].isdigit() or kind not in plots.LAYER_COLUMNS:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return (*self._select_cell(sel, int(y[6:]), kind), gr.skip())
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def render_cluster(self, form: ViewForm):
        try:
            return self.views.cluster(form.sel, form.color_by, form.projection, bool(form.full))
        except ValueError as e:
            raise _error(e)

    def check_images(self, form: ImageForm):
        """Validate the Images form in a step with no outputs: invalid input raises here, before
        `make_images`, so the images on screen are kept (an error in `make_images` would blank them)."""
        try:
            self.views.parse_labels(form.labels)
            image_params(form.seed, form.guidance, form.steps)
        except ValueError as e:
            raise _error(e)

    def auto_images(self, tab, form: ImageForm):
        """The Images tab opened: show the images at once when no sampling is needed (cached, or
        shipped with the demo runs); otherwise leave the tab as it is (Generate samples them)."""
        if tab != "images" or not self.views.images_ready(form.run, form.labels, form.seed, form.guidance, form.steps,
                                                            form.compare or None):
            return gr.skip(), gr.skip(), gr.skip()
        return self.make_images(form)

    def make_images(self, form: ImageForm):
        try:
            return self.views.images(form.run, form.labels, form.seed, form.guidance, form.steps,
                                     compare=form.compare or None)
        except ValueError as e:
            raise _error(e)


