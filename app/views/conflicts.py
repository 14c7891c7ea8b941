"""Gradient conflicts: the paper's per-codeword statistic for the comparison pair."""
from __future__ import annotations

from typing import Optional

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vq4dit.config import DEFAULT_METHOD, METHODS, method_names

from .. import plots
from ..config import method_spec
from ..store import run_label


class ConflictView:
    """The Gradient conflicts tab."""

    def conflict_pair(self, run_id, compare: Optional[str] = None) -> tuple[dict, Optional[str]]:
        """{side: run id or None} for the paper's comparison with the run's k, d and init (`pair_key`): a
        method that trains assignments vs one that keeps its start assignments (both from the registry),
        and the registry name of the method to run for a missing side (None when both exist; it runs
        with the selected run's init). A picked `compare` run replaces the automatic choice: any two runs."""
        if compare and compare != run_id:
            return {"selected": run_id, "compare": compare}, None
        meta = self.store.meta(run_id)
        spec = method_spec(meta["method"])
        trains = lambda sp: sp is not None and sp.calibrated and sp.trains_assignments
        fixed = lambda sp: sp is not None and sp.calibrated and not sp.trains_assignments
        near = lambda want, ex=None: self.newest(want, like=meta, exclude=ex)
        if trains(spec):  # same k x d and init only (W2 vs W2, not vs XL-sharing)
            pair = {"assignments": run_id, "fixed": near(fixed, run_id)}
        elif fixed(spec):
            pair = {"assignments": near(trains, run_id), "fixed": run_id}
        else:
            pair = {"assignments": near(trains), "fixed": near(fixed)}
        missing = None
        if pair["fixed"] is None:
            missing = next((n for n in method_names(calibrated=True) if fixed(METHODS[n])), None)
        elif pair["assignments"] is None:
            missing = DEFAULT_METHOD if trains(METHODS[DEFAULT_METHOD]) else \
                next((n for n in method_names(calibrated=True) if trains(METHODS[n])), None)
        return pair, missing

    def conflicts(self, sel: dict):
        """(note markdown, missing method or None, conflict figure, worst-codeword figure)."""
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        if not run_id or not layer:
            m = plots.message_figure("No run selected.")
            return "No run selected.", None, m, m
        meta = self.store.meta(run_id)
        if not meta.get("k"):  # RTN or a peer scheme: nothing to pair with a codebook-only run
            m = plots.message_figure("This run has no codewords.")
            return (f"`{run_id}` ({run_label(meta)}) has no codebooks (a scalar scheme): gradient agreement inside "
                    "codewords is a VQ measure. Pick a VQ run.", None, m, m)
        pair, missing = self.conflict_pair(run_id, sel.get("other"))
        per_run, used = {}, []
        for rid in pair.values():
            if rid is None:
                continue
            try:
                tr = self.trace(rid)
            except ValueError:
                continue
            if tr is None or layer not in tr.layer_names:
                continue
            label = tr.method if tr.method not in per_run else f"{tr.method} ({rid})"
            per_run[label] = (tr.method, tr.conflicts(layer))
            used.append(f"`{rid}` ({run_label(self.store.meta(rid))})")
        how = "picked in *Compare with*" if "compare" in pair else "newest finished with the same k×d and init"
        note = f"Comparing {' and '.join(used) if used else 'nothing'} ({how}), layer {plots.layer_label(layer)}."
        if missing:
            note += (f" **No saved {missing} run at {meta.get('k')}×{meta.get('d')} with this init yet** (only finished runs are picked "
                     f"automatically), so its side is missing: press the button to run it with the Set-up settings.")
        fig = conflict_figure(per_run, title=f"Gradient agreement inside codewords — {plots.layer_label(layer)}")
        # worst codeword of the selected run (or of the assignment-training side when the selection has no trace)
        tr = self.trace(run_id)
        if tr is None and pair.get("assignments") or tr is None and pair.get("compare"):
            tr = self.trace(pair.get("assignments") or pair.get("compare"))
        wfig = worst_codeword_figure(None, None, None, meta["method"])
        if tr is not None and layer in tr.layer_names:
            steps = tr.snapshot_steps(layer)
            want = steps[min(sel.get("snap", 0), len(steps) - 1)]
            have = tr.gradient_steps(layer)
            if have:
                s = min(have, key=lambda x: (abs(x - want), x))
                snap = tr.snapshot(layer, s)
                wfig = worst_codeword_figure(snap.worst_grads, snap.worst_codeword, s, tr.method)
                if s != want:
                    note += f" Worst-codeword arrows: nearest snapshot with gradients is step {s} (selected: {want})."
        return note, missing, fig, wfig

    def conflict_summary(self, sel: dict):
        """(figure, markdown) of the model-wide conflict share per layer for the comparison pair:
        the number that tests the paper's claim (lower with trainable assignments)."""
        run_id = (sel or {}).get("run")
        if not run_id:
            return plots.message_figure("No run selected."), ""
        pair, _ = self.conflict_pair(run_id, sel.get("other"))
        per_run = {}
        for rid in pair.values():
            tr = self.trace(rid) if rid else None
            if tr is not None:
                per_run[f"{tr.method} ({rid})" if rid != run_id else f"{tr.method} (selected)"] = (
                    tr.method, tr.conflict_summary())
        fig = conflict_summary_figure(per_run, "Conflict share per layer over the whole run")
        have = {k: v for k, (m, v) in per_run.items() if len(v)}
        if len(have) < 2:
            return fig, "Model-wide summary needs both sides of the comparison."
        (la, a), (lb, b) = list(have.items())[:2]
        j = a.merge(b, on="layer", suffixes=("_a", "_b"))
        lower = int((j["conflict_share_a"] < j["conflict_share_b"]).sum())
        md = (f"**Model-wide conflict share:** {la} **{100 * a['conflict_share'].mean():.1f}%** vs {lb} "
              f"**{100 * b['conflict_share'].mean():.1f}%**; lower for {la.split(' ')[0]} in {lower} of {len(j)} layers "
              f"(mean over each run's logged steps with gradients).")
        return fig, md


