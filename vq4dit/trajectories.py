"""Teacher trajectories and block outputs: what calibration trains on and metrics measure with.

`teacher_trajectory` runs the full-precision model's CFG sampler and yields, per timestep, the input
both models see and the teacher's block outputs (`capture_blocks`); `block_losses` is the student's
per-block MSE against them (spec step 5).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from . import distributed
from .sampling import cfg_batch, combine_cfg, make_scheduler



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


def teacher_trajectory(teacher, labels: torch.Tensor, noise: torch.Tensor, num_steps: int,
                       guidance_scale: float, scheduler=None, generator: Optional[torch.Generator] = None,
                       split: bool = False):
    """Run the teacher's CFG sampler; yield (x_in, t_in, y_in, teacher_block_outputs) per step.

    x_in/y_in hold the CFG batch (2N: conditional + null class) that both models see. A DDPM
    `scheduler` draws its per-step noise from `generator` (CPU), so trajectories are seeded.
    `split` (data-parallel calibration): the teacher sees only this rank's rows of the batch
    (`distributed.rows`) while the sampler steps the full batch's state and noise, so this rank's
    rows follow the same trajectory as on one process: it does not depend on the split.
    """
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(num_steps)
    n, c = noise.shape[0], noise.shape[1]
    stochastic = isinstance(scheduler, DDPMScheduler)
    learned = stochastic and scheduler.config.variance_type == "learned_range"
    share = distributed.rows(n) if split else slice(None)  # this rank's rows (all of them on one process)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in, y_in = cfg_batch(teacher, scheduler.scale_model_input(x[share], t), labels[share])  # (2n, ...)
        m = x_in.shape[0] // 2
        t_in = t.reshape(1).to(x.device).expand(2 * m)
        with torch.no_grad(), capture_blocks(teacher) as outs:
            out = teacher(x_in, timestep=t_in, class_labels=y_in, return_dict=False)[0]
        yield x_in, t_in, y_in, [o.detach() for o in outs]
        eps = combine_cfg(out, c, guidance_scale)                      # (n, C, H, W)
        if learned:  # guide eps only; keep the conditional half's variance (DiT's sampler)
            eps = torch.cat([eps, out[:m, c:]], 1)
        if split:  # the full batch's shape, so a DDPM step draws the full batch's noise from `generator`;
            # the step is elementwise: other ranks' rows (eps 0 here) never mix into this rank's
            full = eps.new_zeros((n,) + eps.shape[1:])                 # (N, C, H, W)
            full[share] = eps
            eps = full
        kw = dict(generator=generator) if stochastic else {}
        x = scheduler.step(eps, t, x, **kw).prev_sample


def block_losses(student, x_in, t_in, y_in, targets) -> list[torch.Tensor]:
    with capture_blocks(student) as outs:
        student(x_in, timestep=t_in, class_labels=y_in, return_dict=False)
    return [torch.mean((o.float() - tgt.float()) ** 2) for o, tgt in zip(outs, targets)]
