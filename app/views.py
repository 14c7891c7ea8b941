"""What each view shows for the shared selection (run, block, layer, snapshot), with caches.

Selection dict: {"run": run id, "block": int, "layer": full layer name, "snap": snapshot index}.
Projections are computed once per (run, layer, method) and cover every snapshot, so scrubbing
the step slider only re-draws. Nothing here trains or quantizes: it reads saved traces.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import pandas as pd
import torch

from vq4dit.config import DEFAULT_METHOD, METHODS, MethodSpec, method_names
from vq4dit.naming import block_index, layer_kind

from . import plots
from .runs import APP_LIMITS, DEMO_METHOD, Engine, image_params


def method_spec(method: Optional[str]) -> Optional[MethodSpec]:
    """Registry entry of a run's method ('m+switch=..' derived names map to m); None if unknown."""
    return METHODS.get((method or "").split("+", 1)[0])


FULL_CLUSTER_MAX = 200_000  # sub-vectors drawn in the full-weight cluster view (more: an evenly strided sample)


class Views:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self._proj: OrderedDict = OrderedDict()
        self._metrics: dict = {}   # (run, labels, seed, guidance, steps) -> image metrics
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------
    # Selection helpers
    # ------------------------------------------------------------------------------------
    def trace(self, run_id):
        return self.store.trace(run_id) if run_id else None

    def layers_of(self, run_id) -> list[str]:
        tr = self.trace(run_id)
        if tr is not None:
            return tr.layer_names
        meta = self.store.meta(run_id)
        from vq4dit.size import quantized_layers
        return list(quantized_layers(self.store.model(run_id).transformer)) if meta else []

    def layer_choices(self, run_id, block: int) -> list[tuple[str, str]]:
        names = [n for n in self.layers_of(run_id) if block_index(n) == int(block)]
        order = {c: i for i, c in enumerate(plots.LAYER_COLUMNS)}
        names.sort(key=lambda n: order.get(layer_kind(n), 99))
        return [(f"{layer_kind(n)} ({n.split('.', 2)[-1]})", n) for n in names]

    def run_choices(self) -> list[tuple[str, str]]:
        """(label, run id) for the run pickers, oldest first (demo runs first); partial runs and demo
        runs say so in the label."""
        out = []
        for r in self.store.list():
            if r.error is not None:
                continue
            m = r.meta
            st = m.get("status", "?")
            tag = "" if st == "finished" else f" — {st}" + (
                f" {m.get('steps_done')}/{m.get('total_steps')}" if m.get("total_steps") else "")
            if self.store.is_demo(r.id):
                tag += " — demo (read-only)"
            out.append((f"{r.id}{tag}", r.id))
        return out

    def default_run(self) -> Optional[str]:
        """The run shown on first open: the newest finished saved run, else the demo run of
        DEMO_METHOD at W2, else any finished demo run, else None."""
        finished = [r.id for r in self.store.list() if r.error is None and r.meta.get("status") == "finished"]
        own = [r for r in finished if not self.store.is_demo(r)]
        if own:
            return own[-1]
        demo = [r for r in finished if self.store.is_demo(r)]
        want = next((r for r in demo if self.store.meta(r).get("method") == DEMO_METHOD
                     and int(self.store.meta(r).get("bits", 0)) == 2), None)
        return want or (demo[0] if demo else None)

    def steps_of(self, run_id) -> list[int]:
        tr = self.trace(run_id)
        return tr.snapshot_steps() if tr is not None else [0]

    def initial_selection(self, run_id, block: Optional[int] = None, layer: Optional[str] = None) -> dict:
        """Keep block and layer kind when switching runs; snapshot = last (the final model)."""
        if not run_id:
            return dict(run=None, block=0, layer=None, snap=0)
        n_blocks = int(self.store.meta(run_id).get("n_blocks") or self.engine.n_blocks)
        block = block if block is not None and 0 <= int(block) < n_blocks else 0
        choices = [v for _, v in self.layer_choices(run_id, int(block))]
        kind = layer_kind(layer) if layer else None
        pick = next((v for v in choices if layer_kind(v) == kind), choices[0] if choices else None)
        return dict(run=run_id, block=int(block), layer=pick, snap=max(len(self.steps_of(run_id)) - 1, 0))

    def describe(self, sel: dict) -> str:
        if not sel or not sel.get("run"):
            return "**No run selected.** Start a run in *Set up & calibrate*, or pick a saved one in *Runs*."
        m = self.store.meta(sel["run"])
        met = m.get("metrics") or {}
        steps = self.steps_of(sel["run"])
        step = steps[min(sel.get("snap", 0), len(steps) - 1)] if steps else 0
        kd = f"k={m.get('k')}, d={m.get('d')}, " if m.get("k") else ""
        lay = sel.get("layer")
        shape = ""
        tr = self.trace(sel["run"])
        if tr is not None and lay in tr.layer_names:
            shape = " · weight " + "×".join(str(s) for s in tr.layer_info(lay).shape)
        fd = met.get("fd_digits")
        other = sel.get("other")
        cmp = ""
        if other and other != sel["run"]:
            om = self.store.meta(other)
            cmp = f" · **Compared with** `{other}` ({om['method']}, W{om['bits']}, {om.get('status', '?')})"
        demo = " (**demo run**, shipped with the app, read-only)" if self.store.is_demo(sel["run"]) else ""
        return (f"**Run** `{sel['run']}`{demo} — {m['method']}, W{m['bits']} ({kd}{m.get('bits_per_weight', 0):.3f} bits/weight), "
                f"{m.get('status', '?')}, block MSE {m.get('block_mse') or float('nan'):.4g}"
                + (f", FD-digits {fd:.2f}" if fd is not None and math.isfinite(fd) else "")
                + (f" · **Layer** {plots.layer_label(lay)}{shape}" if lay else "")
                + (f" · **Snapshot** step {step} of {m.get('steps_done') or steps[-1]}" if tr is not None else "")
                + cmp)

    # ------------------------------------------------------------------------------------
    # Calibration curves and per-block heatmaps (depend on the run only)
    # ------------------------------------------------------------------------------------
    def calibration(self, run_id):
        tr = self.trace(run_id)
        if tr is None:
            m = self.store.meta(run_id)["method"] if run_id else None
            return plots.message_figure(f"{m} has no calibration: nothing to plot." if m else "No run selected.", 300)
        return plots.calibration_figure(tr.steps, title=f"Calibration of {run_id}", uirevision=run_id,
                                        total_steps=tr.total_steps)

    def change_table(self, run_id, step: Optional[int] = None) -> Optional[pd.DataFrame]:
        """Blocks x layer kinds: % of sub-vectors whose codeword differs from k-means at `step`
        (the last record at or before it; None = final). None when the run has no trace."""
        tr = self.trace(run_id)
        stats = tr.layer_stats() if tr is not None else pd.DataFrame()
        if not len(stats):
            return None
        if step is not None:
            stats = stats[stats["step"] <= step]
        final = stats.groupby("layer", sort=False).tail(1)   # rows are sorted by step
        n_blocks = int(self.store.meta(run_id).get("n_blocks") or self.engine.n_blocks)
        return plots.changes_table(final, n_blocks)

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
            heat = plots.changes_heatmap(
                table, cell, title=f"Sub-vectors whose codeword differs from k-means at step {step} — "
                                   f"{meta['method']} W{meta['bits']}",
                diff=diff, diff_title=f"minus {om['method']} W{om['bits']} (final)" if om else "")
        else:
            table = pd.DataFrame(columns=["block"] + plots.LAYER_COLUMNS)
            heat = plots.message_figure(f"{meta['method']} keeps no assignment trace (no calibration).")
        last = None
        if tr is not None and len(tr.steps):
            row = tr.steps.iloc[-1]
            last = [float(row[f"block_{b}"]) for b in range(n_blocks) if f"block_{b}" in row]
        cmp = (om.get("per_block_mse") or [], om["method"], f"{om['method']} W{om['bits']} ({other})") if om else None
        mse = plots.block_mse_figure(meta.get("per_block_mse") or [], last, meta["method"], compare=cmp)
        return heat, table, mse

    # ------------------------------------------------------------------------------------
    # Codebook clusters
    # ------------------------------------------------------------------------------------
    def projection(self, run_id, layer, method: str) -> dict:
        """2-D coordinates of the sampled sub-vectors and of every snapshot's codebook (cached)."""
        key = (run_id, layer, method)
        with self._lock:
            if key in self._proj:
                self._proj.move_to_end(key)
                return self._proj[key]
        tr = self.trace(run_id)
        fp = tr.samples(layer)[0].astype(np.float64)                      # (n, d)
        steps = tr.snapshot_steps(layer)
        books = [tr.snapshot(layer, s).codebook.astype(np.float64) for s in steps]  # each (k, d)
        d = fp.shape[1]
        if d <= 2 and method != "UMAP":
            f = (lambda x: np.concatenate([x, np.zeros_like(x)], 1)) if d == 1 else (lambda x: x)
            out = dict(samples=f(fp), books={s: f(b) for s, b in zip(steps, books)}, axis="raw coordinate",
                       note=f"d={d}: raw sub-vector coordinates (no projection needed)", transform=f)
        elif method == "UMAP":
            import umap
            allx = np.concatenate([fp] + books)
            emb = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(allx)
            parts, i = [], len(fp)
            for b in books:
                parts.append(emb[i:i + len(b)])
                i += len(b)
            out = dict(samples=emb[:len(fp)], books=dict(zip(steps, parts)), axis="UMAP",
                       note="UMAP fitted once on the sample plus every snapshot's codebook (n_neighbors=15, "
                            "min_dist=0.1, seed 0); distances are only locally meaningful")
        else:
            from sklearn.decomposition import PCA
            p = PCA(n_components=2, random_state=0).fit(fp)
            out = dict(samples=p.transform(fp), books={s: p.transform(b) for s, b in zip(steps, books)}, axis="PC",
                       note=f"PCA fitted on the sampled sub-vectors ({100 * p.explained_variance_ratio_.sum():.0f}% "
                            f"of their variance shown)", transform=p.transform)
        with self._lock:
            self._proj[key] = out
            while len(self._proj) > 64:
                self._proj.popitem(last=False)
        return out

    def cluster(self, sel: dict, color_by: str, method: str, full: bool = False):
        """(figure, note) of the cluster view. `full`: every sub-vector of the layer's final state as a
        density image (final snapshot, PCA / raw coordinates only; snapshots and UMAP keep the sample)."""
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        tr = self.trace(run_id) if run_id else None
        if tr is None or not layer or not tr.has_samples(layer):
            why = "No run selected." if not run_id else "This run has no codebook trace (no calibration)."
            return plots.message_figure(why, 480), why
        steps = tr.snapshot_steps(layer)
        step = steps[min(sel.get("snap", 0), len(steps) - 1)]
        pr = self.projection(run_id, layer, method)
        if full and step == steps[-1] and pr.get("transform") is not None:
            return self.full_cluster(run_id, layer, pr, color_by)
        snap, snap0 = tr.snapshot(layer, step), tr.snapshot(layer, steps[0])
        assign, assign0, top = snap.assign, snap0.assign, snap.top_ratio
        info = tr.layer_info(layer)
        fig = plots.cluster_figure(pr["samples"], pr["books"][step], pr["books"][steps[0]] if step != steps[0] else None,
                                   assign, top, assign0, color_by,
                                   title=f"{plots.layer_label(layer)} — step {step}: sub-vectors and codewords",
                                   axis=pr["axis"], n_candidates=tr.n_candidates, uirevision=f"{run_id}|{layer}|{method}")
        changed = float((assign != assign0).mean()) * 100
        note = (f"Sampled **{len(assign):,} of {info.n_subvectors:,}** sub-vectors (the same fixed random sample at "
                f"every step) and all **{info.k}** codewords (d={info.d}). {pr['note']}. At step {step}, "
                f"{changed:.1f}% of the sampled sub-vectors use a different codeword than after k-means.")
        if full:
            why = "UMAP" if pr.get("transform") is None else f"step {step} is not the final snapshot"
            note = (f"**All sub-vectors** are shown for the final snapshot with PCA (or raw coordinates) only ({why}): "
                    f"showing the trace's sample. ") + note
        return fig, note

    def full_weights(self, run_id, layer) -> dict:
        """Every sub-vector of `layer` (FP values from the loaded model, which the run quantized) with its
        final codeword (from the run's packed model) and the nearest k-means codeword (step-0 codebook);
        at most FULL_CLUSTER_MAX, an evenly strided sample above that. Cached per (run, layer)."""
        key = ("full", run_id, layer)
        with self._lock:
            if key in self._proj:
                self._proj.move_to_end(key)
                return self._proj[key]
        tr = self.trace(run_id)
        info = tr.layer_info(layer)
        w = dict(self.engine.teacher.named_modules())[layer].weight.detach().float().cpu()
        q = dict(self.store.model(run_id).transformer.named_modules()).get(layer)
        if q is None or not hasattr(q, "indices") or tuple(w.shape) != info.shape:
            raise ValueError(f"{layer}: the run's packed model has no codebook layer matching the loaded model")
        x = w.reshape(-1, info.d)                                            # (S, d) every sub-vector
        total = len(x)
        idx = torch.arange(total)
        if total > FULL_CLUSTER_MAX:
            idx = torch.linspace(0, total - 1, FULL_CLUSTER_MAX).long()
        x = x[idx]
        assign = q.indices().detach().cpu()[idx]
        book0 = torch.from_numpy(tr.snapshot(layer, tr.snapshot_steps(layer)[0]).codebook).float()
        near0 = torch.cat([torch.cdist(c, book0).argmin(1) for c in x.split(32768)])  # nearest k-means codeword
        out = dict(x=x.numpy().astype(np.float64), assign=assign.numpy(), changed=(assign != near0).numpy(),
                   codebook=q.codebook.detach().float().cpu().numpy().astype(np.float64), total=total)
        with self._lock:
            self._proj[key] = out
            while len(self._proj) > 64:
                self._proj.popitem(last=False)
        return out

    def full_cluster(self, run_id, layer, pr: dict, color_by: str):
        fw = self.full_weights(run_id, layer)
        tr = self.trace(run_id)
        steps = tr.snapshot_steps(layer)
        xy = pr["transform"](fw["x"])
        by_change = color_by == "assignment changed"
        fig = plots.density_figure(xy, pr["transform"](fw["codebook"]), pr["books"][steps[0]],
                                   fw["changed"] if by_change else None,
                                   title=f"{plots.layer_label(layer)} — final model: all sub-vectors (density) and codewords",
                                   axis=pr["axis"], uirevision=f"{run_id}|{layer}|full")
        n, total = len(xy), fw["total"]
        shown = f"**all {n:,}** sub-vectors" if n == total else f"sampled **{n:,} of {total:,}** sub-vectors (evenly strided)"
        colour = "colour: share changed per bin" if by_change else "log colour"
        note = (f"Final model, {shown} of this layer as a density image ({plots.DENSITY_BINS}² bins, {colour}) and "
                f"all **{len(fw['codebook'])}** codewords from the packed model. {pr['note']}. "
                f"{100 * float(fw['changed'].mean()):.1f}% of them use a different codeword than the nearest k-means "
                f"codeword" + (" (colour: share changed per bin)." if by_change else ".")
                + (" Every final sub-vector has top ratio 1 (the packed model is hard): colour shows density."
                   if color_by == "top ratio" else ""))
        return fig, note

    # ------------------------------------------------------------------------------------
    # Assignment evolution
    # ------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------
    # Gradient-direction conflicts
    # ------------------------------------------------------------------------------------
    def newest(self, bits: int, want, exclude: Optional[str] = None, kd: Optional[tuple] = None) -> Optional[str]:
        """Newest *finished* readable run at `bits` (and codebook shape `kd` = (k, d) when given) whose
        method spec satisfies `want(spec)`. Cancelled or partial runs are never picked automatically."""
        for r in reversed(self.store.list()):
            m = r.meta or {}
            if (r.error is None and r.id != exclude and m.get("status") == "finished"
                    and int(m.get("bits", -1)) == int(bits) and want(method_spec(m.get("method")))
                    and (kd is None or (m.get("k"), m.get("d")) == tuple(kd))):
                return r.id
        return None

    def baselines(self, bits: int, exclude: Optional[str] = None, limit: int = 4) -> list[str]:
        """Newest finished run of every other method at `bits`, preferring the excluded run's k x d
        (partial runs only when picked)."""
        em = self.store.meta(exclude) if exclude else {}
        ex, kd = em.get("method"), (em.get("k"), em.get("d"))
        seen, out = {ex}, []
        runs = list(reversed(self.store.list()))
        runs.sort(key=lambda r: (r.meta or {}).get("k") != kd[0] or (r.meta or {}).get("d") != kd[1])  # same k x d first
        for r in runs:
            m = r.meta or {}
            if (r.error is None and m.get("status") == "finished" and int(m.get("bits", -1)) == int(bits)
                    and m.get("method") not in seen):
                seen.add(m["method"])
                out.append(r.id)
        return out[:limit]

    def conflict_pair(self, run_id, compare: Optional[str] = None) -> tuple[dict, Optional[str]]:
        """{side: run id or None} for the paper's comparison at the run's bits: a method that trains
        assignments vs one that keeps the k-means assignments (both from the registry), and the
        registry name of the method to run for a missing side (None when both exist). A picked
        `compare` run replaces the automatic choice: any two runs, any bits."""
        if compare and compare != run_id:
            return {"selected": run_id, "compare": compare}, None
        meta = self.store.meta(run_id)
        bits, spec = int(meta["bits"]), method_spec(meta["method"])
        trains = lambda sp: sp is not None and sp.calibrated and sp.trains_assignments
        fixed = lambda sp: sp is not None and sp.calibrated and not sp.trains_assignments
        kd = (meta.get("k"), meta.get("d"))
        near = lambda want, ex=None: self.newest(bits, want, exclude=ex, kd=kd) or self.newest(bits, want, exclude=ex)
        if trains(spec):  # same k x d first (W2 vs W2, not vs XL-sharing), else any at these bits
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
            used.append(f"`{rid}` ({tr.method}, W{self.store.meta(rid)['bits']})")
        how = "picked in *Compare with*" if "compare" in pair else f"newest finished at W{meta['bits']}"
        note = f"Comparing {' and '.join(used) if used else 'nothing'} ({how}), layer {plots.layer_label(layer)}."
        if missing:
            note += (f" **No saved {missing} run at W{meta['bits']} yet** (only finished runs are picked "
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

    # ------------------------------------------------------------------------------------
    # Images side by side
    # ------------------------------------------------------------------------------------
    def parse_labels(self, text: str) -> list[int]:
        n = self.engine.n_classes
        out = []
        if len(str(text or "")) > 1000:
            raise ValueError("the class-label text is too long (at most 1000 characters)")
        for part in str(text or "").replace(" ", ",").split(","):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    a, b = int(a), int(b)
                    if b - a + 1 + len(out) > APP_LIMITS["image_labels"]:  # checked before allocating
                        raise OverflowError
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ValueError(f"class labels must be integers like '0,1,2' or '0-9', got {part[:40]!r}") from None
            except OverflowError:
                raise ValueError(f"at most {APP_LIMITS['image_labels']} images at a time "
                                 f"(the range {part[:40]!r} is too long)") from None
            if len(out) > APP_LIMITS["image_labels"]:
                raise ValueError(f"at most {APP_LIMITS['image_labels']} images at a time")
        if not out:
            raise ValueError("give at least one class label, e.g. '0-9'")
        bad = [x for x in out if not 0 <= x < n]
        if bad:
            raise ValueError(f"class labels must be in [0, {n - 1}], got {bad[:5]}")
        if len(out) > 32:
            raise ValueError(f"at most 32 images at a time, got {len(out)} labels")
        return out

    def images_ready(self, run_id, labels_text, seed, guidance, steps, compare: Optional[str] = None) -> bool:
        """Can `images(...)` answer without sampling (every row cached, or shipped with a demo run)?"""
        try:
            labels = self.parse_labels(labels_text)
            seed, guidance, steps = image_params(seed, guidance, steps)
            keys = ["fp"]
            if run_id:
                keys.append(run_id)
                bits = int(self.store.meta(run_id)["bits"])
                keys += [compare] if compare and compare != run_id else self.baselines(bits, exclude=run_id)
        except ValueError:
            return False
        return all(self.engine.has_images(k, labels, seed, guidance, steps) for k in keys)

    def images(self, run_id, labels_text, seed, guidance, steps, compare: Optional[str] = None):
        """(composite image uint8, metrics table, note). Same seeds/labels/sampler for every model.
        Rows: FP, the selected run, then the picked comparison run or (none picked) the newest
        finished run of every other method at the same bits."""
        labels = self.parse_labels(labels_text)
        seed, guidance, steps = image_params(seed, guidance, steps)
        eng = self.engine
        fp = eng.fp_images(labels, seed, guidance, steps)
        rows = [("FP (reference)", "fp", "fp", fp)]
        if run_id:
            meta = self.store.meta(run_id)
            rows.append((f"{meta['method']} W{meta['bits']} (selected)", run_id, meta["method"],
                         eng.run_images(run_id, labels, seed, guidance, steps)))
            others = [compare] if compare and compare != run_id else self.baselines(int(meta["bits"]), exclude=run_id)
            for b in others:
                bm = self.store.meta(b)
                tag = " (compare)" if compare else ""
                if bm.get("status") != "finished":
                    tag += f" [{bm.get('status')}]"
                try:
                    rows.append((f"{bm['method']} W{bm['bits']}{tag}", b, bm["method"],
                                 eng.run_images(b, labels, seed, guidance, steps)))
                except ValueError:
                    if compare:
                        raise
                    continue
        table, preds = [], {}
        for label, rid, method, x in rows:
            key = (rid, tuple(labels), seed, guidance, steps)   # same key as the image cache
            m = self._metrics.get(key)
            if m is None:
                m = self._metrics[key] = eng.image_metrics(x, labels, None if rid == "fp" else fp)
                while len(self._metrics) > 64:
                    self._metrics.pop(next(iter(self._metrics)))
            preds[rid] = m.get("pred")
            table.append({"model": label, "run": rid if rid != "fp" else "-",
                          "accuracy": _r(m.get("accuracy"), 3),
                          "PSNR vs FP (dB)": _r(m.get("psnr"), 2), "MSE vs FP": _r(m.get("image_mse"), 5)})
        img = composite(rows, labels, preds, fp)
        note = (f"{len(labels)} images per model, seed {seed}, guidance {guidance:g}, {steps} DDIM steps; "
                f"every model starts from the same noise. "
                + (f"Compared with `{compare}` (picked in *Compare with*)." if compare else
                   f"Baselines: newest finished run of each other method at the same bits "
                   f"({len(rows) - 2 if run_id else 0} found; pick any run in *Compare with*)."))
        return img, pd.DataFrame(table), note


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


def _r(v, n):
    """Rounded for a table; None for missing or non-finite values (NaN FD of one image, inf PSNR)."""
    return None if v is None or not np.isfinite(float(v)) else round(float(v), n)


def composite(rows, labels, preds, fp) -> np.ndarray:
    """One picture: per model a row of images (with predicted class) and a row of |image - FP|.
    Each row of tiles is a `vq4dit.viz.make_grid` strip."""
    from PIL import Image, ImageDraw

    from vq4dit.viz import make_grid
    h = fp.shape[-1]
    scale = max(1, 64 // h)
    pad, label_w, text_h = 4, 190, 14
    cell = h * scale
    n = len(labels)
    lines = []
    for label, rid, method, x in rows:
        lines.append(("img", label, rid, method, x))
        if rid != "fp":
            # |x - FP| averaged over channels, 1 = half the range -> white (same) .. red (off by >= 1),
            # written as an RGB image in [-1, 1] so the one grid helper draws it
            dif = (x.float() - fp.float()).abs().mean(1, keepdim=True).clamp(0, 1)       # (N, 1, H, W)
            red = torch.cat([torch.ones_like(dif), 1 - 2 * dif, 1 - 2 * dif], 1)
            lines.append(("diff", "|difference| vs FP", rid, method, red))
    W = label_w + n * (cell + pad) + pad
    H = sum(cell + 2 * pad + (text_h if kind == "img" else 0) for kind, *_ in lines) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for kind, label, rid, method, x in lines:
        draw.rectangle([0, y, 5, y + cell], fill=plots.color(method))
        draw.text((10, y + cell // 2 - 12), label, fill="black")
        if kind == "diff":
            draw.text((10, y + cell // 2 + 2), "white = same, red = off by >= 1", fill="#777")
        canvas.paste(Image.fromarray(make_grid(x, nrow=n, pad=pad, scale=scale)), (label_w, y))
        if kind == "img":
            for i in range(n):
                x0 = label_w + pad + i * (cell + pad)
                if preds.get(rid) is not None:
                    p = preds[rid][i]
                    ok = p == labels[i]
                    draw.text((x0 + 2, y + cell + pad + 1), f"pred {p}" if ok else f"pred {p} !",
                              fill="#2ca02c" if ok else "#d62728")
                else:
                    draw.text((x0 + 2, y + cell + pad + 1), f"class {labels[i]}", fill="#555")
        y += cell + 2 * pad + (text_h if kind == "img" else 0)
    return np.asarray(canvas)
