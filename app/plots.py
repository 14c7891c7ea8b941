"""Pure functions: trace DataFrames / tensors -> plotly figures. No Gradio, no model code.

Method colours come from one dict so every view (live curves, conflicts, rate-distortion,
images) draws a method in the same colour.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vq4dit.config import METHODS
from vq4dit.naming import LAYER_KINDS, block_index, layer_kind

from .config import method_spec

LAYER_COLUMNS = list(LAYER_KINDS)  # one heatmap column per layer kind (q, k, v, out, fc1, fc2, adaLN)
FP_COLOR = "#444444"
_METHOD_PALETTE = ["#d62728", "#ff7f0e", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf",
                   "#bcbd22", "#393b79", "#ad494a", "#8ca252"]
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#ad494a", "#8ca252", "#bd9e39", "#843c39", "#7b4173"]
BASE = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), font=dict(size=12))


def color(method: str) -> str:
    """One colour per method, by its place in the registry (derived names 'm+switch=..' share m's)."""
    if method == "fp":
        return FP_COLOR
    spec = method_spec(method)   # the app's one parser of derived names
    return _METHOD_PALETTE[list(METHODS).index(spec.name) % len(_METHOD_PALETTE)] if spec else "#7f7f7f"


def layer_label(name: str) -> str:
    """'transformer_blocks.3.attn1.to_q' -> 'block 3 · q'."""
    b = block_index(name)
    return f"block {b} · {layer_kind(name)}" if b >= 0 else name


def message_figure(text: str, height: int = 260) -> go.Figure:
    """A blank figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_layout(**BASE, height=height, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


# ----------------------------------------------------------------------------------------
# Calibration curves (live and finished)
# ----------------------------------------------------------------------------------------


def calibration_figure(steps: pd.DataFrame, title: str = "", uirevision: str = "live",
                       total_steps: Optional[int] = None) -> go.Figure:
    """Loss per block and total, L_r, frozen fraction vs optimizer step."""
    if steps is None or len(steps) == 0:
        return message_figure("No calibration steps yet (k-means init runs first).", 300)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("Block-output MSE vs FP (log)", "Ratio regularizer L_r",
                                        "Frozen sub-vectors (%)"))
    x = steps["step"].to_numpy()
    blocks = sorted([c for c in steps.columns if c.startswith("block_") and c[6:].isdigit()],
                    key=lambda c: int(c[6:]))
    for i, c in enumerate(blocks):
        shade = int(60 + 150 * i / max(len(blocks) - 1, 1))
        fig.add_trace(go.Scatter(x=x, y=steps[c], mode="lines", name=f"block {c[6:]}",
                                 line=dict(width=1, color=f"rgb({shade},{shade},230)"),
                                 legendgroup="blocks", showlegend=i in (0, len(blocks) - 1)), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=steps["block_loss"], mode="lines", name="mean over blocks",
                             line=dict(width=2.5, color="#d62728")), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=steps["l_r"], mode="lines", name="L_r", line=dict(color="#ff7f0e"),
                             showlegend=False), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=100 * steps["frozen_frac"], mode="lines", name="frozen %",
                             line=dict(color="#2ca02c"), showlegend=False), 1, 3)
    fig.update_yaxes(type="log", title_text="MSE (block output units²)", row=1, col=1)
    fig.update_yaxes(title_text="L_r (0 = one-hot ratios)", row=1, col=2)
    fig.update_yaxes(title_text="% of sub-vectors", range=[0, 101], row=1, col=3)
    xr = [0, total_steps] if total_steps else None
    for c in (1, 2, 3):
        fig.update_xaxes(title_text="optimizer step", range=xr, row=1, col=c)
    fig.update_layout(**{**BASE, "margin": dict(l=60, r=20, t=90, b=40)}, height=360, title=title,
                      uirevision=uirevision, legend=dict(orientation="h", y=-0.3, x=0))
    return fig


# ----------------------------------------------------------------------------------------
# Codebook clusters
# ----------------------------------------------------------------------------------------


def cluster_figure(xy_samples: np.ndarray, xy_codebook: np.ndarray, xy_codebook0: Optional[np.ndarray],
                   assign: np.ndarray, top_ratio: np.ndarray, assign0: np.ndarray, color_by: str,
                   title: str, axis: str, n_candidates: int = 2, uirevision: str = "",
                   loo_cos: Optional[np.ndarray] = None) -> go.Figure:
    """Sample sub-vectors (dots) and codewords (crosses) in 2-D; step-0 codewords as grey rings.
    `loo_cos`: each sub-vector's leave-one-out gradient cosine with its codeword (colour "gradient agreement").
    SVG scatter, not WebGL: ~800 points draw fast, and every re-render of a Scattergl plot leaks a
    WebGL context in the browser ("Too many active WebGL contexts")."""
    fig = go.Figure()
    hover = [f"codeword {a}<br>top ratio {r:.3f}<br>codeword at the start {a0}"
             for a, r, a0 in zip(assign, top_ratio, assign0)]
    if color_by == "gradient agreement" and loo_cos is not None:
        marker = dict(size=6, color=loo_cos, colorscale="RdBu", cmin=-1.0, cmax=1.0,
                      colorbar=dict(title="cos(g, rest of<br>its codeword)", len=0.8))
        fig.add_trace(go.Scatter(x=xy_samples[:, 0], y=xy_samples[:, 1], mode="markers", marker=marker,
                                 name=f"sub-vectors (red = conflicts: {100 * float((loo_cos < 0).mean()):.0f}%)",
                                 text=[f"{h}<br>leave-one-out cos {c:+.2f}" for h, c in zip(hover, loo_cos)],
                                 hoverinfo="text"))
    elif color_by == "top ratio":
        marker = dict(size=6, color=top_ratio, colorscale="Viridis", cmin=1.0 / max(n_candidates, 1), cmax=1.0,
                      colorbar=dict(title="top ratio", len=0.8))
        fig.add_trace(go.Scatter(x=xy_samples[:, 0], y=xy_samples[:, 1], mode="markers", marker=marker,
                                   name="sub-vectors", text=hover, hoverinfo="text"))
    elif color_by == "assignment changed":
        changed = assign != assign0
        for mask, name, col in ((~changed, f"same codeword as at the start ({(~changed).sum()})", "#9ecae1"),
                                (changed, f"changed since the start ({changed.sum()})", "#d62728")):
            fig.add_trace(go.Scatter(x=xy_samples[mask, 0], y=xy_samples[mask, 1], mode="markers",
                                       marker=dict(size=6 if name.startswith("changed") else 5, color=col),
                                       name=name, text=[h for h, m in zip(hover, mask) if m], hoverinfo="text"))
    else:  # by codeword: a cyclic palette, so neighbouring clusters differ
        cols = [_PALETTE[int(a) % len(_PALETTE)] for a in assign]
        fig.add_trace(go.Scatter(x=xy_samples[:, 0], y=xy_samples[:, 1], mode="markers",
                                   marker=dict(size=5, color=cols, opacity=0.8), name="sub-vectors (colour = codeword)",
                                   text=hover, hoverinfo="text"))
    return _with_codewords(fig, xy_codebook, xy_codebook0, "codewords (this step)", title, axis, uirevision)


def _with_codewords(fig: go.Figure, xy_codebook: np.ndarray, xy_codebook0: Optional[np.ndarray], label: str,
                    title: str, axis: str, uirevision: str) -> go.Figure:
    """Codewords as crosses, k-means codewords as grey rings, and the layout both cluster plots share."""
    if xy_codebook0 is not None:
        fig.add_trace(go.Scatter(x=xy_codebook0[:, 0], y=xy_codebook0[:, 1], mode="markers",
                                 marker=dict(size=7, symbol="circle-open", color="#999999"),
                                 name="codewords at k-means init", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=xy_codebook[:, 0], y=xy_codebook[:, 1], mode="markers",
                             marker=dict(size=7, symbol="x-thin", line=dict(width=1.5, color="black"), color="black"),
                             name=label, text=[f"codeword {i}" for i in range(len(xy_codebook))],
                             hoverinfo="text"))
    fig.update_layout(**BASE, height=480, title=title, uirevision=uirevision,
                      xaxis_title=f"{axis} 1 (weight units)" if axis.startswith("raw") else f"{axis} 1",
                      yaxis_title=f"{axis} 2 (weight units)" if axis.startswith("raw") else f"{axis} 2",
                      legend=dict(orientation="h", y=-0.15, x=0))
    return fig


DENSITY_BINS = 128  # bins per axis of the full-weight density image


def density_figure(xy: np.ndarray, xy_codebook: np.ndarray, xy_codebook0: Optional[np.ndarray],
                   changed: Optional[np.ndarray], title: str, axis: str, uirevision: str = "") -> go.Figure:
    """Every sub-vector as a 2-D histogram image computed here (a few KB to the browser instead of
    200k points), codewords as crosses, k-means codewords as grey rings. `changed` (bool per point):
    colour = share of each bin's sub-vectors whose codeword differs from k-means; else log10 count."""
    pts = np.concatenate([xy, xy_codebook])
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.02 * np.maximum(hi - lo, 1e-12)
    ex = np.linspace(lo[0] - pad[0], hi[0] + pad[0], DENSITY_BINS + 1)
    ey = np.linspace(lo[1] - pad[1], hi[1] + pad[1], DENSITY_BINS + 1)
    count, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=[ex, ey])          # (x bins, y bins)
    cx, cy = (ex[:-1] + ex[1:]) / 2, (ey[:-1] + ey[1:]) / 2
    if changed is not None:
        moved, _, _ = np.histogram2d(xy[changed, 0], xy[changed, 1], bins=[ex, ey])
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(count > 0, np.round(100 * moved / count, 1), np.nan)
        heat = go.Heatmap(x=cx, y=cy, z=z.T, customdata=count.T.astype(np.int32), colorscale=CHANGE_SCALE, zmin=0, zmax=100,
                          colorbar=dict(title="% changed", len=0.8),
                          hovertemplate="%{z:.0f}% of %{customdata:.0f} sub-vectors changed codeword<extra></extra>")
    else:
        z = np.where(count > 0, np.round(np.log10(np.maximum(count, 1)), 3), np.nan)
        heat = go.Heatmap(x=cx, y=cy, z=z.T, customdata=count.T.astype(np.int32), colorscale="Blues", zmin=0,
                          colorbar=dict(title="sub-vectors<br>(log10)", len=0.8),
                          hovertemplate="%{customdata:.0f} sub-vectors<extra></extra>")
    return _with_codewords(go.Figure(heat), xy_codebook, xy_codebook0, "codewords (final)", title, axis, uirevision)


