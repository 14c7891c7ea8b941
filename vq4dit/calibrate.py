"""Zero-data block-wise calibration (spec steps 5-7) and the trace it records.

Teacher = full-precision model, student = VQ model. Per iteration: random class labels and
Gaussian noise; the teacher runs the CFG sampler; at each timestep teacher and student see
the same input, forward hooks capture every block's output, and the student takes one
optimizer step on  L = mean_b MSE(student_b, teacher_b) + lambda_r * L_r.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from .quant import CalibConfig, VQConfig, VQLinear, block_index, layer_type, quantized_layers
from .sampling import guided_eps, make_scheduler, null_class_id

# ----------------------------------------------------------------------------------------
# Block outputs and the teacher trajectory (shared with metrics.block_mse)
# ----------------------------------------------------------------------------------------


@contextmanager
def capture_blocks(model: nn.Module) -> Iterator[list]:
    """Forward hooks on every transformer block; yields a list refilled on each forward."""
    outs: list = []

    def hook(_mod, _inp, out):
        outs.append(out[0] if isinstance(out, tuple) else out)

    handles = [b.register_forward_hook(hook) for b in model.transformer_blocks]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def teacher_trajectory(teacher, labels: torch.Tensor, noise: torch.Tensor, num_steps: int,
                       guidance_scale: float, scheduler=None):
    """Run the teacher's CFG sampler; yield (x_in, t_in, y_in, teacher_block_outputs) per step.

    x_in/y_in hold the CFG batch (2N: conditional + null class) that both models see.
    """
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(num_steps)
    n, c = noise.shape[0], noise.shape[1]
    null = torch.full_like(labels, null_class_id(teacher))
    y_in = torch.cat([labels, null])
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = torch.cat([scheduler.scale_model_input(x, t)] * 2)
        t_in = t.reshape(1).to(x.device).expand(2 * n)
        with torch.no_grad(), capture_blocks(teacher) as outs:
            out = teacher(x_in, timestep=t_in, class_labels=y_in, return_dict=False)[0]
        yield x_in, t_in, y_in, [o.detach() for o in outs]
        eps = out[:, :c]
        eps = eps[n:] + guidance_scale * (eps[:n] - eps[n:])
        x = scheduler.step(eps, t, x).prev_sample


def block_losses(student, x_in, t_in, y_in, targets) -> list[torch.Tensor]:
    with capture_blocks(student) as outs:
        student(x_in, timestep=t_in, class_labels=y_in, return_dict=False)
    return [torch.mean((o.float() - tgt.float()) ** 2) for o, tgt in zip(outs, targets)]


# ----------------------------------------------------------------------------------------
# Trace: what the app draws (bounded: layer stats every `trace_every` steps, few snapshots)
# ----------------------------------------------------------------------------------------

RATIO_BINS = 10      # histogram of top assignment ratio over [1/n, 1]
COHERENCE_BINS = 10  # histogram of per-codeword gradient coherence over [0, 1]
N_TRAJECTORIES = 8   # sample sub-vectors whose ratio trajectories are kept per layer


class Trace:
    """Calibration record. DataFrames: `steps`, `layers`, `ratios`, `events`; tensors: `snapshots`.

    snapshots["<layer>|<step>|codebook"] (k, d), "|assign" (n_samples,), "|top_ratio",
    "|worst_grads" (m, d) + "|worst_codeword" (1,); per layer "<layer>|sample_fp" (n_samples, d)
    and "<layer>|sample_index" (n_samples,).
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

    @property
    def layer_names(self) -> list[str]:
        return list(self.meta.get("layers", {}))

    def snapshot_steps(self) -> list[int]:
        return sorted({int(k.split("|")[1]) for k in self.snapshots if k.count("|") == 2})

    # -- disk -----------------------------------------------------------------------------
    def save(self, path):
        """Atomic: written to a temp dir next to `path`, then renamed into place."""
        from safetensors.torch import save_file
        from .safety import check_replace_target, replace_dir, temp_dir_for  # issue 11: crash-safe replace
        path = Path(path)
        check_replace_target(path, "meta.json", what="calibration trace")  # only ever replace a trace
        tmp = temp_dir_for(path)
        try:
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str))
            for name in ("steps", "layers", "ratios", "events"):
                self._frame(name).to_csv(tmp / f"{name}.csv", index=False)
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
            tr.snapshots = load_file(str(snap)) if snap.is_file() else {}
        except (ValueError, OSError, json.JSONDecodeError, pd.errors.ParserError) as e:
            raise ValueError(f"trace at {path} is corrupt or unreadable: {e}") from e
        return tr


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
    return dict(coherence=coherence, conflict_share=conflict_share, worst=worst, worst_grads=worst_grads)


