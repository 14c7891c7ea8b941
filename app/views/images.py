"""Images side by side: FP, the selected run and its baselines (or picked runs), same seeds."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import plots
from ..config import APP_LIMITS, image_params
from ..store import run_label


class ImagesView:
    """The Images tab."""

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
        return out

    def images_ready(self, run_id, labels_text, seed, guidance, steps, compare: Optional[str] = None) -> bool:
        """Can `images(...)` answer without sampling (every row cached, or shipped with a demo run)?"""
        keys = []
        if run_id:
            try:
                keys = [run_id] + ([compare] if compare and compare != run_id else self.baselines(run_id))
            except ValueError:
                return False
        return self.images_ready_of(keys, labels_text, seed, guidance, steps)

    def images_ready_of(self, run_ids: list, labels_text, seed, guidance, steps) -> bool:
        """Can `images_of(run_ids, ...)` answer without sampling?"""
        try:
            labels = self.parse_labels(labels_text)
            seed, guidance, steps = image_params(seed, guidance, steps)
        except ValueError:
            return False
        return all(self.engine.has_images(k, labels, seed, guidance, steps) for k in ["fp", *run_ids])

    def images(self, run_id, labels_text, seed, guidance, steps, compare: Optional[str] = None):
        """(composite image uint8, metrics table, note). Same seeds/labels/sampler for every model.
        Rows: FP, the selected run, then the picked comparison run or (none picked) the newest
        finished run of every other method with the same k x d and init. Rows are labelled by what
        the run is (`run_label`: method, k x d, bits/weight)."""
        labels = self.parse_labels(labels_text)
        seed, guidance, steps = image_params(seed, guidance, steps)
        eng = self.engine
        fp = eng.fp_images(labels, seed, guidance, steps)
        rows = [("FP (reference)", "fp", "fp", fp)]
        if run_id:
            meta = self.store.meta(run_id)
            rows.append((f"{run_label(meta)} (selected)", run_id, meta["method"],
                         eng.run_images(run_id, labels, seed, guidance, steps)))
            others = [compare] if compare and compare != run_id else self.baselines(run_id)
            for b in others:
                bm = self.store.meta(b)
                try:
                    rows.append((run_label(bm) + (" (compare)" if compare else ""), b, bm["method"],
                                 eng.run_images(b, labels, seed, guidance, steps)))
                except ValueError:
                    if compare:
                        raise
                    continue
        img, table = self._picture(rows, labels, seed, guidance, steps, fp)
        note = (f"{len(labels)} images per model, seed {seed}, guidance {guidance:g}, {steps} DDIM steps; "
                f"every model starts from the same noise. "
                + (f"Compared with `{compare}` (picked in *Compare with*)." if compare else
                   f"Baselines: newest finished run of each other method with the same k×d and init "
                   f"({len(rows) - 2 if run_id else 0} found; pick any run in *Compare with*)."))
        return img, table, note

    def images_of(self, run_ids: list, labels_text, seed, guidance, steps):
        """(composite, metrics table) of FP and each of `run_ids`, in that order, same noise and labels:
        the Runs tab's side-by-side rows."""
        labels = self.parse_labels(labels_text)
        seed, guidance, steps = image_params(seed, guidance, steps)
        eng = self.engine
        fp = eng.fp_images(labels, seed, guidance, steps)
        rows = [("FP (reference)", "fp", "fp", fp)]
        for rid in run_ids:
            m = self.store.meta(rid)
            rows.append((run_label(m), rid, m["method"], eng.run_images(rid, labels, seed, guidance, steps)))
        return self._picture(rows, labels, seed, guidance, steps, fp)

    def _picture(self, rows, labels, seed, guidance, steps, fp):
        """The composite and the metrics table of image rows (label, run id, method, images)."""
        eng = self.engine
        table, preds = [], {}
        for label, rid, method, x in rows:
            key = (rid, tuple(labels), seed, guidance, steps)   # same key as the image cache
            m = self._metrics.get_or_make(key, lambda: eng.image_metrics(x, labels, None if rid == "fp" else fp))
            preds[rid] = m.get("pred")
            table.append({"model": label, "run": rid if rid != "fp" else "-",
                          "accuracy": _r(m.get("accuracy"), 3),
                          "PSNR vs FP (dB)": _r(m.get("psnr"), 2), "MSE vs FP": _r(m.get("image_mse"), 5)})
        return composite(rows, labels, preds, fp), pd.DataFrame(table, columns=IMAGE_METRICS_COLUMNS)


IMAGE_METRICS_COLUMNS = ["model", "run", "accuracy", "PSNR vs FP (dB)", "MSE vs FP"]  # the tables' headers, also empty


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
    pad, text_h = 4, 14
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))   # labels say what a run is: as wide as they need
    label_w = int(max([190] + [measure.textlength(r[0].replace("×", "x")) + 16 for r in rows]))
    cell = h * scale
    n = len(labels)
    lines = []
    for label, rid, method, x in rows:
        lines.append(("img", label.replace("×", "x"), rid, method, x))   # PIL's default font has no ×
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