# ----------------------------------------------------------------------------------------
# Assignment-probability evolution
# ----------------------------------------------------------------------------------------


def evolution_figure(hist: tuple, frozen: pd.DataFrame, paths: pd.DataFrame, hard_step: Optional[int],
                     title: str, current_step: Optional[int] = None, end_step: Optional[int] = None,
                     switched: Optional[pd.DataFrame] = None) -> go.Figure:
    """Top-ratio histogram vs step (heatmap), frozen fraction, and sample ratio trajectories.

    hist: `Trace.ratio_histogram` (steps, shares (T, bins), edges); frozen: rows with step, frozen_frac;
    paths: `Trace.ratio_paths`. `end_step` marks the end-of-calibration finalize when no hard switch
    happened during the run. `switched`: the same ratio at snapshot steps for sampled sub-vectors
    that ended on another codeword (dashed)."""
    steps, shares, edges = hist
    if len(steps) == 0:
        return message_figure("This run has no per-layer trace.")
    n_paths = paths["sample"].nunique() if paths is not None and len(paths) else 0
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07, row_heights=[0.45, 0.25, 0.30],
                        subplot_titles=("Share of sub-vectors by their largest assignment ratio",
                                        "Frozen sub-vectors (%)",
                                        f"Ratio of the k-means codeword: {n_paths} sample sub-vectors"
                                        + (f" + {switched['sample'].nunique()} that switched (dashed, at snapshots)"
                                           if switched is not None and len(switched) else "")))
    centers = (edges[:-1] + edges[1:]) / 2
    fig.add_trace(go.Heatmap(x=steps, y=centers, z=100 * shares.T, colorscale="Blues", zmin=0,
                             colorbar=dict(title="% of<br>sub-vectors", len=0.42, y=0.8),
                             hovertemplate="step %{x}<br>top ratio ≈ %{y:.2f}<br>%{z:.1f}% of sub-vectors<extra></extra>"),
                  1, 1)
    fig.add_trace(go.Scatter(x=frozen["step"], y=100 * frozen["frozen_frac"], mode="lines+markers",
                             line=dict(color="#2ca02c"), marker=dict(size=4), name="frozen %", showlegend=False), 2, 1)
    if n_paths:
        for j, g in paths.groupby("sample"):
            fig.add_trace(go.Scatter(x=g["step"], y=g["ratio_nearest"], mode="lines", name=f"sample {j}",
                                     line=dict(width=1.2, color=_PALETTE[int(j) % len(_PALETTE)]),
                                     showlegend=False,
                                     hovertemplate=f"sample {j}<br>step %{{x}}<br>ratio %{{y:.3f}}<extra></extra>"),
                          3, 1)
    if switched is not None and len(switched):
        for j, g in switched.groupby("sample"):
            fig.add_trace(go.Scatter(x=g["step"], y=g["ratio_nearest"], mode="lines+markers", name=f"switched {j}",
                                     line=dict(width=1.2, dash="dash", color="#d62728"), marker=dict(size=4),
                                     opacity=0.7, showlegend=False,
                                     hovertemplate=f"switched sub-vector {j}<br>step %{{x}}<br>ratio %{{y:.3f}}<extra></extra>"),
                          3, 1)
    mark, text = (hard_step, f" layer switched to hard at step {hard_step}") if hard_step is not None else \
        (end_step, f" no hard switch during the run: made hard by the final step ({end_step})")
    if mark is not None:
        for r in (1, 2, 3):
            fig.add_vline(x=mark, line=dict(color="#d62728", dash="dash", width=1.5), row=r, col=1)
        fig.add_annotation(x=mark, y=50, xref="x2", yref="y2", text=text, showarrow=False,
                           xanchor="left" if hard_step is not None else "right", font=dict(color="#d62728", size=11),
                           bgcolor="rgba(255,255,255,0.8)")
    if current_step is not None:
        for r in (1, 2, 3):
            fig.add_vline(x=current_step, line=dict(color="#555", dash="dot", width=1), row=r, col=1)
    fig.update_yaxes(title_text="top ratio", range=[edges[0], 1.0], row=1, col=1)
    fig.update_yaxes(title_text="%", range=[0, 101], row=2, col=1)
    fig.update_yaxes(title_text="ratio", range=[0, 1.02], row=3, col=1)
    fig.update_xaxes(title_text="optimizer step", row=3, col=1)
    fig.update_layout(**{**BASE, "margin": dict(l=60, r=20, t=90, b=50)}, height=640, title=title)
    return fig


