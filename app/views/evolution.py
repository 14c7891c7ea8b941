"""Assignment evolution: how sure each sub-vector is of its codeword over calibration."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from .. import plots
from ..config import method_spec


class EvolutionView:
    """The Assignment evolution tab."""

    def evolution(self, sel: dict):
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        tr = self.trace(run_id) if run_id else None
        if tr is None or not layer:
            return plots.message_figure("No calibration trace for this run." if run_id else "No run selected.")
        spec = method_spec(tr.method)
        if spec is not None and not spec.trains_assignments:
            return plots.message_figure(f"{tr.method} keeps the k-means assignments fixed: it has no assignment "
                                        f"ratios to show (only its codebooks and biases train).")
        steps = self.steps_of(run_id)
        step = steps[min(sel.get("snap", 0), len(steps) - 1)]
        hard = tr.hard_steps().get(layer)
        return plots.evolution_figure(tr.ratio_histogram(layer), tr.layer_stats(layer), tr.ratio_paths(layer), hard,
                                      title=f"{plots.layer_label(layer)} — {tr.method}: "
                                            f"how sure each sub-vector is of its codeword", current_step=step,
                                      end_step=tr.steps_done if hard is None else None,
                                      switched=switched_paths(tr, layer))


def switched_paths(tr, layer: str, limit: int = 8) -> Optional[pd.DataFrame]:
    """(step, sample, ratio_nearest) at the snapshot steps for up to `limit` sampled sub-vectors whose
    final codeword differs from the k-means one. The trace's own ratio paths follow a fixed few
    sub-vectors that rarely switch; the snapshots hold every sampled one. With n = 2 candidates the
    k-means codeword's ratio is the top ratio while it is still chosen and 1 - top ratio after the
    switch (1 / 0 once hard); other n: None."""
    if tr.n_candidates != 2 or not tr.has_samples(layer):
        return None
    steps = tr.snapshot_steps(layer)
    snaps = [tr.snapshot(layer, t) for t in steps]
    moved = np.flatnonzero(snaps[-1].assign != snaps[0].assign)[:limit]
    if not len(moved):
        return None
    rows = [dict(step=t, sample=int(j), ratio_nearest=float(sn.top_ratio[j] if sn.assign[j] == snaps[0].assign[j]
                                                               else 1.0 - sn.top_ratio[j]))
            for t, sn in zip(steps, snaps) for j in moved]
    return pd.DataFrame(rows)
