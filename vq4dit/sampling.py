"""Class-conditional sampling with classifier-free guidance for diffusers DiT models.

One place for the CFG step (`guided_eps`) so sampling, calibration and metrics all run the
same sampler. Works in pixel space (embedded digits DiT) or latent space (DiT-XL/2 + VAE).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from diffusers import DDIMScheduler


SAMPLERS = ("ddim", "ddpm")


def make_scheduler(num_train_timesteps: int = 1000, kind: str = "ddim", learned_sigma: bool = False):
    """DDIM (deterministic; our sampler for images and metrics) or DDPM (stochastic, 50 strided
    steps: the reference code's sampler for calibration trajectories). DiT's linear betas."""
    from diffusers import DDPMScheduler
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=0.0001,
                  beta_end=0.02, clip_sample=False, prediction_type="epsilon")
    if kind == "ddim":
        # clip_sample=False: x0 clipping turns the tiny digits model's samples into noise.
        return DDIMScheduler(**common, set_alpha_to_one=False)
    if kind == "ddpm":
        # learned-sigma models (DiT-XL/2) give their own variance, as in DiT's sampler
        return DDPMScheduler(**common, variance_type="learned_range" if learned_sigma else "fixed_small")
    raise ValueError(f"unknown sampler {kind!r}: choose one of {SAMPLERS}")


def has_learned_sigma(transformer) -> bool:
    cfg = transformer.config
    return cfg.out_channels is not None and cfg.out_channels == 2 * cfg.in_channels


def null_class_id(transformer) -> int:
    """Label index of the 'no class' embedding used for classifier-free guidance."""
    n = transformer.config.num_embeds_ada_norm
    if n is None:
        raise ValueError("transformer has no class embedding (num_embeds_ada_norm is None): not a class-conditional DiT")
    return int(n)


# ----------------------------------------------------------------------------------------
# Classifier-free guidance: the one place. `guided_eps` (sampling) and the calibration's teacher
# trajectory (which needs the 2N-batch block outputs) both build the batch with `cfg_batch` and
# combine with `combine_cfg`.
# ----------------------------------------------------------------------------------------

def cfg_batch(transformer, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W), (N,) -> the 2N batch: conditional first, then the null class."""
    null = torch.full_like(labels, null_class_id(transformer))
    return torch.cat([x, x]), torch.cat([labels, null])  # (2N, C, H, W), (2N,)


def combine_cfg(out: torch.Tensor, channels: int, guidance_scale: float) -> torch.Tensor:
    """Model output on a `cfg_batch` (2N, C or 2C, H, W) -> guided eps (N, C, H, W)."""
    eps = out[:, :channels]  # learned-sigma models (DiT-XL/2) output 2C channels: keep eps
    cond, uncond = eps.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def guided_eps(transformer, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
               guidance_scale: float) -> torch.Tensor:
    """Noise prediction with CFG. x: (N, C, H, W), labels: (N,) -> eps (N, C, H, W)."""
    c = x.shape[1]
    if guidance_scale == 1.0:  # guidance 1 is the conditional model alone: skip the null half
        t_in = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        return transformer(x, timestep=t_in, class_labels=labels, return_dict=False)[0][:, :c]
    x_in, y_in = cfg_batch(transformer, x, labels)
    t_in = t.reshape(-1).expand(x_in.shape[0]) if t.numel() == 1 else torch.cat([t.reshape(-1)] * 2)
    out = transformer(x_in, timestep=t_in, class_labels=y_in, return_dict=False)[0]
    return combine_cfg(out, c, guidance_scale)


def initial_noise(transformer, n: int, seed: int, device) -> torch.Tensor:
    """Deterministic starting noise (N, C, S, S), generated on CPU so seeds match across devices."""
    return random_labels_and_noise(transformer, n, torch.Generator().manual_seed(int(seed)), device,
                                   labels=False)[1]


def random_labels_and_noise(transformer, n: int, generator: torch.Generator, device, labels: bool = True):
    """n random class labels (n,) and Gaussian noise (n, C, S, S), drawn on CPU from `generator`
    (so a seed gives the same values on every device). Used by calibration and block MSE."""
    c, s = transformer.config.in_channels, transformer.config.sample_size
    y = torch.randint(null_class_id(transformer), (n,), generator=generator).to(device) if labels else None
    return y, torch.randn(n, c, s, s, generator=generator).to(device)


@torch.no_grad()
def sample(transformer, class_labels: Sequence[int] | torch.Tensor, *, num_steps: int = 50,
           guidance_scale: float = 4.0, seed: int = 0, scheduler=None, vae=None,
           device=None, noise: Optional[torch.Tensor] = None,
           on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
           batch_size: Optional[int] = None) -> torch.Tensor:
    """Generate images for `class_labels`. Returns (N, C, H, W) in [-1, 1] on CPU.

    on_step(i, x) is called after each denoising step (e.g. for progress bars). `batch_size` bounds
    how many images go through the model at once (memory does not grow with the number of labels);
    the noise is drawn for all labels first, so results equal an unbatched call.
    """
    transformer.eval()  # train mode would apply diffusers' label dropout inside every block
    scheduler = scheduler or make_scheduler()
    max_steps = int(scheduler.config.num_train_timesteps)
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= int(num_steps) <= max_steps:
        raise ValueError(f"num_steps must be an integer in [1, {max_steps}], got {num_steps!r}")
    if not math.isfinite(float(guidance_scale)) or float(guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    labels = torch.as_tensor(list(class_labels) if not torch.is_tensor(class_labels) else class_labels,
                             dtype=torch.long, device=device)
    n_cls = null_class_id(transformer)
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_cls):
        raise ValueError(f"class labels must be in [0, {n_cls - 1}], got {labels.tolist()[:10]}")
    x0 = noise.to(device) if noise is not None else initial_noise(transformer, len(labels), seed, device)
    if batch_size is None or len(labels) <= batch_size:
        return _sample_batch(transformer, labels, x0, int(num_steps), float(guidance_scale), scheduler, vae, on_step)
    outs = []
    for s in range(0, len(labels), int(batch_size)):
        outs.append(_sample_batch(transformer, labels[s:s + batch_size], x0[s:s + batch_size], int(num_steps),
                                  float(guidance_scale), scheduler, vae, on_step))
    return torch.cat(outs)


def _sample_batch(transformer, labels, x, num_steps, guidance_scale, scheduler, vae, on_step):
    device = labels.device
    scheduler.set_timesteps(num_steps)
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = guided_eps(transformer, x_in, t.to(device).reshape(1), labels, guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step(i, x)
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return x.clamp(-1, 1).float().cpu()
