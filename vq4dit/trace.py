"""The calibration trace: what a run recorded, and the typed reads the app and reports use.

A `Trace` is bounded (layer statistics every `trace_every` steps, a few snapshots) and saved as
a folder: meta.json, four CSV tables and one safetensors file of snapshot tensors. Readers never
build storage keys or parse the meta layout themselves: they call

    trace.layer_info(layer)           LayerInfo(block, kind, k, d, shape)
    trace.snapshot_steps(layer)       steps with a codebook snapshot
    trace.snapshot(layer, step)       Snapshot(codebook, assign, top_ratio, worst_grads, ...)
    trace.samples(layer)              the fixed sub-vector sample (fp values + indices)
    trace.layer_stats(layer)          per-step frozen / changed / drift / histograms
    trace.ratio_paths(layer)          a few sub-vectors' ratio to their k-means codeword
    trace.ratio_histogram(layer)      (steps, (T, RATIO_BINS) shares, bin edges)
    trace.conflicts(layer)            per-step conflict share, coherence and its histogram
    trace.conflict_summary()          per-layer mean conflict share and coherence

`Recorder` fills a Trace during calibration; `gradient_conflict` is the paper's statistic.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import CalibConfig
from .layers import VQLinear
from .naming import block_index, layer_kind, layer_type
from .fs import check_replace_target, replace_dir, temp_dir_for

RATIO_BINS = 10      # histogram of top assignment ratio over [1/n, 1]
COHERENCE_BINS = 10  # histogram of per-codeword gradient coherence over [0, 1]
N_TRAJECTORIES = 8   # sample sub-vectors whose ratio trajectories are kept per layer
START_ASSIGN_MAX = 4_000_000  # keep every sub-vector's start assignment when the model has at most this many


@dataclass(frozen=True)
class LayerInfo:
    name: str
    block: int
    kind: str         # q, k, v, out, fc1, fc2, adaLN
    k: int
    d: int
    shape: tuple      # (out_features, in_features)

    @property
    def n_subvectors(self) -> int:
        return self.shape[0] * self.shape[1] // self.d


@dataclass(frozen=True)
class Snapshot:
    """One layer at one snapshot step (sampled sub-vectors only, except the full codebook)."""
    step: int
    codebook: np.ndarray                     # (k, d)
    assign: np.ndarray                       # (n_samples,) codeword of each sampled sub-vector
    top_ratio: np.ndarray                    # (n_samples,) largest assignment ratio (1 when hard)
    worst_grads: Optional[np.ndarray] = None  # (m, d) gradients of the least coherent codeword
    worst_codeword: Optional[int] = None


class Trace:
    """Calibration record. Tables: `steps`, `layers`, `ratios`, `events`; tensors: `snapshots`.

    Storage keys (private to this module): "<layer>|<step>|codebook" (k, d), "|assign",
    "|top_ratio", "|worst_grads" (m, d), "|worst_codeword" (1,); per layer "<layer>|sample_fp"
    (n_samples, d) and "<layer>|sample_index" (n_samples,).
    """

    def __init__(self, meta: Optional[dict] = None):
        self.meta = dict(meta or {})
        self._steps: list[dict] = []
        self._layers: list[dict] = []
        self._ratios: list[dict] = []
        self._events: list[dict] = []
        self.snapshots: dict[str, torch.Tensor] = {}
        self._frames: dict = {}

    # -- frames ---------------------------------------------------------------------------
    def _frame(self, name):
        import pandas as pd
        if name not in self._frames:
            self._frames[name] = pd.DataFrame(getattr(self, "_" + name))
        return self._frames[name]

    steps = property(lambda self: self._frame("steps"))
    layers = property(lambda self: self._frame("layers"))
    ratios = property(lambda self: self._frame("ratios"))
    events = property(lambda self: self._frame("events"))

    def add(self, kind: str, row: dict):
        getattr(self, "_" + kind).append(row)
        self._frames.pop(kind, None)

    def drop_layer_records(self, step: int):
        """Remove the per-layer statistics and ratio rows logged at `step` (calibration's final
        record replaces the last step's)."""
        self._layers = [r for r in self._layers if r["step"] != step]
        self._ratios = [r for r in self._ratios if r["step"] != step]
        self._frames.pop("layers", None)
        self._frames.pop("ratios", None)

    # -- run-level reads --------------------------------------------------------------------
    method = property(lambda self: self.meta.get("method"))
    config = property(lambda self: dict(self.meta.get("config") or {}))
    total_steps = property(lambda self: self.meta.get("total_steps"))
    steps_done = property(lambda self: self.meta.get("steps_done"))
    stopped = property(lambda self: self.meta.get("stopped"))   # None, "cancelled", "interrupted", ...
    forced = property(lambda self: list(self.meta.get("forced") or []))  # layers finalize made hard (still soft)
    n_blocks = property(lambda self: self.meta.get("n_blocks"))

    @property
    def n_candidates(self) -> int:
        return int(self.config.get("n_candidates", 2))

    @property
    def layer_names(self) -> list[str]:
        return list(self.meta.get("layers", {}))

    def layer_info(self, layer: str) -> LayerInfo:
        try:
            m = self.meta["layers"][layer]
        except KeyError:
            raise KeyError(f"layer {layer!r} is not in this trace") from None
        return LayerInfo(layer, int(m["block"]), layer_kind(layer), int(m["k"]), int(m["d"]), tuple(m["shape"]))

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot_steps(self, layer: Optional[str] = None) -> list[int]:
        """Steps with a codebook snapshot (of `layer`, or of any layer)."""
        keys = (k.split("|") for k in self.snapshots if k.count("|") == 2 and k.endswith("|codebook"))
        return sorted({int(s) for name, s, _ in keys if layer is None or name == layer})

    def has_samples(self, layer: str) -> bool:
        return f"{layer}|sample_fp" in self.snapshots

    def samples(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Full-precision values (n, d) and indices (n,) of the layer's fixed sub-vector sample."""
        s = self.snapshots
        return _f32(s[f"{layer}|sample_fp"]), s[f"{layer}|sample_index"].long().numpy()

    def snapshot(self, layer: str, step: int) -> Snapshot:
        s, key = self.snapshots, f"{layer}|{int(step)}|"
        if key + "codebook" not in s:
            raise KeyError(f"no snapshot of {layer!r} at step {step}: have {self.snapshot_steps(layer)}")
        wg = s.get(key + "worst_grads")
        wc = s.get(key + "worst_codeword")
        return Snapshot(int(step), _f32(s[key + "codebook"]), s[key + "assign"].long().numpy(),
                        _f32(s[key + "top_ratio"]), None if wg is None else _f32(wg),
                        None if wc is None else int(wc[0]))

    def start_assignment(self, layer: str) -> Optional[np.ndarray]:
        """(S,) codeword of every sub-vector when calibration started; None when not kept (large models,
        older traces)."""
        t = self.snapshots.get(f"{layer}|start_assign")
        return None if t is None else t.long().numpy()

    def loo_cosines(self, layer: str, step: int) -> Optional[np.ndarray]:
        """(n_samples,) leave-one-out cosine of each sampled sub-vector's gradient with its codeword's
        summed gradient at snapshot `step` (vq4dit.mechanism.gradient_stats); None when not recorded."""
        t = self.snapshots.get(f"{layer}|{int(step)}|loo_cos")
        return None if t is None else _f32(t)

    def gradient_steps(self, layer: str) -> list[int]:
        """Snapshot steps that hold the worst codeword's gradients."""
        return [t for t in self.snapshot_steps(layer) if f"{layer}|{t}|worst_grads" in self.snapshots]

    # -- per-step tables ---------------------------------------------------------------------
    def layer_stats(self, layer: Optional[str] = None):
        """Rows of per-layer statistics, one per (layer, step), sorted by step (the final record wins)."""
        df = self.layers
        if not len(df):
            return df
        if layer is not None:
            df = df[df["layer"] == layer]
        return df.sort_values("step", kind="stable").drop_duplicates(["layer", "step"], keep="last")

    def ratio_paths(self, layer: str):
        """(step, sample, ratio_nearest, codeword) for a few sampled sub-vectors; ratio_nearest is the
        ratio of the k-means codeword (1/0 once the layer is hard: kept it or moved)."""
        df = self.ratios
        if not len(df):
            return df
        df = df[df["layer"] == layer]
        return df.sort_values("step", kind="stable").drop_duplicates(["step", "sample"], keep="last")

    def ratio_histogram(self, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps (T,), shares (T, RATIO_BINS), bin edges (RATIO_BINS + 1,)) of the top ratio over [1/n, 1]."""
        rows = self.layer_stats(layer)
        cols = [f"ratio_hist_{i}" for i in range(RATIO_BINS)]
        edges = np.linspace(1.0 / self.n_candidates, 1.0, RATIO_BINS + 1)
        if not len(rows):
            return np.zeros(0, int), np.zeros((0, RATIO_BINS)), edges
        return rows["step"].to_numpy(int), rows[cols].to_numpy(float), edges

    def conflicts(self, layer: str):
        """Per-step gradient conflict of `layer`: columns step, conflict_share, coherence_mean, and
        coherence_hist (T, COHERENCE_BINS) as `.attrs["coherence_hist"]`. Empty without gradients."""
        import pandas as pd
        rows = self.layer_stats(layer)
        if not len(rows) or "conflict_share" not in rows:
            out = pd.DataFrame(columns=["step", "conflict_share", "coherence_mean"])
            out.attrs["coherence_hist"] = np.zeros((0, COHERENCE_BINS))
            return out
        rows = rows[rows["conflict_share"].notna()]
        out = rows[["step", "conflict_share", "coherence_mean"]].reset_index(drop=True)
        out.attrs["coherence_hist"] = rows[[f"coherence_hist_{i}" for i in range(COHERENCE_BINS)]].to_numpy(float)
        return out

    def conflict_summary(self):
        """One row per layer: mean conflict share and coherence over the run (steps with gradients)."""
        import pandas as pd
        df = self.layer_stats()
        if not len(df) or "conflict_share" not in df:
            return pd.DataFrame(columns=["layer", "block", "kind", "conflict_share", "coherence_mean", "n_steps"])
        df = df[df["conflict_share"].notna()]
        g = df.groupby("layer", sort=False)
        out = pd.DataFrame(dict(conflict_share=g["conflict_share"].mean(), coherence_mean=g["coherence_mean"].mean(),
                                n_steps=g.size())).reset_index()
        out.insert(1, "block", out["layer"].map(block_index))
        out.insert(2, "kind", out["layer"].map(layer_kind))
        return out

    def hard_steps(self) -> dict[str, int]:
        """{layer: step it switched to hard assignments} (layers made hard only at the end are absent:
        they are `forced`, with an event "forced" at the last step)."""
        ev = self.events
        if not len(ev):
            return {}
        ev = ev[ev["event"] == "hard"]
        return {r.layer: int(r.step) for r in ev.itertuples()}

    def compact(self, n_samples: Optional[int] = None, max_records: Optional[int] = None) -> "Trace":
        """A smaller copy for shipping (the app's demo runs): per-layer statistics and ratio paths
        thinned to about `max_records` evenly spaced logged steps (snapshot steps and the last step
        always kept; the per-step `steps` table and events are kept whole), the first `n_samples` of each layer's
        fixed sub-vector sample (the sample is a random permutation, so a prefix is a random sample
        too, and the ratio trajectories follow its first N_TRAJECTORIES), codebooks, samples and
        ratios in float16, indices in the smallest integer type that holds them. The worst codeword's
        gradients are rescaled to max |g| = 1 before float16 (they would underflow): their directions,
        coherence and signs are kept, their magnitude is not. The typed reads return float32 as before."""
        out = Trace(dict(self.meta, compact=dict(n_samples=n_samples, max_records=max_records, dtype="float16")))
        logged = sorted({int(r["step"]) for r in self._layers})
        keep = set(logged)
        if max_records is not None and len(logged) > max_records:
            every = -(-len(logged) // max_records)
            keep = set(logged[::every]) | {logged[-1]} | set(self.snapshot_steps())
        for name in ("steps", "layers", "ratios", "events"):
            rows = getattr(self, "_" + name) or self._frame(name).to_dict("records")
            if name in ("layers", "ratios"):
                rows = [r for r in rows if int(r["step"]) in keep]
            getattr(out, "_" + name).extend(rows)
        per_sample = ("|sample_fp", "|sample_index", "|assign", "|top_ratio", "|loo_cos")
        for key, t in self.snapshots.items():
            if n_samples is not None and key.endswith(per_sample):
                t = t[:n_samples]
            if key.endswith("|worst_grads"):
                t = (t / t.abs().max().clamp_min(1e-30)).half()
            elif t.dtype.is_floating_point:
                t = t.half()
            elif t.numel() and int(t.max()) < 2 ** 8 and int(t.min()) >= 0:  # codeword ids of k <= 256
                t = t.to(torch.uint8)
            elif t.numel() and int(t.max()) < 2 ** 15 and int(t.min()) >= -2 ** 15:
                t = t.short()
            else:
                t = t.int()
            out.snapshots[key] = t.clone()
        return out

    # -- disk -----------------------------------------------------------------------------
    def save(self, path):
        """Atomic: written to a temp dir next to `path`, then renamed into place."""
        from safetensors.torch import save_file
        path = Path(path)
        check_replace_target(path, "meta.json", what="calibration trace")  # only ever replace a trace
        tmp = temp_dir_for(path)
        try:
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str))
            fmt = "%.5g" if self.meta.get("compact") else None  # 5 significant digits in shipped traces
            for name in ("steps", "layers", "ratios", "events"):
                self._frame(name).to_csv(tmp / f"{name}.csv", index=False, float_format=fmt)
            save_file({k: v.contiguous().cpu() for k, v in self.snapshots.items()},
                      str(tmp / "snapshots.safetensors"))
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path) -> "Trace":
        import pandas as pd
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path} is not a calibration trace (no meta.json)")
        try:
            tr = cls(json.loads((path / "meta.json").read_text()))
            for name in ("steps", "layers", "ratios", "events"):
                f = path / f"{name}.csv"
                df = pd.read_csv(f) if f.is_file() and f.stat().st_size > 1 else pd.DataFrame()
                tr._frames[name] = df
                getattr(tr, "_" + name).extend(df.to_dict("records"))
            snap = path / "snapshots.safetensors"
            try:
                tr.snapshots = load_file(str(snap)) if snap.is_file() else {}
            except Exception as e:  # safetensors raises its own type for a truncated or corrupt file
                raise ValueError(f"{snap} is truncated or corrupt ({e})") from None
        except (ValueError, OSError, json.JSONDecodeError, pd.errors.ParserError, RecursionError) as e:
            raise ValueError(f"trace at {path} is corrupt or unreadable: {e}") from e
        return tr


def _f32(t: torch.Tensor) -> np.ndarray:
    """float32 numpy (compact traces store float16)."""
    return t.float().numpy()


def _hist(values: torch.Tensor, lo: float, hi: float, bins: int) -> list[float]:
    h = torch.histc(values.float().cpu(), bins=bins, min=lo, max=hi)
    return (h / max(values.numel(), 1)).tolist()


@torch.no_grad()
def gradient_conflict(layer: VQLinear) -> Optional[dict]:
    """Per-codeword coherence |sum_j g_j| / sum_j |g_j| of the sub-vector weight gradients.

    g_j = dL/dw_hat_j for sub-vectors j currently assigned to codeword c. Returns per-codeword
    coherence (nan where fewer than 2 sub-vectors), the share of g_j with negative cosine to
    their codeword's sum, and the worst codeword's gradients.
    """
    w = layer.last_weight
    if w is None or w.grad is None:
        return None
    g = w.grad.reshape(-1, layer.d).float()              # (S, d)
    a = layer.current_assignment()                      # (S,)
    k = layer.k
    count = torch.zeros(k, device=g.device).index_add_(0, a, torch.ones_like(a, dtype=torch.float))
    g_sum = torch.zeros(k, layer.d, device=g.device).index_add_(0, a, g)      # (k, d)
    norm_sum = torch.zeros(k, device=g.device).index_add_(0, a, g.norm(dim=1))  # (k,)
    coherence = g_sum.norm(dim=1) / norm_sum.clamp_min(1e-30)
    valid = (count >= 2) & (norm_sum > 0)
    coherence = torch.where(valid, coherence, torch.full_like(coherence, float("nan")))
    cos = torch.nn.functional.cosine_similarity(g, g_sum[a], dim=1, eps=1e-30)   # (S,)
    in_valid = valid[a]
    conflict_share = (cos[in_valid] < 0).float().mean().item() if in_valid.any() else float("nan")
    cand = torch.where(count >= 4, coherence.nan_to_num(2.0), torch.full_like(coherence, 2.0))
    worst = int(cand.argmin())
    worst_grads = g[a == worst][:64]
    # g and a travel to Recorder.record_layers for vq4dit.mechanism.gradient_stats (dropped there)
    return dict(coherence=coherence, conflict_share=conflict_share, worst=worst, worst_grads=worst_grads,
                grad=g, assign=a)


class Recorder:
    """Fills a Trace during calibration; owns the sample indices and snapshot schedule."""

    def __init__(self, trace: Trace, layers: dict, cfg: CalibConfig, originals: dict):
        self.trace, self.layers, self.cfg = trace, layers, cfg
        total = cfg.total_steps
        self.every = cfg.trace_every or max(1, total // 100)
        self.snap_steps = {0, total} | {round(total * (i + 1) / (cfg.n_snapshots + 1))
                                        for i in range(cfg.n_snapshots)}
        g = torch.Generator().manual_seed(cfg.seed)
        self.samples = {}
        self.codebook0 = {n: m.codebook.detach().clone() for n, m in layers.items()}
        # "changed" = differs from the assignment the run starts from (after init_soft), so step 0 reads 0
        # whatever the init (vq4dit.mechanism.changed_shares); kept whole for small models (full-weight views)
        self.assign0 = {n: m.current_assignment().detach().clone() for n, m in layers.items()}
        self.prev_assign = {}   # assignment at the previous gradient record (mechanism's move statistics)
        self.null_gen = torch.Generator().manual_seed(cfg.seed + 1)
        trace.meta["changed_vs"] = "start"
        if sum(m.num_subvectors for m in layers.values()) <= START_ASSIGN_MAX:
            for n, a in self.assign0.items():
                trace.snapshots[f"{n}|start_assign"] = a.cpu().to(torch.int32)
        for name, m in layers.items():
            idx = torch.randperm(m.num_subvectors, generator=g)[: cfg.trace_samples].to(m.assignment.device)
            self.samples[name] = idx
            fp = originals[name].reshape(-1, m.d)[idx]
            trace.snapshots[f"{name}|sample_fp"] = fp.float().cpu()
            trace.snapshots[f"{name}|sample_index"] = idx.cpu()

    def wants_layer_stats(self, step: int) -> bool:
        return step % self.every == 0 or step in self.snap_steps

    def record_layers(self, step: int, conflicts: dict):
        for name, m in self.layers.items():
            assign = m.current_assignment()
            top = m.top_ratio()
            lo = 1.0 / m.n_candidates
            row = dict(step=step, layer=name, block=block_index(name), type=layer_type(name),
                       hard=bool(m.hard),
                       frozen_frac=1.0 if m.hard else m.frozen_mask.float().mean().item(),
                       changed_frac=(assign != self.assign0[name]).float().mean().item(),
                       codebook_drift=((m.codebook.detach() - self.codebook0[name]).norm()
                                       / self.codebook0[name].norm().clamp_min(1e-30)).item())
            row.update({f"ratio_hist_{i}": v for i, v in enumerate(_hist(top, lo, 1.0, RATIO_BINS))})
            c = conflicts.get(name)
            mech = None
            if c is not None and "grad" in c:  # leave-one-out / null / move measures (vq4dit.mechanism)
                from .mechanism import gradient_stats
                mech = gradient_stats(c.pop("grad"), c["assign"], self.prev_assign.get(name, self.assign0[name]), m.codebook.detach(),
                                      self.null_gen, self.samples[name])
                self.prev_assign[name] = c.pop("assign").clone()
                row.update({key: v for key, v in mech.items() if key != "sample_loo_cos"})
            if c is not None:
                coh = c["coherence"][~torch.isnan(c["coherence"])]
                row.update(coherence_mean=coh.mean().item() if coh.numel() else float("nan"),
                           conflict_share=c["conflict_share"])
                row.update({f"coherence_hist_{i}": v for i, v in
                            enumerate(_hist(coh, 0.0, 1.0, COHERENCE_BINS))})
            self.trace.add("layers", row)
            idx = self.samples[name][:N_TRAJECTORIES]
            if m.hard:  # one-hot: the k-means codeword has ratio 1 only if the sub-vector kept it
                first = (assign[idx] == m.kmeans_assignment[idx]).float().cpu()
            else:
                first = m.assignment_ratios().detach()[idx, 0].cpu()
            chosen = assign[idx].cpu()
            for j in range(len(idx)):
                self.trace.add("ratios", dict(step=step, layer=name, sample=j,
                                              ratio_nearest=float(first[j]), codeword=int(chosen[j])))
            if step in self.snap_steps:
                key = f"{name}|{step}|"
                s = self.trace.snapshots
                s[key + "codebook"] = m.codebook.detach().float().cpu().clone()
                s[key + "assign"] = assign[self.samples[name]].cpu().clone()
                s[key + "top_ratio"] = top[self.samples[name]].float().cpu().clone()
                if mech is not None:
                    s[key + "loo_cos"] = mech["sample_loo_cos"].float().clone()
                if c is not None:
                    s[key + "worst_grads"] = c["worst_grads"].cpu().clone()
                    s[key + "worst_codeword"] = torch.tensor([c["worst"]])