# ----------------------------------------------------------------------------------------
# Figures of this tab
# ----------------------------------------------------------------------------------------


def conflict_figure(per_run: dict, title: str) -> go.Figure:
    """per_run: {label: (method, `Trace.conflicts(layer)` frame)}. Coherence histogram vs step per run
    (bins from the frame's `coherence_hist`) + conflict share of every run on one axis."""
    per_run = {k: v for k, v in per_run.items() if v[1] is not None and len(v[1])}
    if not per_run:
        return plots.message_figure("No gradient statistics for this layer.")
    n = len(per_run)
    titles = [f"{k}: per-codeword coherence" for k in per_run] + ["Conflicting gradients (%)"]
    fig = make_subplots(rows=1, cols=n + 1, horizontal_spacing=0.08, subplot_titles=titles)
    for i, (label, (method, rows)) in enumerate(per_run.items()):
        hist = rows.attrs["coherence_hist"]                        # (T, bins) over [0, 1]
        centers = (np.arange(hist.shape[1]) + 0.5) / hist.shape[1]
        fig.add_trace(go.Heatmap(x=rows["step"], y=centers, z=100 * hist.T, colorscale="Magma_r",
                                 zmin=0, zmax=100, showscale=i == 0,
                                 colorbar=dict(title="% of codewords", orientation="h", y=-0.42, x=0.3, len=0.4,
                                               thickness=12),
                                 hovertemplate=f"{label}<br>step %{{x}}<br>coherence ≈ %{{y:.2f}}<br>%{{z:.1f}}% of codewords<extra></extra>"),
                      1, i + 1)
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["coherence_mean"], mode="lines",
                                 line=dict(color=plots.color(method), width=2), name=f"{label}: mean coherence",
                                 showlegend=False), 1, i + 1)
        fig.add_trace(go.Scatter(x=rows["step"], y=100 * rows["conflict_share"], mode="lines+markers",
                                 marker=dict(size=4), line=dict(color=plots.color(method), dash="solid" if i == 0 else "dot"),
                                 name=label), 1, n + 1)
        fig.update_yaxes(title_text="coherence |Σg| / Σ|g|" if i == 0 else None, range=[0, 1], row=1, col=i + 1)
        fig.update_xaxes(title_text="optimizer step", row=1, col=i + 1)
    fig.update_yaxes(title_text="% opposing their codeword's sum", row=1, col=n + 1)
    fig.update_xaxes(title_text="optimizer step", row=1, col=n + 1)
    fig.update_layout(**{**plots.BASE, "margin": dict(l=60, r=20, t=90, b=40)}, height=460, title=title,
                      legend=dict(orientation="h", y=-0.3, x=0.7))
    return fig