# ----------------------------------------------------------------------------------------
# Gradient-direction conflicts
# ----------------------------------------------------------------------------------------


def changes_table(final_rows: pd.DataFrame, n_blocks: int, value: str = "changed_frac") -> pd.DataFrame:
    """Blocks x layer kinds (q, k, v, out, fc1, fc2, adaLN) of `value` in %, for the table and heatmap."""
    t = pd.DataFrame(index=range(n_blocks), columns=LAYER_COLUMNS, dtype=float)
    for _, r in final_rows.iterrows():
        t.loc[int(r["block"]), layer_kind(r["layer"])] = 100 * float(r[value])
    t = t.round(2)
    t.insert(0, "block", range(n_blocks))
    return t


CHANGE_SCALE = [[0.0, "#ffffff"], [0.25, "#fcbba1"], [0.6, "#ef3b2c"], [1.0, "#67000d"]]  # 0 % = white


def changes_heatmap(table: pd.DataFrame, selected: Optional[tuple] = None, title: str = "",
                    diff: Optional[pd.DataFrame] = None, diff_title: str = "") -> go.Figure:
    """Blocks x layer kinds heatmap (0 = white); with `diff` (another run's table) a second panel
    shows this run minus that one on a diverging scale centred on white."""
    z = table[LAYER_COLUMNS].to_numpy(dtype=float)
    ylab = [f"block {b}" for b in table["block"]]
    text = lambda a: np.where(np.isnan(a), "", np.vectorize(lambda v: f"{v:.1f}")(np.nan_to_num(a)))
    cols = 2 if diff is not None else 1
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.14,
                        subplot_titles=("this run", diff_title) if cols == 2 else None)
    bar = dict(title="%", x=0.44, xanchor="left", thickness=12) if cols == 2 else dict(title="% changed")
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 0.0
    if top <= 0:   # nothing changed: white everywhere (a zero-width colour range would paint it red), say so
        title = (title + "<br>" if title else "") + "<sub>no sub-vector changed codeword (0% everywhere)</sub>"
    fig.add_trace(go.Heatmap(x=LAYER_COLUMNS, y=ylab, z=z, colorscale=CHANGE_SCALE, zmin=0, zmax=max(top, 1.0),
                             colorbar=bar,
                             text=text(z), texttemplate="%{text}",
                             hovertemplate="%{y} · %{x}<br>%{z:.2f}% of sub-vectors changed codeword<extra></extra>"),
                  1, 1)
    if diff is not None:
        dz = z - diff[LAYER_COLUMNS].to_numpy(dtype=float)
        m = float(np.nanmax(np.abs(dz))) if np.isfinite(dz).any() else 1.0
        fig.add_trace(go.Heatmap(x=LAYER_COLUMNS, y=ylab, z=dz, colorscale="RdBu_r", zmid=0, zmin=-m, zmax=m,
                                 colorbar=dict(title="Δ points", thickness=12), text=text(dz), texttemplate="%{text}",
                                 hovertemplate="%{y} · %{x}<br>%{z:+.2f} points vs the compared run<extra></extra>"),
                      1, 2)
    if selected is not None:
        b, col = selected
        if col in LAYER_COLUMNS:
            xi = LAYER_COLUMNS.index(col)
            for c in range(1, cols + 1):
                fig.add_shape(type="rect", x0=xi - 0.5, x1=xi + 0.5, y0=b - 0.5, y1=b + 0.5,
                              line=dict(color="#1f77b4", width=3), row=1, col=c)
    fig.update_layout(**BASE, height=80 + 40 * len(table), title=title)
    fig.update_xaxes(title_text="layer in the block")
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="transformer block", row=1, col=1)
    if cols == 2:
        fig.update_yaxes(showticklabels=False, row=1, col=2)   # same rows as the left panel
    return fig


