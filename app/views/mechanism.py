"""Mechanism: does reassignment do what the paper says, at this setting? One verdict per measure.

Reads the library's measures (`vq4dit.mechanism`): the premise (conflict inside codewords against a
random regrouping of the same gradients), the moves (do moved sub-vectors agree better with their new
codeword?), the paired run in loss units (same k, d, init and seed, codebook-only vs an
assignment-training method) and the hard switch (by itself, or forced at the end).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vq4dit.mechanism import (hard_switch_verdict, moves_verdict, paired_verdict, premise_verdict, soft_hard_gap,
                              switch_table)

from .. import plots
from ..store import run_label


def _mark(v) -> str:
    if v.measure == "Hard switch":
        return {True: "**switched by itself**", False: "**forced at the end**", None: "**no data**"}[v.effect]
    return {True: "**effect**", False: "**no effect**", None: "**no data**"}[v.effect]


class MechanismView:
    """The Mechanism tab (needs ConflictView.conflict_pair for the paired run)."""

    def mechanism(self, sel: dict):
        """(verdicts markdown, figure) for the selected run and its pair."""
        run_id = (sel or {}).get("run")
        if not run_id:
            return "No run selected.", plots.message_figure("No run selected.")
        key = ("mechanism", run_id, (sel or {}).get("other"))
        return self._proj.get_or_make(key, lambda: self._mechanism(run_id, (sel or {}).get("other")))

    def _mechanism(self, run_id, other):
        pair, missing = self.conflict_pair(run_id, other)
        side_a = pair.get("assignments") or pair.get("selected")
        side_b = pair.get("fixed") or pair.get("compare")
        tr_a = self.trace(side_a) if side_a else None
        lines = []
        if tr_a is None:
            return (f"`{run_id}` has no calibration trace: the mechanism needs a calibrated run.",
                    plots.message_figure("No calibration trace for this run."))
        meta_a = self.store.meta(side_a)
        lines.append(f"**Run:** `{side_a}` ({run_label(meta_a)})" + (
            f" · **paired with** `{side_b}` ({run_label(self.store.meta(side_b))})" if side_b else
            f" · **no paired {missing or 'baseline'} run** with the same k×d and init yet (Gradient conflicts tab: "
            f"press its Run button)"))
        verdicts = [premise_verdict(tr_a), moves_verdict(tr_a)]
        mb = self.store.meta(side_b) if side_b else None
        if mb is not None:
            verdicts.append(paired_verdict(meta_a.get("per_block_mse") or [], mb.get("per_block_mse") or [],
                                           meta_a["method"], mb["method"]))
            ia, ib = (meta_a.get("metrics") or {}).get("image_mse"), (mb.get("metrics") or {}).get("image_mse")
            if ia and ib:
                verdicts[-1].text += (f" Image MSE vs FP on the run's evaluation set: {ia:.4g} vs {ib:.4g} "
                                      f"(ratio {ia / ib:.2f}; one seed: no interval).")
        verdicts.append(hard_switch_verdict(tr_a))
        gap = soft_hard_gap(tr_a, meta_a.get("block_mse"))
        for v in verdicts:
            lines.append(f"- {_mark(v)} — {v.text}")
        if gap is not None:
            lines.append(f"- **soft-to-hard gap** — soft model (last calibration steps) block loss {gap['soft']:.4g}, "
                         f"hard model (held-out) {gap['hard']:.4g}: {gap['ratio']:.1f}× (the soft forward trains "
                         f"codebooks for mixtures the shipped hard model does not use).")
        return "\n".join(lines), self._figure(tr_a, meta_a, mb)

    def _figure(self, tr, meta_a, mb) -> go.Figure:
        """Left: per layer, share of conflicting sub-vectors at the start, observed vs a random regrouping
        (axis from 0). Right: per-block MSE of the two paired runs (axis from 0)."""
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
            "Conflict at the start: observed vs random regrouping", "Block MSE vs FP: the paired runs"))
        st = tr.layer_stats()
        if len(st) and "loo_conflict_share" in st:
            first = st[st["loo_conflict_share"].notna()].groupby("layer", sort=False).head(1)
            x = [plots.layer_label(n) for n in first["layer"]]
            fig.add_trace(go.Bar(x=x, y=100 * first["loo_conflict_share"], name="observed (leave-one-out)",
                                 marker_color="#d62728"), 1, 1)
            fig.add_trace(go.Bar(x=x, y=100 * first["null_conflict_share"], name="random regrouping (null)",
                                 marker_color="#bbbbbb"), 1, 1)
        else:
            fig.add_annotation(text="not recorded in this trace<br>(older run)", showarrow=False, xref="paper",
                               yref="paper", x=0.2, y=0.5, font=dict(size=14, color="#777"))
        for m, color in ((meta_a, plots.color(meta_a["method"])), (mb, plots.color(mb["method"]) if mb else None)):
            if m is None or not m.get("per_block_mse"):
                continue
            y = np.asarray(m["per_block_mse"], float)
            fig.add_trace(go.Bar(x=[f"block {b}" for b in range(len(y))], y=y, name=run_label(m), marker_color=color),
                          1, 2)
        fig.update_layout(**plots.BASE, height=420, barmode="group", legend=dict(orientation="h", y=-0.3, x=0))
        fig.update_yaxes(rangemode="tozero")
        fig.update_yaxes(title_text="% of sub-vectors with cos < 0", row=1, col=1)
        fig.update_yaxes(title_text="block-output MSE", row=1, col=2)
        fig.update_xaxes(showticklabels=False, row=1, col=1)
        return fig

    def switch_steps(self, run_id):
        """Per layer: hard-switch step and whether it was forced at the end (a table)."""
        tr = self.trace(run_id)
        return switch_table(tr) if tr is not None else None