def conflict_summary_figure(per_run: dict, title: str) -> go.Figure:
    """per_run: {label: (method, `Trace.conflict_summary()` frame)}. Conflict share of every layer
    (blocks x layer kinds, in model order), one bar series per run, the model-wide mean as a line."""
    per_run = {k: v for k, v in per_run.items() if v[1] is not None and len(v[1])}
    if not per_run:
        return plots.message_figure("No gradient statistics in these runs (methods without calibration record none).")
    order = {c: i for i, c in enumerate(plots.LAYER_COLUMNS)}
    fig = go.Figure()
    for i, (label, (method, df)) in enumerate(per_run.items()):
        df = df.assign(_o=df["kind"].map(lambda k: order.get(k, 99))).sort_values(["block", "_o"])
        x = [f"{b}·{k}" for b, k in zip(df["block"], df["kind"])]
        mean = 100 * float(df["conflict_share"].mean())
        fig.add_trace(go.Bar(x=x, y=100 * df["conflict_share"], name=f"{label} (mean {mean:.1f}%)",
                             marker_color=plots.color(method), opacity=0.85 if i == 0 else 0.6,
                             marker_pattern_shape="" if i == 0 else "/",
                             hovertemplate=f"{label}<br>block·layer %{{x}}<br>%{{y:.1f}}% conflicting<extra></extra>"))
        fig.add_hline(y=mean, line=dict(color=plots.color(method), dash="dash" if i == 0 else "dot", width=1.5))
    fig.update_layout(**plots.BASE, height=360, title=title, barmode="group", bargap=0.15,
                      xaxis=dict(title="block · layer", tickangle=-60, tickfont=dict(size=9)),
                      yaxis=dict(title="% conflicting gradients"),
                      legend=dict(orientation="h", y=1.12, x=0))
    return fig


def worst_codeword_figure(grads: Optional[np.ndarray], codeword: Optional[int], step: Optional[int],
                          method: str) -> go.Figure:
    """The lowest-coherence codeword's sub-vector gradients as arrows from the origin (2-D)."""
    if grads is None or len(grads) == 0:
        return plots.message_figure("No gradient snapshot for this layer at this step\n(step 0 and the final step have none).", 380)
    g = np.asarray(grads, dtype=np.float64)
    axis = "gradient dim"
    if g.shape[1] > 2:
        _, _, vt = np.linalg.svd(g - g.mean(0), full_matrices=False)  # PCA axes of the gradients
        g2 = g @ vt[:2].T
        axis = "gradient PC"
    elif g.shape[1] == 1:
        g2 = np.concatenate([g, np.zeros_like(g)], 1)
    else:
        g2 = g
    scale = np.abs(g2).max() or 1.0
    g2 = g2 / scale
    s_full = g.sum(0)
    opposing_mask = g @ s_full < 0  # cosine sign in the full d-dim space, not the projection
    s = g2.sum(0)
    coherence = np.linalg.norm(g.sum(0)) / max(np.linalg.norm(g, axis=1).sum(), 1e-30)
    fig = go.Figure()
    xs, ys, xo, yo = [], [], [], []
    for v, opposing in zip(g2, opposing_mask):
        (xo if opposing else xs).extend([0, v[0], None])
        (yo if opposing else ys).extend([0, v[1], None])
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line=dict(color="#1f77b4", width=1.2),
                             marker=dict(symbol="arrow", size=9, angleref="previous"),
                             name="sub-vector gradient agreeing with the sum"))
    fig.add_trace(go.Scatter(x=xo, y=yo, mode="lines+markers", line=dict(color="#ff7f0e", width=1.2),
                             marker=dict(symbol="arrow", size=9, angleref="previous"),
                             name="opposing the sum (cos < 0)"))
    sn = s / (np.abs(s).max() or 1.0)
    fig.add_trace(go.Scatter(x=[0, sn[0]], y=[0, sn[1]], mode="lines+markers", line=dict(color="black", width=3),
                             marker=dict(symbol="arrow", size=14, angleref="previous"),
                             name="sum (direction the codeword moves, rescaled)"))
    fig.update_layout(**plots.BASE, height=420,
                      title=f"{method}: worst codeword #{codeword} at step {step} — {len(g)} gradients, coherence {coherence:.2f}",
                      xaxis=dict(title=f"{axis} 1 (scaled to max 1)", zeroline=True, scaleanchor="y"),
                      yaxis=dict(title=f"{axis} 2 (scaled)", zeroline=True),
                      legend=dict(orientation="h", y=-0.2, x=0))
    return fig


# ----------------------------------------------------------------------------------------
# Per-block assignment changes and block MSE
# ----------------------------------------------------------------------------------------
