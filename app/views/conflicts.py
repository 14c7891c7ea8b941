"""Gradient conflicts: the paper's per-codeword statistic for the comparison pair."""
from __future__ import annotations

from typing import Optional

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
        fig = plots.conflict_figure(per_run, title=f"Gradient agreement inside codewords — {plots.layer_label(layer)}")
        # worst codeword of the selected run (or of the assignment-training side when the selection has no trace)
        tr = self.trace(run_id)
        if tr is None and pair.get("assignments") or tr is None and pair.get("compare"):
            tr = self.trace(pair.get("assignments") or pair.get("compare"))
        wfig = plots.worst_codeword_figure(None, None, None, meta["method"])
        if tr is not None and layer in tr.layer_names:
            steps = tr.snapshot_steps(layer)
            want = steps[min(sel.get("snap", 0), len(steps) - 1)]
            have = tr.gradient_steps(layer)
            if have:
                s = min(have, key=lambda x: (abs(x - want), x))
                snap = tr.snapshot(layer, s)
                wfig = plots.worst_codeword_figure(snap.worst_grads, snap.worst_codeword, s, tr.method)
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
        fig = plots.conflict_summary_figure(per_run, "Conflict share per layer over the whole run")
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
