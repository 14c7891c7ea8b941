"""Zero-data block-wise calibration (spec steps 5-7), recording a `Trace` as it goes.

Teacher = full-precision model, student = VQ model. Per iteration: random class labels and
Gaussian noise; the teacher runs the CFG sampler; at each timestep teacher and student see
the same input, forward hooks capture every block's output, and the student takes one
optimizer step on  L = mean_b MSE(student_b, teacher_b) + lambda_r * L_r.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .config import VQConfig
from .layers import VQLinear
from .naming import block_index, layer_type
from .checks import resolve_device
from .sampling import has_learned_sigma, make_scheduler, random_labels_and_noise
from .size import quantized_layers
from .trace import Recorder, Trace, gradient_conflict
from .trajectories import block_losses, teacher_trajectory

# ----------------------------------------------------------------------------------------
# Calibration: set up, one step, freeze / hard switch, finish
# ----------------------------------------------------------------------------------------


class CalibrationStopped(Exception):
    pass


@dataclass
class Calibration:
    """What a calibration run holds between steps (built by `setup`)."""
    config: VQConfig
    student: nn.Module
    teacher: nn.Module
    originals: dict                 # layer name -> FP weight (candidate sets, finishing pass, trace)
    device: torch.device
    layers: dict                    # layer name -> VQLinear being calibrated
    opt: torch.optim.Optimizer
    logit_owner: dict               # id(logits) -> its layer, to drop logits of layers gone hard
    trace: Trace
    recorder: Recorder
    weight: float                   # this rank's share of each batch (1 on one process)
    t0: float = field(default_factory=time.time)
    # budget bookkeeping: the last step a layer switched to hard by itself, steps with soft layers,
    # and L_r's running minimum within the current trajectory (the lr_gate switch)
    last_switch: int = 0
    soft_steps: int = 0
    lr_min: object = float("inf")  # a 0-d tensor on the device once set (no host sync)
    frozen_shares: Optional[dict] = None  # soft layers' frozen shares read by this step's freezing check

    @property
    def cfg(self):
        return self.config.calib


def calibrate(student: nn.Module, teacher: nn.Module, config: VQConfig, originals: dict,
              on_step: Optional[Callable[[dict], Optional[bool]]] = None, progress: bool = True) -> Trace:
    """Calibrate the VQ layers of `student` in place against `teacher`. Returns the Trace.

    Stops early (keeping everything recorded and a valid hard-assigned model) when `on_step`
    returns False, on KeyboardInterrupt, or when `max_seconds` runs out.

    Data parallel when a torch.distributed process group is up (`torchrun`, see
    `vq4dit.distributed`): each rank runs its rows of every batch, gradients and recorded losses
    are all-reduced to the full batch's, so every rank holds the same model at every step.
    """
    run = setup(student, teacher, config, originals)
    cfg = run.cfg
    g = torch.Generator().manual_seed(cfg.seed)
    scheduler = make_scheduler(kind=cfg.teacher_sampler, learned_sigma=has_learned_sigma(teacher))
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.step_cap, desc=f"calibrate {config.method}", leave=False)
    step, stopped, device = 0, None, run.device
    # opt-in bf16 autocast of the forwards (teacher trajectory and student); parameters and optimizer
    # state stay fp32. The trajectory generator runs the teacher inside this context.
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")
    try:
        amp.__enter__()
        for it in itertools.count():  # trajectories: `iterations`, or more under until_hard
            if budget_spent(run, step):
                break
            run.lr_min = float("inf")
            labels, noise = random_labels_and_noise(teacher, cfg.labels_per_iteration, g, device)
            for x_in, t_in, y_in, targets in teacher_trajectory(teacher, labels, noise, cfg.num_sampling_steps,
                                                                 cfg.guidance_scale, scheduler, g, split=True):
                step += 1
                row = calibration_step(run, step, it, x_in, t_in, y_in, targets)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3g}", frozen=f"{row['frozen_frac']:.2f}")
                stop = None
                if on_step is not None and on_step(dict(row, total_steps=cfg.total_steps, trace=run.trace)) is False:
                    stop = "cancelled"
                elif cfg.max_seconds is not None and time.time() - run.t0 > cfg.max_seconds:
                    stop = "time budget"
                if distributed.any_rank(stop is not None, device):  # all ranks stop at the same step
                    raise CalibrationStopped(stop or "stopped by another rank")
                if budget_spent(run, step):
                    break
    except CalibrationStopped as e:
        stopped = str(e)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        amp.__exit__(None, None, None)
        if bar is not None:
            bar.close()
        forced = [n for n, m in run.layers.items() if not m.hard]  # still soft: finalize takes their argmax
        finalize(student)
        for m in run.layers.values():
            m.record_weight_grad, m.last_weight = False, None
    return finish(run, step, stopped, forced)


def budget_spent(run: Calibration, step: int) -> bool:
    """The planned steps are done; under until_hard, also every layer has switched by itself and
    `hard_margin` more steps have run; never more than `step_cap` (the same on every rank)."""
    cfg = run.cfg
    if step >= cfg.step_cap:
        return True
    if step < cfg.total_steps:
        return False
    return not cfg.until_hard or (all(m.hard for m in run.layers.values())
                                  and step >= run.last_switch + cfg.hard_margin)


def setup(student: nn.Module, teacher: nn.Module, config: VQConfig, originals: dict) -> Calibration:
    """Both models on the device, soft assignments initialised, the optimizer and the trace."""
    cfg = config.calib
    device = resolve_device(cfg.device)
    student.to(device).eval()
    teacher.to(device).eval()
    layers = {n: m for n, m in quantized_layers(student).items() if isinstance(m, VQLinear)}
    # data parallel: this rank's share of each batch weighs n_rank / N in every reduction
    share = distributed.rows(cfg.labels_per_iteration)
    weight = (share.stop - share.start) / cfg.labels_per_iteration
    distributed.broadcast_module_(student)  # every rank starts from rank 0's k-means

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
    logit_owner = {id(m.logits): m for m in layers.values() if m.logits is not None}

    trace = Trace(dict(method=config.method, config=config.to_dict(), device=str(device),
                       world_size=distributed.world_size(),
                       total_steps=cfg.total_steps, n_blocks=len(student.transformer_blocks),
                       layers={n: dict(block=block_index(n), type=layer_type(n), k=m.k, d=m.d,
                                       shape=[m.out_features, m.in_features]) for n, m in layers.items()}))
    rec = Recorder(trace, layers, cfg, originals)
    rec.record_layers(0, {})
    return Calibration(config, student, teacher, originals, device, layers, opt, logit_owner, trace, rec, weight)


def calibration_step(run: Calibration, step: int, iteration: int, x_in, t_in, y_in, targets) -> dict:
    """One optimizer step on one timestep of the teacher's trajectory; returns the step's row
    (also added to the trace)."""
    cfg, layers = run.cfg, run.layers
    if cfg.temperature_end is not None:  # annealed ratios: T goes 1 -> temperature_end
        for m in layers.values():
            m.temperature = cfg.temperature_end ** (step / cfg.total_steps)
    want_stats = run.recorder.wants_layer_stats(step)
    for m in layers.values():
        m.record_weight_grad = want_stats
    # 2. Loss: mean block MSE + lambda_r * L_r  (spec steps 4-5)
    losses = block_losses(run.student, x_in, t_in, y_in, targets)
    block_loss = torch.stack(losses).mean()
    soft = [m.ratio_regularizer() for m in layers.values() if not m.hard]
    run.soft_steps += bool(soft)
    l_r = torch.stack(soft).mean() if soft else block_loss.new_zeros(())
    l_r_on = block_loss.new_ones(())
    if cfg.lr_gate and soft:  # reference code: L_r counts only on steps it rises above its running min
        l_r_on = (l_r.detach() > run.lr_min).to(l_r.dtype)       # on the device: no host sync
        run.lr_min = torch.minimum(l_r.detach(), torch.as_tensor(run.lr_min, dtype=l_r.dtype, device=l_r.device))
    loss = block_loss + cfg.lambda_r * l_r_on * l_r
    # the full batch's block losses (this rank's on one process), recorded below
    losses = distributed.all_reduce_mean(torch.stack(losses).detach(), run.weight).unbind()
    block_loss = torch.stack(losses).mean()
    loss_value = block_loss + cfg.lambda_r * l_r_on * l_r.detach()
    # the step's scalars leave the device in one transfer (one host sync, not 3 + n_blocks .item())
    # (the timestep too: an integer < 2^24, exact in float32)
    loss_f, block_loss_f, l_r_f, l_r_on, timestep, *block_f = torch.stack(
        [loss_value, block_loss, l_r.detach().to(block_loss.dtype), l_r_on.to(block_loss.dtype),
         t_in[0].to(block_loss.dtype), *losses]).float().tolist()
    if not np.isfinite(loss_f):
        raise FloatingPointError(f"calibration loss became {loss_f} at step {step}: lower the learning rates")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    # data parallel: the full batch's gradients (and weight gradients for the stats)
    distributed.all_reduce_mean_grads(
        [p for grp in run.opt.param_groups for p in grp["params"]]
        + [m.last_weight for m in layers.values() if m.last_weight is not None], run.weight)
    conflicts = {}
    if want_stats:
        conflicts = {n: gradient_conflict(m) for n, m in layers.items()}
        conflicts = {n: v for n, v in conflicts.items() if v is not None}
    run.opt.step()
    freeze_and_switch(run, step)
    for m in layers.values():
        m.record_weight_grad, m.last_weight = False, None
    frozen = float(np.mean(frozen_shares(run)))
    row = dict(step=step, iteration=iteration, timestep=int(timestep), loss=loss_f, block_loss=block_loss_f, l_r=l_r_f,
               l_r_on=l_r_on,
               frozen_frac=frozen, hard_layers=sum(m.hard for m in layers.values()),
               seconds=time.time() - run.t0)
    row.update({f"block_{b}": v for b, v in enumerate(block_f)})
    run.trace.add("steps", row)
    if want_stats:
        run.recorder.record_layers(step, conflicts)
    return row


def freeze_and_switch(run: Calibration, step: int) -> list[str]:
    """3. Progressive freezing and the switch to hard assignments (spec step 7); returns the layers
    that went hard at this step (an event each in the trace)."""
    cfg = run.cfg
    newly_hard = []
    force = cfg.force_hard_at is not None and step >= cfg.force_hard_at * cfg.total_steps
    commit = (None if cfg.commit_until is None
              else min(1.0, step / (cfg.commit_until * cfg.total_steps)))
    run.frozen_shares = None
    soft = {n: m for n, m in run.layers.items() if not m.hard}
    if soft and (step > cfg.freeze_after or force):
        if force:
            shares = dict.fromkeys(soft, 1.0)
        else:  # every soft layer's frozen share in one host transfer (not one .item() per layer)
            shares = dict(zip(soft, torch.stack([m.freeze_confident_rows(cfg.freeze_threshold)
                                                 for m in soft.values()]).tolist()))
            if commit is None:  # still exact after the switches below: the row reuses them
                run.frozen_shares = shares
        for n, m in soft.items():
            if force:
                m.make_hard()
            elif not (m.switch_if_frozen(shares[n], cfg.hard_threshold)
                      or (commit is not None and m.commit_most_confident(commit, cfg.hard_threshold))):
                continue
            m.codebook.requires_grad_(True)  # hard layers train their codebook
            newly_hard.append(n)
    for n in newly_hard:
        run.trace.add("events", dict(step=step, layer=n, event="hard"))
        run.last_switch = step
    if newly_hard:
        release_hard_logits(run.opt, run.logit_owner)
    return newly_hard


def frozen_shares(run: Calibration) -> list[float]:
    """Each layer's frozen share after this step's switches (1 when hard): reuses the shares the
    freezing check read, else one host transfer for all soft layers."""
    soft = [n for n, m in run.layers.items() if not m.hard]
    known = run.frozen_shares or {}
    missing = [n for n in soft if n not in known]
    if missing:
        known = dict(known, **dict(zip(missing, torch.stack(
            [run.layers[n].frozen_mask.double().mean() for n in missing]).tolist())))
    return [1.0 if m.hard else known[n] for n, m in run.layers.items()]


def finish(run: Calibration, step: int, stopped: Optional[str], forced: list[str]) -> Trace:
    """4. Optional discrete finishing pass (codebook fixed), then the final record."""
    cfg, layers = run.cfg, run.layers
    if cfg.finish_repick and stopped is None:
        moments = collect_input_moments(run.teacher, list(layers), cfg, run.device)
        changed = {n: m.repick(run.originals[n].to(run.device), moments[n]) for n, m in layers.items()}
        run.trace.meta["repick_changed"] = changed
    if stopped != "interrupted":  # an interrupted rank may not reach this collective
        distributed.check_same_on_all_ranks([t for m in layers.values() for t in (m.codebook, m.assignment)],
                                            "codebooks or assignments")
    run.recorder.snap_steps.add(step)
    run.trace.drop_layer_records(step)  # the final state replaces step's record
    run.recorder.record_layers(step, {})
    for n in forced:
        run.trace.add("events", dict(step=step, layer=n, event="forced"))
    run.trace.meta.update(steps_done=step, seconds=time.time() - run.t0, stopped=stopped,
                          # which layers finalize forced (still soft: codebooks trained for soft mixtures)
                          forced_layers=len(forced), forced=forced, last_switch_step=run.last_switch,
                          soft_steps=run.soft_steps, hard_switch_steps=run.trace.hard_steps())
    return run.trace


def release_hard_logits(opt: torch.optim.Optimizer, logit_owner: dict):
    """Drop the assignment logits of layers that went hard, and their RMSprop state, from the
    optimizer: they no longer train, and at DiT-XL/2 scale they hold ~2.7 GB (logits + state)."""
    for group in opt.param_groups:
        if group.get("name") != "logits":
            continue
        for p in group["params"]:
            if logit_owner[id(p)].hard:
                opt.state.pop(p, None)
        group["params"] = [p for p in group["params"] if not logit_owner[id(p)].hard]


@torch.no_grad()
def finalize(model: nn.Module):
    """Hard assignments everywhere, codebooks rounded to storage precision, no grads."""
    for m in quantized_layers(model).values():
        if isinstance(m, VQLinear):
            m.make_hard()
            m.round_codebook()
        for p in m.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def collect_input_moments(teacher: nn.Module, names: list[str], cfg, device, trajectories: int = 2,
                          seed_offset: int = 7919) -> dict[str, torch.Tensor]:
    """H = E[x x^T] (in, in) of each named Linear's input, over the teacher's own CFG trajectories
    (a seed apart from calibration's). Used by the finishing pass's output-error proxy."""
    mods = {n: teacher.get_submodule(n) for n in names}
    sums = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in mods.items()}
    count = {n: 0 for n in names}

    def hook(name):
        def f(_mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()   # (tokens, in)
            sums[name].add_(x.T @ x)
            count[name] += x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        g = torch.Generator().manual_seed(cfg.seed + seed_offset)
        scheduler = make_scheduler(kind=cfg.teacher_sampler, learned_sigma=has_learned_sigma(teacher))
        for _ in range(trajectories):
            labels, noise = random_labels_and_noise(teacher, cfg.labels_per_iteration, g, device)
            for _step in teacher_trajectory(teacher, labels, noise, cfg.num_sampling_steps, cfg.guidance_scale,
                                            scheduler, g):
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(count[n], 1) for n in names}
