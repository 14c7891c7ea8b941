"""The tiny class-conditional DiT and its resumable training (DDPM, EMA, label dropout)."""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import DIGITS_DIT_DIR, IMAGE_SIZE, NUM_CLASSES
from ..fs import atomic_file
from .data import load_digit_images, random_shift

# ----------------------------------------------------------------------------------------------
# Tiny DiT
# ----------------------------------------------------------------------------------------------

def make_digits_dit(num_layers: int = 6, num_attention_heads: int = 4, attention_head_dim: int = 64):
    """Class-conditional DiT for (N, 1, 16, 16) images: 8x8 = 64 tokens of 2x2 patches.

    Defaults: hidden 256, 6 blocks (about 7.1M parameters in the blocks' linears, 7.9M with each
    block's own timestep/label embedder, 8.0M in all). Label index 10 (= num_embeds_ada_norm) is
    the null class for classifier-free guidance: diffusers' LabelEmbedding allocates that extra
    row because CombinedTimestepLabelEmbeddings is built with class_dropout_prob=0.1.

    Initialisation follows DiT's adaLN-Zero: the modulation linears and the final projection
    start at zero, so every block starts as the identity and the model predicts eps = 0.
    """
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,  # plain eps prediction (no learned sigma)
        patch_size=2,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_layers=num_layers,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        activation_fn="gelu-approximate",
        attention_bias=True,
        dropout=0.0,
    )
    with torch.no_grad():
        for block in model.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        # DiT's final layer: adaLN modulation (proj_out_1) and the linear (proj_out_2) are zero.
        for lin in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
    return model


def label_embedders(model) -> list:
    """Every diffusers LabelEmbedding in the model (each DiT block has its own)."""
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def disable_builtin_label_dropout(model) -> None:
    """Turn off diffusers' own label dropout (train mode only).

    diffusers drops labels *independently in every block* (each block has its own
    LabelEmbedding, and the output layer reuses block 0's), so one sample would see its class in
    some blocks and the null class in others. We drop labels once per sample in the training
    loop instead. The embedding table keeps its null row (index num_embeds_ada_norm).
    """
    for emb in label_embedders(model):
        emb.dropout_prob = 0.0


# ----------------------------------------------------------------------------------------------
# DiT training
# ----------------------------------------------------------------------------------------------

@dataclass
class DiTTrainConfig:
    # 6 blocks of width 4 x 64 = 256: the size the quantization experiments are designed around.
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    # Measured ~1.7 s/step at batch 64 on one CPU thread; batch 64 gives twice the updates of
    # batch 128 for the same compute, which matters more than gradient noise at this scale.
    batch_size: int = 64
    # Total optimizer steps; ~2,400 steps x 64 = 150k images (~85 passes over the 1,797 digits).
    steps: int = 2400
    # AdamW at 1e-3 trained the hidden-128 variant of this model to 98% class accuracy.
    lr: float = 1e-3
    # Linear warm-up from 0: the zero-initialised adaLN layers make early steps fragile.
    warmup_steps: int = 200
    # No weight decay: tiny model, short run, and the zero-init gates should not be pulled to 0.
    weight_decay: float = 0.0
    # EMA of the weights (half-life ~140 steps); the exported/shipped weights are the EMA.
    ema_decay: float = 0.995
    # Clip the global grad norm: guards against loss spikes at the high-noise end.
    grad_clip: float = 1.0
    # Probability of replacing a label by the null class (10), for classifier-free guidance.
    label_dropout: float = 0.1
    # Random integer shift in pixels; 0 keeps the data distribution exactly (no flips ever).
    max_shift: int = 0
    # DDPM forward process; must match vq4dit.sampling.make_scheduler().
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    # Which split of the digits to train on ("all": generation quality, no held-out need).
    data_split: str = "all"
    # Seeds the init, the batch order, timesteps, noise and label dropout.
    seed: int = 0
    # Write a resumable checkpoint every this many steps (and at the end).
    ckpt_every: int = 100
    # Append a line to the log every this many steps (mean loss over the interval).
    log_every: int = 10

    @classmethod
    def from_dict(cls, d: dict) -> "DiTTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_ddpm_scheduler(cfg: DiTTrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear",
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end)


