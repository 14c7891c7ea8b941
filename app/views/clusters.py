"""Codebook clusters: sampled sub-vectors and codewords in 2-D, every snapshot, projections cached.

Projections are computed once per (run, layer, method) and cover every snapshot, so scrubbing
the step slider only re-draws.
"""
from __future__ import annotations

import numpy as np
import torch

from vq4dit.mechanism import changed_mask

from .. import plots

FULL_CLUSTER_MAX = 200_000  # sub-vectors drawn in the full-weight cluster view (more: an evenly strided sample)


class ClusterView:
    """The Codebook clusters tab."""

    def projection(self, run_id, layer, method: str) -> dict:
        """2-D coordinates of the sampled sub-vectors and of every snapshot's codebook (cached)."""
        key = (run_id, layer, method)
        if key in self._proj:
            return self._proj.get(key)
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
        return self._proj.put(key, out)

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
                                   axis=pr["axis"], n_candidates=tr.n_candidates, uirevision=f"{run_id}|{layer}|{method}",
                                   loo_cos=tr.loo_cosines(layer, step))
        changed = float(changed_mask(tr, layer, step).mean()) * 100   # the library's one definition
        note = (f"Sampled **{len(assign):,} of {info.n_subvectors:,}** sub-vectors (the same fixed random sample at "
                f"every step) and all **{info.k}** codewords (d={info.d}). {pr['note']}. At step {step}, "
                f"{changed:.1f}% of the sampled sub-vectors use a different codeword than at the run's start (step 0).")
        if color_by == "gradient agreement":
            note += (" Colour: each sub-vector's gradient against the summed gradient of the *other* members of its "
                     "codeword (leave-one-out cosine; red < 0 = pulls the other way)." if tr.loo_cosines(layer, step)
                     is not None else " **This trace has no per-sub-vector gradient cosines at this step** (older run, "
                     "or a snapshot without gradients): coloured by codeword.")
        if full:
            why = "UMAP" if pr.get("transform") is None else f"step {step} is not the final snapshot"
            note = (f"**All sub-vectors** are shown for the final snapshot with PCA (or raw coordinates) only ({why}): "
                    f"showing the trace's sample. ") + note
        return fig, note

    def full_weights(self, run_id, layer) -> dict:
        """Every sub-vector of `layer` (FP values from the loaded model, which the run quantized) with its
        final codeword (from the run's packed model) and whether it differs from the codeword the run started
        from (`Trace.start_assignment`; `changed` is None for traces that do not keep it); at most
        FULL_CLUSTER_MAX, an evenly strided sample above that. Cached per (run, layer)."""
        key = ("full", run_id, layer)
        if key in self._proj:
            return self._proj.get(key)
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
        start = tr.start_assignment(layer)
        changed = None if start is None else assign.numpy() != start[idx.numpy()]
        out = dict(x=x.numpy().astype(np.float64), assign=assign.numpy(), changed=changed,
                   codebook=q.codebook.detach().float().cpu().numpy().astype(np.float64), total=total)
        return self._proj.put(key, out)

    def full_cluster(self, run_id, layer, pr: dict, color_by: str):
        fw = self.full_weights(run_id, layer)
        tr = self.trace(run_id)
        steps = tr.snapshot_steps(layer)
        xy = pr["transform"](fw["x"])
        by_change = color_by == "assignment changed" and fw["changed"] is not None
        fig = plots.density_figure(xy, pr["transform"](fw["codebook"]), pr["books"][steps[0]],
                                   fw["changed"] if by_change else None,
                                   title=f"{plots.layer_label(layer)} — final model: all sub-vectors (density) and codewords",
                                   axis=pr["axis"], uirevision=f"{run_id}|{layer}|full")
        n, total = len(xy), fw["total"]
        shown = f"**all {n:,}** sub-vectors" if n == total else f"sampled **{n:,} of {total:,}** sub-vectors (evenly strided)"
        colour = "colour: share changed per bin" if by_change else "log colour"
        note = (f"Final model, {shown} of this layer as a density image ({plots.DENSITY_BINS}² bins, {colour}) and "
                f"all **{len(fw['codebook'])}** codewords from the packed model. {pr['note']}. "
                + (f"{100 * float(fw['changed'].mean()):.1f}% of them use a different codeword than at the run's start"
                   + (" (colour: share changed per bin)." if by_change else ".") if fw["changed"] is not None else
                   "This trace does not keep every sub-vector's start assignment (older run or large model): "
                   "\"changed\" is shown on the sample only (switch All sub-vectors off).")
                + (" Every final sub-vector has top ratio 1 (the packed model is hard): colour shows density."
                   if color_by == "top ratio" else ""))
        return fig, note