def block_mse_figure(per_block_mse: list, final_block_loss: Optional[list], method: str,
                     compare: Optional[tuple] = None) -> go.Figure:
    """Held-out block MSE per block (bars); `compare` = (per_block_mse, method, label) of another run."""
    if not per_block_mse:
        return message_figure("No per-block MSE recorded for this run.")
    b = [f"block {i}" for i in range(len(per_block_mse))]
    fig = go.Figure(go.Bar(x=per_block_mse, y=b, orientation="h", marker_color=color(method),
                           name="held-out trajectories" if not compare else "this run (held-out)",
                           hovertemplate="%{y}: %{x:.3g}<extra></extra>"))
    if compare and compare[0]:
        fig.add_trace(go.Bar(x=compare[0], y=b[:len(compare[0])], orientation="h", marker_color=color(compare[1]),
                             marker_pattern_shape="/", name=compare[2], hovertemplate="%{y}: %{x:.3g}<extra></extra>"))
    if final_block_loss:
        fig.add_trace(go.Scatter(x=final_block_loss, y=b, mode="markers", marker=dict(symbol="diamond", size=9,
                                 color="black"), name="last calibration step"))
    fig.update_layout(**BASE, height=80 + 40 * len(b), title="Block-output MSE vs FP", barmode="group",
                      xaxis=dict(title="MSE (block output units², log)", type="log"),
                      yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.3))
    return fig


