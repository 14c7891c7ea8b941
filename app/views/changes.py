"""Per-block changes: blocks x layer kinds heatmap of the share of sub-vectors that changed codeword."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from vq4dit.naming import layer_kind
from vq4dit.mechanism import changed_shares

from .. import plots
from ..store import run_label


class ChangesView:
    """The Per-block changes tab."""

    def change_table(self, run_id, step: Optional[int] = None) -> Optional[pd.DataFrame]:
        """Blocks x layer kinds: % of sub-vectors whose codeword differs from the one the run started
        from, at `step` (None = final): the library's one definition (`vq4dit.mechanism.changed_shares`),
        cached per (run, step). `.attrs["exact"]`: False when estimated on the trace's sample (older
        traces). None when the run has no trace."""
        tr = self.trace(run_id)
        if tr is None or not len(tr.layer_stats()):
            return None

        def make():
            shares = changed_shares(tr, step)
            n_blocks = int(self.store.meta(run_id).get("n_blocks") or self.engine.n_blocks)
            t = plots.changes_table(shares, n_blocks)
            t.attrs["exact"] = bool(len(shares) and shares["exact"].all())
            return t
        return self._proj.get_or_make(("changed", run_id, step), make)

    def changes(self, sel: dict):
        """(heatmap figure, table, per-block MSE figure) for the selected run at the selected
        snapshot; with a picked comparison run, also the difference heatmap and its MSE bars."""
        run_id = sel.get("run") if sel else None
        if not run_id:
            msg = plots.message_figure("No run selected.")
            return msg, pd.DataFrame(columns=["block"] + plots.LAYER_COLUMNS), msg
        meta = self.store.meta(run_id)
        n_blocks = int(meta.get("n_blocks") or self.engine.n_blocks)
        tr = self.trace(run_id)
        steps = self.steps_of(run_id)
        step = steps[min(sel.get("snap", 0), len(steps) - 1)] if tr is not None and steps else None
        table = self.change_table(run_id, step)
        other = sel.get("other")
        om = self.store.meta(other) if other and other != run_id else None
        if table is not None:
            cell = (sel["block"], layer_kind(sel["layer"])) if sel.get("layer") else None
            diff = self.change_table(other) if om else None
            how = "every sub-vector" if table.attrs.get("exact") else "estimated on the trace's sample"
            heat = plots.changes_heatmap(
                table, cell, title=f"Codeword differs from the run's start, step {step}<br>"
                                   f"<sub>{run_label(meta)} · {how}</sub>",
                diff=diff, diff_title=f"minus {run_label(om)} (final)" if om else "")
        else:
            table = pd.DataFrame(columns=["block"] + plots.LAYER_COLUMNS)
            heat = plots.message_figure(f"{meta['method']} keeps no assignment trace (no calibration).")
        last = None
        if tr is not None and len(tr.steps):
            row = tr.steps.iloc[-1]
            last = [float(row[f"block_{b}"]) for b in range(n_blocks) if f"block_{b}" in row]
        cmp = (om.get("per_block_mse") or [], om["method"], f"{run_label(om)} ({other})") if om else None
        mse = plots.block_mse_figure(meta.get("per_block_mse") or [], last, meta["method"], compare=cmp)
        return heat, table, mse
