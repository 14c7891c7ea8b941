"""The shared selection every view reads: run, block, layer, snapshot (and the picked comparison run).

Selection dict: {"run": run id, "block": int, "layer": full layer name, "snap": snapshot index,
"other": comparison run or None}. Nothing here trains or quantizes: views read saved traces.
"""
from __future__ import annotations

import math
from typing import Optional

from vq4dit.naming import block_index, layer_kind

from .. import plots
from ..cache import LRU
from ..config import method_spec
from ..engine import Engine
from ..store import pair_key, run_label


class SelectionView:
    """Selection helpers shared by every view (and the run pairing the views compare by)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self._proj = LRU(64)      # (run, layer, projection) / ("full", run, layer) -> precomputed arrays
        self._metrics = LRU(64)   # (run, labels, seed, guidance, steps) -> image metrics

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
        """(label, run id) for the run pickers, oldest first (demo runs first). A label says what the run
        is (`run_label`: method, k x d, bits/weight, status) and where it comes from."""
        out = []
        for r in self.store.list():
            if r.error is not None:
                continue
            m = r.meta
            steps = f" {m.get('steps_done')}/{m.get('total_steps')}" if m.get("status", "finished") != "finished" \
                and m.get("total_steps") else ""
            where = "demo" if self.store.is_demo(r.id) else r.id[:15]
            out.append((f"{run_label(m)}{steps} — {where}", r.id))
        from ..live import live_choice
        live = live_choice(self.store)
        return out + ([live] if live else [])

    def default_run(self) -> Optional[str]:
        """The run shown on first open: the newest finished saved run, else the demo run of FIRST_DEMO
        (the pair where the assignment effect is clearest), else any finished demo run, else None."""
        from ..demo import FIRST_DEMO
        finished = [r.id for r in self.store.list() if r.error is None and r.meta.get("status") == "finished"]
        own = [r for r in finished if not self.store.is_demo(r)]
        if own:
            return own[-1]
        demo = [r for r in finished if self.store.is_demo(r)]
        return FIRST_DEMO if FIRST_DEMO in demo else (demo[0] if demo else None)

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
            cmp = f" · **Compared with** `{other}` ({run_label(om)})"
        demo = " (**demo run**, shipped with the app, read-only)" if self.store.is_demo(sel["run"]) else ""
        init = ((m.get("config") or {}).get("activation_aware") and
                " · **init: activation-aware k-means** (distances weighted by E[x²]; \"changed\" counts from the "
                "assignment the run started from)" or "")
        return (f"**Run** `{sel['run']}`{demo} — {m['method']} ({kd}{m.get('bits_per_weight', 0):.3f} bits/weight), "
                f"{m.get('status', '?')}{init}, block MSE {m.get('block_mse') or float('nan'):.4g}"
                + (f", FD-digits {fd:.2f}" if fd is not None and math.isfinite(fd) else "")
                + (f" · **Layer** {plots.layer_label(lay)}{shape}" if lay else "")
                + (f" · **Snapshot** step {step} of {m.get('steps_done') or steps[-1]}" if tr is not None else "")
                + cmp)

    def calibration(self, run_id):
        tr = self.trace(run_id)
        if tr is None:
            m = self.store.meta(run_id)["method"] if run_id else None
            return plots.message_figure(f"{m} has no calibration: nothing to plot." if m else "No run selected.", 300)
        return plots.calibration_figure(tr.steps, title=f"Calibration of {run_id}", uirevision=run_id,
                                        total_steps=tr.total_steps)

    def newest(self, want, like: Optional[dict] = None, exclude: Optional[str] = None, kd: Optional[tuple] = None,
               init: Optional[bool] = None, method: Optional[str] = None) -> Optional[str]:
        """Newest *finished* readable run whose method spec satisfies `want(spec)` (or, with `method`,
        whose method is exactly that name: peers have no spec), with the codebook shape and init of
        the run `like` (its `pair_key`: k, d, activation-aware or not), or with shape `kd` (and `init`
        when given). Cancelled or partial runs are never picked automatically."""
        key = pair_key(like) if like is not None else None
        for r in reversed(self.store.list()):
            m = r.meta or {}
            if r.error is not None or r.id == exclude or m.get("status") != "finished":
                continue
            ok = m.get("method") == method if method is not None else want(method_spec(m.get("method")))
            if not ok:
                continue
            if key is not None and pair_key(m) != key:
                continue
            if kd is not None and (m.get("k"), m.get("d")) != tuple(kd):
                continue
            if init is not None and pair_key(m)[2] != init:
                continue
            return r.id
        return None

    def baselines(self, run_id: str, limit: int = 4) -> list[str]:
        """Newest finished run of every other method with the same k, d and init as `run_id` (`pair_key`):
        a 16x4 run is never compared with a 256x4 one under one "W2" label. Partial runs only when picked."""
        em = self.store.meta(run_id)
        seen, out = {em.get("method")}, []
        for r in reversed(self.store.list()):
            m = r.meta or {}
            if (r.error is None and r.id != run_id and m.get("status") == "finished" and pair_key(m) == pair_key(em)
                    and m.get("method") not in seen):
                seen.add(m["method"])
                out.append(r.id)
        return out[:limit]