def dit_loss(model, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, ddpm) -> torch.Tensor:
    """Epsilon-prediction MSE. x0, noise: (N, 1, 16, 16); labels, t: (N,) long -> scalar."""
    xt = ddpm.add_noise(x0, noise, t)  # (N, 1, 16, 16)
    eps = model(xt, timestep=t, class_labels=labels, return_dict=False)[0]  # (N, 1, 16, 16)
    return F.mse_loss(eps, noise)


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


# ---- checkpoints: ckpt-<step>.safetensors (tensors) + ckpt-<step>.json (everything else) -------

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(ckpt_dir: Path, step: int, cfg: DiTTrainConfig, model, ema, opt,
                    gen: torch.Generator, extra: dict, keep: int = 2) -> Path:
    from safetensors.torch import save as st_save

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    stem = f"ckpt-{step:07d}"
    # Tensors first, JSON last: a checkpoint counts only once its JSON exists.
    _atomic_write_bytes(ckpt_dir / f"{stem}.safetensors", st_save(tensors))
    meta = {"step": step, "config": asdict(cfg), "model_config": dict(model.config),
            "opt_param_groups": opt_sd["param_groups"], **extra}
    _atomic_write_bytes(ckpt_dir / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())
    for old in sorted(ckpt_dir.glob("ckpt-*.json"))[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return ckpt_dir / f"{stem}.json"


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint's JSON path, or None."""
    ckpt_dir = Path(ckpt_dir)
    done = [p for p in sorted(ckpt_dir.glob("ckpt-*.json")) if p.with_suffix(".safetensors").exists()]
    return done[-1] if done else None


def _load_checkpoint_tensors(json_path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    meta = json.loads(Path(json_path).read_text())
    return meta, load_file(str(Path(json_path).with_suffix(".safetensors")))


def _sub_state(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _build_from_model_config(model_config: dict):
    from diffusers import DiTTransformer2DModel

    cfg = {k: v for k, v in model_config.items() if not k.startswith("_")}
    return DiTTransformer2DModel.from_config(cfg)


def export_checkpoint(json_path: Path, out_dir: Path) -> Path:
    """Write a checkpoint's EMA weights as a diffusers pipeline dir (transformer/ + scheduler/)."""
    meta, tensors = _load_checkpoint_tensors(json_path)
    ema = _build_from_model_config(meta["model_config"])
    ema.load_state_dict(_sub_state(tensors, "ema."))
    export_model(ema, out_dir, info={"step": meta["step"], "train_config": meta["config"],
                                     "final_loss": meta.get("recent_loss"),
                                     "train_seconds": meta.get("train_seconds")})
    return Path(out_dir)


def export_model(model, out_dir: Path, info: Optional[dict] = None) -> None:
    """fp32 safetensors via save_pretrained, plus the DDIM sampler config and a training info file."""
    from vq4dit.sampling import make_scheduler

    out_dir = Path(out_dir)
    model = copy.deepcopy(model).float().eval()
    model.save_pretrained(out_dir / "transformer", safe_serialization=True)
    make_scheduler().save_pretrained(out_dir / "scheduler")  # DDIM, clip_sample=False
    if info is not None:
        _atomic_write_bytes(out_dir / "training_info.json", json.dumps(info, indent=1, default=str).encode())


def _resume(checkpoint: Path, model, ema, opt, gen: torch.Generator) -> tuple[int, float]:
    """Load model, EMA, optimizer and RNG states from a checkpoint; returns (step, train_seconds)."""
    meta, tensors = _load_checkpoint_tensors(checkpoint)
    model.load_state_dict(_sub_state(tensors, "model."))
    ema.load_state_dict(_sub_state(tensors, "ema."))
    state = {}
    for k, v in _sub_state(tensors, "opt.").items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), float(meta.get("train_seconds", 0.0))


def _draw_batch(x_all, y_all, cfg: DiTTrainConfig, gen: torch.Generator, null_id: int):
    """A training batch: shifted images, labels with dropout to the null class, noise, timesteps."""
    idx = torch.randint(0, len(y_all), (cfg.batch_size,), generator=gen)
    x0 = random_shift(x_all[idx], cfg.max_shift, gen)  # (B, 1, 16, 16)
    labels = y_all[idx].clone()  # (B,)
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
    labels[drop] = null_id
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
    return x0, labels, noise, t


def train_dit(cfg: DiTTrainConfig, ckpt_dir: Optional[Path] = None, out_dir: Optional[Path] = None,
              data: Optional[tuple[torch.Tensor, torch.Tensor]] = None, log_path: Optional[Path] = None,
              verbose: bool = True) -> dict:
    """Train (or resume) the digits DiT. Returns {"model", "ema", "losses", "step"}.

    ckpt_dir: resumable checkpoints (resumes from the newest one found there).
    out_dir: where the EMA model is exported when training reaches cfg.steps.
    data: (images (N,1,16,16), labels (N,)) to train on; default: load_digit_images(cfg.data_split).
    """
    x_all, y_all = data if data is not None else load_digit_images(cfg.data_split, seed=0)
    torch.manual_seed(cfg.seed)
    model = make_digits_dit(cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim)
    disable_builtin_label_dropout(model)
    model.train()
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ddpm = make_ddpm_scheduler(cfg)
    null_id = model.config.num_embeds_ada_norm  # = 10
    gen = torch.Generator().manual_seed(cfg.seed)
    step, train_seconds = 0, 0.0

    resume = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if resume is not None:
        step, train_seconds = _resume(resume, model, ema, opt, gen)
        if verbose:
            print(f"resumed from {resume} at step {step}", flush=True)

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(msg + "\n")

    if step == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"# start {time.strftime('%Y-%m-%d %H:%M:%S')} params={n_params} config={json.dumps(asdict(cfg))}")
    losses: list[float] = []
    window: list[float] = []
    t_window = time.perf_counter()
    while step < cfg.steps:
        t0 = time.perf_counter()
        x0, labels, noise, t = _draw_batch(x_all, y_all, cfg, gen, null_id)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        loss = dit_loss(model, x0, labels, noise, t, ddpm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # EMA warm-up (decay grows from 0.1 to ema_decay) so early exports are usable.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        train_seconds += time.perf_counter() - t0
        losses.append(loss.item())
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            sec = (time.perf_counter() - t_window) / len(window)
            log(f"step {step} loss {np.mean(window):.5f} sec/step {sec:.3f} lr {opt.param_groups[0]['lr']:.2e}")
            window, t_window = [], time.perf_counter()
        if ckpt_dir is not None and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            recent = float(np.mean(losses[-100:]))
            save_checkpoint(Path(ckpt_dir), step, cfg, model, ema, opt, gen,
                            {"recent_loss": recent, "train_seconds": train_seconds})
    if out_dir is not None:
        recent = float(np.mean(losses[-100:])) if losses else None
        export_model(ema, out_dir, info={"step": step, "train_config": asdict(cfg), "final_loss": recent,
                                         "train_seconds": train_seconds})
        log(f"# exported EMA at step {step} to {out_dir}")
    return {"model": model, "ema": ema, "losses": losses, "step": step}


def load_digits_dit(path: Optional[Path] = None):
    """(transformer, scheduler) from a dir written by export_model (default: the shipped one)."""
    from ..io import load_dit

    bundle = load_dit(Path(path) if path is not None else DIGITS_DIT_DIR)
    return bundle.transformer, bundle.scheduler
