"""Runs side by side: the Runs tab's multi-select of runs, compared by what they are."""
from __future__ import annotations

import math

import pandas as pd

from .. import plots
from ..store import run_label

SIDE_BY_SIDE_MAX = 6   # runs compared at once (more rows would not fit one picture)
SIDE_BY_SIDE_COLUMNS = ["run", "what", "where", "method", "k x d", "bits/weight", "block MSE",
                        "image MSE vs FP (eval set)", "accuracy", "status"]  # also the empty table's headers


class RunsView:
    """Key metrics of several picked runs (the images come from `ImagesView.images_of`)."""

    def side_by_side(self, run_ids) -> tuple:
        """(note, figure, table) for the picked runs, in the order picked: per run its label (method,
        k x d, bits/weight), bits/weight, block MSE and the stored image metrics. Ids that are not
        readable saved runs are dropped (and said so); at most SIDE_BY_SIDE_MAX."""
        readable = set(self.store.readable_ids())
        picked = [r for r in dict.fromkeys(run_ids or []) if isinstance(r, str)]
        ids = [r for r in picked if r in readable][:SIDE_BY_SIDE_MAX]
        rows = []
        for rid in ids:
            m = self.store.meta(rid)
            met = m.get("metrics") or {}
            rows.append({"run": rid, "what": run_label(m), "where": "demo" if self.store.is_demo(rid) else rid[:15],
                         "method": m.get("method"),
                         "k x d": f"{m.get('k')}x{m.get('d')}" if m.get("k") else "-",
                         "bits/weight": _num(m.get("bits_per_weight"), 3), "block MSE": _num(m.get("block_mse"), 5),
                         "image MSE vs FP (eval set)": _num(met.get("image_mse"), 5), "accuracy": _num(met.get("accuracy"), 3),
                         "status": m.get("status", "?")})
        table = pd.DataFrame(rows, columns=SIDE_BY_SIDE_COLUMNS)
        if not rows:
            note = "Tick two or more runs above to see them side by side."
            return note, plots.message_figure("No runs picked."), table
        dropped = len(picked) - len(ids)
        note = (f"**{len(ids)} runs side by side**, labelled by what they are (method, k×d, bits/weight). "
                "Images: the Images tab's labels, seed, guidance and sampler steps for every run (same noise)."
                + (f" {dropped} picked run(s) left out (unreadable, or more than {SIDE_BY_SIDE_MAX})." if dropped else ""))
        return note, plots.side_by_side_figure(table), table


def _num(v, n):
    try:
        return None if v is None or not math.isfinite(float(v)) else round(float(v), n)
    except (TypeError, ValueError):
        return None
