"""What each view shows for the shared selection (run, block, layer, snapshot), with caches.

Selection dict: {"run": run id, "block": int, "layer": full layer name, "snap": snapshot index}.
Projections are computed once per (run, layer, method) and cover every snapshot, so scrubbing
the step slider only re-draws. Nothing here trains or quantizes: it reads saved traces.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import pandas as pd

from . import plots
from .runs import APP_LIMITS, Engine, image_params


class Views:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self._proj: OrderedDict = OrderedDict()
        self._frames: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------
    # Selection helpers
    # ------------------------------------------------------------------------------------
    def trace(self, run_id):
        return self.store.trace(run_id) if run_id else None

    def layer_frames(self, run_id) -> dict:
        """{layer: rows of trace.layers}, {layer: rows of trace.ratios}, hard-switch steps (cached)."""
        if run_id in self._frames:
            return self._frames[run_id]
        tr = self.trace(run_id)
        if tr is None:
            out = dict(layers={}, ratios={}, hard={})
        else:
            lay, rat, ev = tr.layers, tr.ratios, tr.events
            hard = {r["layer"]: int(r["step"]) for _, r in ev.iterrows()} if len(ev) else {}
            out = dict(layers={n: g.sort_values("step", kind="stable") for n, g in lay.groupby("layer")} if len(lay) else {},
                       ratios={n: _fix_hard_ratios(g, hard.get(n)) for n, g in rat.groupby("layer")} if len(rat) else {},
                       hard=hard)
        with self._lock:
            self._frames[run_id] = out
            if len(self._frames) > 8:
                self._frames.pop(next(iter(self._frames)))
        return out

    def layers_of(self, run_id) -> list[str]:
        tr = self.trace(run_id)
        if tr is not None:
            return tr.layer_names
        meta = self.store.meta(run_id)
        from vq4dit.layers import quantized_layers
        return list(quantized_layers(self.store.model(run_id).transformer)) if meta else []

    def layer_choices(self, run_id, block: int) -> list[tuple[str, str]]:
        names = [n for n in self.layers_of(run_id) if f"transformer_blocks.{block}." in n]
        order = {c: i for i, c in enumerate(plots.LAYER_COLUMNS)}
        names.sort(key=lambda n: order.get(plots.short_layer(n), 99))
        return [(f"{plots.short_layer(n)} ({n.split('.', 2)[-1]})", n) for n in names]

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
        kind = plots.short_layer(layer) if layer else None
        pick = next((v for v in choices if plots.short_layer(v) == kind), choices[0] if choices else None)
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
        if tr is not None and lay in tr.meta.get("layers", {}):
            shape = " · weight " + "×".join(str(s) for s in tr.meta["layers"][lay]["shape"])
        fd = met.get("fd_digits")
        return (f"**Run** `{sel['run']}` — {m['method']}, W{m['bits']} ({kd}{m.get('bits_per_weight', 0):.3f} bits/weight), "
                f"{m.get('status', '?')}, block MSE {m.get('block_mse') or float('nan'):.4g}"
                + (f", FD-digits {fd:.2f}" if fd is not None else "")
                + (f" · **Layer** {plots.layer_label(lay)}{shape}" if lay else "")
                + (f" · **Snapshot** step {step} of {m.get('steps_done') or steps[-1]}" if tr is not None else ""))

    # ------------------------------------------------------------------------------------
    # Calibration curves and per-block heatmaps (depend on the run only)
    # ------------------------------------------------------------------------------------
    def calibration(self, run_id):
        tr = self.trace(run_id)
        if tr is None:
            m = self.store.meta(run_id)["method"] if run_id else None
            return plots.message_figure(f"{m} has no calibration: nothing to plot." if m else "No run selected.", 300)
        return plots.calibration_figure(tr.steps, title=f"Calibration of {run_id}", uirevision=run_id,
                                        total_steps=tr.meta.get("total_steps"))

    def changes(self, sel: dict):
        """(heatmap figure, table, per-block MSE figure) for the selected run."""
        run_id = sel.get("run") if sel else None
        if not run_id:
            msg = plots.message_figure("No run selected.")
            return msg, pd.DataFrame(columns=["block"] + plots.LAYER_COLUMNS), msg
        meta = self.store.meta(run_id)
        frames = self.layer_frames(run_id)
        n_blocks = int(meta.get("n_blocks") or self.engine.n_blocks)
        tr = self.trace(run_id)
        if frames["layers"]:
            final = pd.concat([g.iloc[[-1]] for g in frames["layers"].values()])
            table = plots.changes_table(final, n_blocks)
            cell = (sel["block"], plots.short_layer(sel["layer"])) if sel.get("layer") else None
            heat = plots.changes_heatmap(table, cell, title=f"Sub-vectors whose codeword differs from k-means, "
                                                            f"final step — {meta['method']} W{meta['bits']}")
        else:
            table = pd.DataFrame(columns=["block"] + plots.LAYER_COLUMNS)
            heat = plots.message_figure(f"{meta['method']} keeps no assignment trace (no calibration).")
        last = None
        if tr is not None and len(tr.steps):
            row = tr.steps.iloc[-1]
            last = [float(row[f"block_{b}"]) for b in range(n_blocks) if f"block_{b}" in row]
        mse = plots.block_mse_figure(meta.get("per_block_mse") or [], last, meta["method"])
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
        snaps = tr.snapshots
        fp = snaps[f"{layer}|sample_fp"].numpy().astype(np.float64)       # (n, d)
        steps = [s for s in tr.snapshot_steps() if f"{layer}|{s}|codebook" in snaps]
        books = [snaps[f"{layer}|{s}|codebook"].numpy().astype(np.float64) for s in steps]  # each (k, d)
        d = fp.shape[1]
        if d <= 2 and method != "UMAP":
            f = (lambda x: np.concatenate([x, np.zeros_like(x)], 1)) if d == 1 else (lambda x: x)
            out = dict(samples=f(fp), books={s: f(b) for s, b in zip(steps, books)}, axis="raw coordinate",
                       note=f"d={d}: raw sub-vector coordinates (no projection needed)")
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
                            f"of their variance shown)")
        with self._lock:
            self._proj[key] = out
            while len(self._proj) > 64:
                self._proj.popitem(last=False)
        return out

    def cluster(self, sel: dict, color_by: str, method: str):
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        tr = self.trace(run_id) if run_id else None
        if tr is None or not layer or f"{layer}|sample_fp" not in tr.snapshots:
            why = "No run selected." if not run_id else "This run has no codebook trace (no calibration)."
            return plots.message_figure(why, 480), why
        steps = self.steps_of(run_id)
        step = steps[min(sel.get("snap", 0), len(steps) - 1)]
        pr = self.projection(run_id, layer, method)
        s = tr.snapshots
        assign = s[f"{layer}|{step}|assign"].numpy()
        assign0 = s[f"{layer}|{steps[0]}|assign"].numpy()
        top = s[f"{layer}|{step}|top_ratio"].numpy()
        info = tr.meta["layers"][layer]
        n_total = info["shape"][0] * info["shape"][1] // info["d"]
        n_cand = (tr.meta.get("config") or {}).get("n_candidates", 2)
        fig = plots.cluster_figure(pr["samples"], pr["books"][step], pr["books"][steps[0]] if step != steps[0] else None,
                                   assign, top, assign0, color_by,
                                   title=f"{plots.layer_label(layer)} — step {step}: sub-vectors and codewords",
                                   axis=pr["axis"], n_candidates=n_cand, uirevision=f"{run_id}|{layer}|{method}")
        changed = float((assign != assign0).mean()) * 100
        note = (f"Sampled **{len(assign):,} of {n_total:,}** sub-vectors (the same fixed random sample at every step) "
                f"and all **{info['k']}** codewords (d={info['d']}). {pr['note']}. At step {step}, "
                f"{changed:.1f}% of the sampled sub-vectors use a different codeword than after k-means.")
        return fig, note

    # ------------------------------------------------------------------------------------
    # Assignment evolution
    # ------------------------------------------------------------------------------------
    def evolution(self, sel: dict):
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        tr = self.trace(run_id) if run_id else None
        if tr is None or not layer:
            return plots.message_figure("No calibration trace for this run." if run_id else "No run selected.")
        fr = self.layer_frames(run_id)
        steps = self.steps_of(run_id)
        step = steps[min(sel.get("snap", 0), len(steps) - 1)]
        n_cand = (tr.meta.get("config") or {}).get("n_candidates", 2)
        rows = fr["layers"].get(layer)
        rows = rows.drop_duplicates("step", keep="last") if rows is not None else None
        return plots.evolution_figure(rows, fr["ratios"].get(layer), fr["hard"].get(layer),
                                      n_cand, title=f"{plots.layer_label(layer)} — {tr.meta.get('method')}: "
                                                    f"how sure each sub-vector is of its codeword", current_step=step)

    # ------------------------------------------------------------------------------------
    # Gradient-direction conflicts
    # ------------------------------------------------------------------------------------
    def conflict_pair(self, run_id) -> tuple[dict, Optional[str]]:
        """{method: run id} to compare (vq4dit vs codebook-only at the same bits), and the missing method."""
        meta = self.store.meta(run_id)
        bits, method = int(meta["bits"]), meta["method"]
        if method in ("vq4dit", "vq4dit-ref"):
            pair = {method: run_id, "codebook-only": self.store.latest("codebook-only", bits)}
        elif method == "codebook-only":
            pair = {"vq4dit": self.store.latest("vq4dit", bits), method: run_id}
        else:
            pair = {"vq4dit": self.store.latest("vq4dit", bits),
                    "codebook-only": self.store.latest("codebook-only", bits)}
        missing = next((m for m, r in pair.items() if r is None), None)
        return pair, missing

    def conflicts(self, sel: dict):
        """(note markdown, missing method or None, conflict figure, worst-codeword figure)."""
        run_id, layer = (sel or {}).get("run"), (sel or {}).get("layer")
        if not run_id or not layer:
            m = plots.message_figure("No run selected.")
            return "No run selected.", None, m, m
        meta = self.store.meta(run_id)
        pair, missing = self.conflict_pair(run_id)
        per_method, used = {}, []
        for m, rid in pair.items():
            if rid is None:
                continue
            try:
                rows = self.layer_frames(rid)["layers"].get(layer)
            except ValueError:
                continue
            per_method[m] = rows
            used.append(f"`{rid}` ({m})")
        note = f"Comparing {' and '.join(used) if used else 'nothing'} at W{meta['bits']}, layer {plots.layer_label(layer)}."
        if missing:
            note += (f" **No saved {missing} run at W{meta['bits']} yet**, so its side is missing: press the button "
                     f"to run it with the Set-up settings.")
        fig = plots.conflict_figure(per_method, title=f"Gradient agreement inside codewords — {plots.layer_label(layer)}")
        # worst codeword of the selected run (or the vq4dit run when the selection has no trace)
        tr = self.trace(run_id)
        src_method = meta["method"]
        if tr is None and pair.get("vq4dit"):
            tr, src_method = self.trace(pair["vq4dit"]), "vq4dit"
        wfig = plots.worst_codeword_figure(None, None, None, src_method)
        if tr is not None:
            steps = tr.snapshot_steps()
            want = steps[min(sel.get("snap", 0), len(steps) - 1)]
            have = [s for s in steps if f"{layer}|{s}|worst_grads" in tr.snapshots]
            if have:
                s = min(have, key=lambda x: (abs(x - want), x))
                g = tr.snapshots[f"{layer}|{s}|worst_grads"].numpy()
                cw = int(tr.snapshots[f"{layer}|{s}|worst_codeword"][0])
                wfig = plots.worst_codeword_figure(g, cw, s, src_method)
                if s != want:
                    note += f" Worst-codeword arrows: nearest snapshot with gradients is step {s} (selected: {want})."
        return note, missing, fig, wfig

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

    def images(self, run_id, labels_text, seed, guidance, steps):
        """(composite image uint8, metrics table, note). Same seeds/labels/sampler for every model."""
        labels = self.parse_labels(labels_text)
        seed, guidance, steps = image_params(seed, guidance, steps)
        eng = self.engine
        fp = eng.fp_images(labels, seed, guidance, steps)
        rows = [("FP (reference)", "fp", "fp", fp)]
        if run_id:
            meta = self.store.meta(run_id)
            rows.append((f"{meta['method']} W{meta['bits']} (selected)", run_id, meta["method"],
                         eng.run_images(run_id, labels, seed, guidance, steps)))
            for b in self.store.baselines(int(meta["bits"]), exclude=run_id):
                bm = self.store.meta(b)
                try:
                    rows.append((f"{bm['method']} W{bm['bits']}", b, bm["method"],
                                 eng.run_images(b, labels, seed, guidance, steps)))
                except ValueError:
                    continue
        table, preds = [], {}
        for label, rid, method, x in rows:
            m = eng.image_metrics(x, labels, None if rid == "fp" else fp)
            preds[rid] = m.get("pred")
            table.append({"model": label, "run": rid if rid != "fp" else "-",
                          "accuracy": _r(m.get("accuracy"), 3),
                          f"FD-digits ({len(labels)} images)": _r(m.get("fd_digits"), 1),
                          "PSNR vs FP (dB)": _r(m.get("psnr"), 2), "MSE vs FP": _r(m.get("image_mse"), 5)})
        img = composite(rows, labels, preds, fp)
        note = (f"{len(labels)} images per model, seed {seed}, guidance {guidance:g}, {steps} DDIM steps; "
                f"every model starts from the same noise. Baselines: newest saved run of each other method at the "
                f"same bits ({len(rows) - 2 if run_id else 0} found).")
        return img, pd.DataFrame(table), note


def _fix_hard_ratios(rows: pd.DataFrame, hard_step: Optional[int]) -> pd.DataFrame:
    """Workaround: once a layer is hard, the trace logs ratio_nearest = 1.0 for every sample, even
    one whose codeword is no longer the k-means one. Rewrite those rows as 1 (still the k-means
    codeword) or 0 (moved), from the logged codeword; the final (finalized, hard) record too."""
    rows = rows.sort_values("step", kind="stable").drop_duplicates(["step", "sample"], keep="last").copy()
    if not len(rows):
        return rows
    first = rows[rows["step"] == rows["step"].min()].set_index("sample")["codeword"]
    start = hard_step if hard_step is not None else int(rows["step"].max())
    m = rows["step"] >= start
    rows.loc[m, "ratio_nearest"] = (rows.loc[m, "codeword"].to_numpy()
                                    == first.reindex(rows.loc[m, "sample"]).to_numpy()).astype(float)
    return rows


def _r(v, n):
    return None if v is None else round(float(v), n)


def composite(rows, labels, preds, fp) -> np.ndarray:
    """One picture: per model a row of images (with predicted class) and a row of |image - FP|."""
    from PIL import Image, ImageDraw
    from vq4dit.viz import to_uint8
    h = fp.shape[-1]
    scale = max(1, 64 // h) if h < 64 else 1
    cell = h * scale if h * scale <= 128 else 128
    label_w, pad, text_h = 190, 4, 14
    n = len(labels)
    lines = []
    for label, rid, method, x in rows:
        lines.append(("img", label, rid, method, x))
        if rid != "fp":
            lines.append(("diff", "|difference| vs FP", rid, method, x))
    W = label_w + n * (cell + pad) + pad
    H = sum(cell + pad + (text_h if kind == "img" else 0) for kind, *_ in lines) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for kind, label, rid, method, x in lines:
        colr = plots.color(method)
        draw.rectangle([0, y, 5, y + cell], fill=colr)
        draw.text((10, y + cell // 2 - 12), label, fill="black")
        if kind == "diff":
            dif = (x.float() - fp.float()).abs().mean(1).clamp(0, 1).numpy()  # (N, H, W), 1 = half the range
            tiles = np.stack([255 * np.ones_like(dif), 255 * (1 - dif), 255 * (1 - dif)], -1).astype(np.uint8)
            draw.text((10, y + cell // 2 + 2), "white = same, red = off by >= 1", fill="#777")
        else:
            tiles = to_uint8(x)
            if tiles.shape[-1] == 1:
                tiles = np.repeat(tiles, 3, -1)
        for i in range(n):
            t = Image.fromarray(tiles[i]).resize((cell, cell), Image.NEAREST)
            x0 = label_w + pad + i * (cell + pad)
            canvas.paste(t, (x0, y))
            if kind == "img" and preds.get(rid) is not None:
                p = preds[rid][i]
                ok = p == labels[i]
                draw.text((x0 + 2, y + cell + 1), f"pred {p}" if ok else f"pred {p} !",
                          fill="#2ca02c" if ok else "#d62728")
            elif kind == "img":
                draw.text((x0 + 2, y + cell + 1), f"class {labels[i]}", fill="#555")
        y += cell + pad + (text_h if kind == "img" else 0)
    return np.asarray(canvas)