# ----------------------------------------------------------------------------------------
# Rate-distortion across runs
# ----------------------------------------------------------------------------------------


def rd_figure(runs: pd.DataFrame, current: Optional[str] = None) -> go.Figure:
    """bits/weight vs image MSE against FP (same noise and labels) and vs block MSE, one colour per
    method; the current run is the large marker, cancelled / partial runs are open circles.
    (FD-digits needs >= 1,000 images to mean anything: a run's evaluation set is far smaller.)"""
    ok = runs.dropna(subset=["bits/weight"]) if len(runs) else runs
    if len(ok) == 0:
        return message_figure("No saved runs yet: start one in the Set-up panel.", 320)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("Image MSE vs FP, same noise (lower is better)",
                                        "Block-output MSE vs FP (lower is better)"))
    for m, g in ok.groupby("method"):
        for col, ycol in ((1, "image MSE vs FP"), (2, "block MSE")):
            sizes = [14 if r == current else 9 for r in g["run"]]
            partial = [str(st) != "finished" for st in g["status"]] if "status" in g else [False] * len(g)
            fig.add_trace(go.Scatter(x=g["bits/weight"], y=g[ycol], mode="markers", name=m, legendgroup=m,
                                     showlegend=col == 1, customdata=list(g["run"]),  # run id: a click loads it
                                     marker=dict(color=color(m), size=sizes, line=dict(width=1.5, color=color(m)),
                                                 symbol=["circle-open" if p else "circle" for p in partial]),
                                     text=[f"{r} ({st})" if p else r for r, st, p in
                                           zip(g["run"], g.get("status", g["run"]), partial)],
                                     hovertemplate="%{text}<br>%{x:.3f} bits/weight<br>"
                                     + ycol + " %{y:.4g}<extra></extra>"), 1, col)
    fig.update_xaxes(title_text="bits per weight (indices + codebooks + biases, as packed)")
    fig.update_yaxes(title_text="image MSE (log)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="MSE (log)", type="log", row=1, col=2)
    fig.update_layout(**BASE, height=360, legend=dict(orientation="h", y=-0.25))
    return fig


def side_by_side_figure(runs: pd.DataFrame) -> go.Figure:
    """Small multiples of picked runs: bits/weight, block MSE and image MSE vs FP, one bar per run
    (method colour), the same run order in every panel. Missing values are left out, not drawn as 0."""
    panels = [("bits/weight", "bits per weight (as packed)", False), ("block MSE", "block-output MSE (log)", True),
              ("image MSE vs FP (eval set)", "image MSE vs FP (log)", True)]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.06, shared_yaxes=True,
                        subplot_titles=[p[0] + (" (lower is better)" if p[2] else "") for p in panels])
    names = [f"{w} · {r}" for w, r in zip(runs["what"], runs["where"])]   # what the run is, then demo / when
    for col, (c, title, log) in enumerate(panels, 1):
        v = pd.to_numeric(runs[c], errors="coerce")
        fig.add_trace(go.Bar(x=v, y=names, orientation="h", marker_color=[color(m) for m in runs["method"]],
                             text=[f"{x:.3g}" if pd.notna(x) else "not stored" for x in v], textposition="auto",
                             showlegend=False, hovertemplate="%{y}<br>" + c + " %{x:.4g}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text=title, type="log" if log else "linear", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(**{**BASE, "margin": dict(l=20, r=20, t=50, b=50)}, height=120 + 44 * len(runs))
    fig.update_yaxes(automargin=True)
    return fig