class _Recorder:
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
                       changed_frac=(assign != m.kmeans_assignment).float().mean().item(),
                       codebook_drift=((m.codebook.detach() - self.codebook0[name]).norm()
                                       / self.codebook0[name].norm().clamp_min(1e-30)).item())
            row.update({f"ratio_hist_{i}": v for i, v in enumerate(_hist(top, lo, 1.0, RATIO_BINS))})
            c = conflicts.get(name)
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
                if c is not None:
                    s[key + "worst_grads"] = c["worst_grads"].cpu().clone()
                    s[key + "worst_codeword"] = torch.tensor([c["worst"]])


# ----------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------


class CalibrationStopped(Exception):
    pass


def calibrate(student: nn.Module, teacher: nn.Module, config: VQConfig, originals: dict,
              on_step: Optional[Callable[[dict], Optional[bool]]] = None, progress: bool = True) -> Trace:
    """Calibrate the VQ layers of `student` in place against `teacher`. Returns the Trace.

    Stops early (keeping everything recorded and a valid hard-assigned model) when `on_step`
    returns False, on KeyboardInterrupt, or when `max_seconds` runs out.
    """
    cfg = config.calib
    device = pick_device(cfg.device)
    student.to(device).eval()
    teacher.to(device).eval()
    layers = {n: m for n, m in quantized_layers(student).items() if isinstance(m, VQLinear)}

    # 1. Trainable parameters: codebooks, biases, assignment logits; everything else frozen.
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    for name, m in layers.items():
        if cfg.train_assignments:
            m.init_soft(originals[name].to(device))
            m.hard_forward = cfg.hard_forward
            m.logits.requires_grad_(True)
        m.codebook.requires_grad_(m.hard or cfg.train_codebook_soft)
        if m.bias is not None:
            m.bias.requires_grad_(True)
    groups = [
        dict(params=[m.codebook for m in layers.values()], lr=cfg.lr_codebook, name="codebook"),
        dict(params=[m.bias for m in layers.values() if m.bias is not None], lr=cfg.lr_bias, name="bias"),
    ]
    if cfg.train_assignments:
        groups.append(dict(params=[m.logits for m in layers.values()], lr=cfg.lr_logits, name="logits"))
    opt = torch.optim.RMSprop([g for g in groups if g["params"]], alpha=cfg.rmsprop_alpha)

    trace = Trace(dict(method=config.method, config=config.to_dict(), device=str(device),
                       total_steps=cfg.total_steps, n_blocks=len(student.transformer_blocks),
                       layers={n: dict(block=block_index(n), type=layer_type(n), k=m.k, d=m.d,
                                       shape=[m.out_features, m.in_features]) for n, m in layers.items()}))
    rec = _Recorder(trace, layers, cfg, originals)
    rec.record_layers(0, {})

    g = torch.Generator().manual_seed(cfg.seed)
    n_cls = null_class_id(teacher)
    c, s = teacher.config.in_channels, teacher.config.sample_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, desc=f"calibrate {config.method}", leave=False)
    step, stopped, t0 = 0, None, time.time()
    try:
        for it in range(cfg.iterations):
            labels = torch.randint(n_cls, (cfg.labels_per_iteration,), generator=g).to(device)
            noise = torch.randn(cfg.labels_per_iteration, c, s, s, generator=g).to(device)
            for x_in, t_in, y_in, targets in teacher_trajectory(teacher, labels, noise,
                                                                 cfg.num_sampling_steps, cfg.guidance_scale):
                step += 1
                want_stats = rec.wants_layer_stats(step)
                for m in layers.values():
                    m.record_weight_grad = want_stats
                # 2. Loss: mean block MSE + lambda_r * L_r  (spec steps 4-5)
                losses = block_losses(student, x_in, t_in, y_in, targets)
                block_loss = torch.stack(losses).mean()
                soft = [m.ratio_regularizer() for m in layers.values() if not m.hard]
                l_r = torch.stack(soft).mean() if soft else block_loss.new_zeros(())
                loss = block_loss + cfg.lambda_r * l_r
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"calibration loss became {loss.item()} at step {step}: "
                                             f"lower the learning rates")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                conflicts = {}
                if want_stats:
                    conflicts = {n: gradient_conflict(m) for n, m in layers.items()}
                    conflicts = {n: v for n, v in conflicts.items() if v is not None}
                opt.step()
                # 3. Progressive freezing and the switch to hard assignments (spec step 7)
                newly_hard = []
                force = cfg.force_hard_at is not None and step >= cfg.force_hard_at * cfg.total_steps
                if step > cfg.freeze_after or force:
                    for n, m in layers.items():
                        if m.hard:
                            continue
                        if force:
                            m.make_hard()
                        elif not m.freeze_confident(cfg.freeze_threshold, cfg.hard_threshold):
                            continue
                        m.codebook.requires_grad_(True)  # hard layers train their codebook
                        newly_hard.append(n)
                for n in newly_hard:
                    trace.add("events", dict(step=step, layer=n, event="hard"))
                for m in layers.values():
                    m.record_weight_grad, m.last_weight = False, None
                frozen = float(np.mean([1.0 if m.hard else m.frozen_mask.float().mean().item()
                                        for m in layers.values()]))
                row = dict(step=step, iteration=it, timestep=int(t_in[0]), loss=loss.item(),
                           block_loss=block_loss.item(), l_r=l_r.item(), frozen_frac=frozen,
                           hard_layers=sum(m.hard for m in layers.values()), seconds=time.time() - t0)
                row.update({f"block_{b}": v.item() for b, v in enumerate(losses)})
                trace.add("steps", row)
                if want_stats:
                    rec.record_layers(step, conflicts)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3g}", frozen=f"{frozen:.2f}")
                if on_step is not None and on_step(dict(row, total_steps=cfg.total_steps, trace=trace)) is False:
                    raise CalibrationStopped("cancelled")
                if cfg.max_seconds is not None and time.time() - t0 > cfg.max_seconds:
                    raise CalibrationStopped("time budget")
    except CalibrationStopped as e:
        stopped = str(e)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
        finalize(student)
        for m in layers.values():
            m.record_weight_grad, m.last_weight = False, None
    # 4. Final record: everything hard, codebooks at storage precision
    rec.snap_steps.add(step)
    trace._layers = [r for r in trace._layers if r["step"] != step]  # final state replaces step's record
    trace._ratios = [r for r in trace._ratios if r["step"] != step]
    trace._frames.clear()
    rec.record_layers(step, {})
    trace.meta.update(steps_done=step, seconds=time.time() - t0, stopped=stopped)
    return trace


@torch.no_grad()
def finalize(model: nn.Module, codebook_dtype: str = "float16"):
    """Hard assignments everywhere, codebooks rounded to storage precision, no grads."""
    cfg = getattr(model, "_vq4dit_config", None)
    dtype = cfg.codebook_dtype if isinstance(cfg, VQConfig) else codebook_dtype
    for m in quantized_layers(model).values():
        if isinstance(m, VQLinear):
            m.make_hard()
            m.round_codebook(dtype)
        for p in m.parameters():
            p.requires_grad_(False)
