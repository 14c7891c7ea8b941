"""Embedded test bed: sklearn digits, a tiny class-conditional DiT, and a digit classifier.

Everything here runs on a CPU in minutes, so the quantization code can be exercised end to
end without downloading DiT-XL/2:

  * data        `load_digit_images`: the 1,797 sklearn 8x8 digits, upsampled to 16x16 in [-1, 1]
  * model       `make_digits_dit`: a diffusers `DiTTransformer2DModel` (hidden 256, 6 blocks)
  * training    `train_dit`: DDPM epsilon-prediction with label dropout for classifier-free guidance
  * classifier  `DigitClassifier`: small CNN used to score samples (accuracy, Frechet distance)

Command line (see `main` at the bottom):

  python -m vq4dit.digits train-classifier
  python -m vq4dit.digits train-dit --out assets/digits-dit --steps N --ckpt-dir checkpoints/digits-dit
  python -m vq4dit.digits train-dit --out assets/digits-dit --ckpt-dir checkpoints/digits-dit --export-from-checkpoint
  python -m vq4dit.digits eval-dit --model assets/digits-dit --grid out/grid.png
"""
from __future__ import annotations

import argparse
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

# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DIGITS_DIT_DIR = ASSETS_DIR / "digits-dit"  # diffusers-style dir: transformer/ + scheduler/
CLASSIFIER_DIR = ASSETS_DIR / "digit-classifier"  # model.safetensors + config.json

NUM_CLASSES = 10
IMAGE_SIZE = 16


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_digit_images(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as (N, 1, 16, 16) float32 in [-1, 1] (background = -1) and (N,) long labels.

    split: "all" (1,797 images), or "train" / "test" of a fixed 80/20 split stratified by class
    (the split depends only on `seed`).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    x = x / 16.0 * 2.0 - 1.0  # [-1, 1]
    # Bilinear interpolation is a convex combination, so the range stays in [-1, 1].
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(-1.0, 1.0)  # (N, 1, 16, 16)
    y = torch.tensor(d.target, dtype=torch.long)  # (N,)
    if split == "all":
        return x, y
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    train_idx, test_idx = digit_split_indices(seed)
    sel = train_idx if split == "train" else test_idx
    return x[sel], y[sel]


def digit_split_indices(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices into load_digits() of the 80/20 class-stratified (train, test) split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(np.arange(len(target)), test_size=0.2, stratify=target,
                                           random_state=seed)
    return torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(test_idx))


def random_shift(x: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image by a random integer offset in [-max_shift, max_shift]^2, filling with -1.

    x: (N, C, H, W) -> (N, C, H, W). No flips: a mirrored digit is a different (or no) digit.
    """
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (N, H)
    cols = dx[:, None] + torch.arange(w)  # (N, W)
    out = p[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        meta, tensors = _load_checkpoint_tensors(resume)
        model.load_state_dict(_sub_state(tensors, "model."))
        ema.load_state_dict(_sub_state(tensors, "ema."))
        state = {}
        for k, v in _sub_state(tensors, "opt.").items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        step, train_seconds = int(meta["step"]), float(meta.get("train_seconds", 0.0))
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
        idx = torch.randint(0, len(y_all), (cfg.batch_size,), generator=gen)
        x0 = random_shift(x_all[idx], cfg.max_shift, gen)  # (B, 1, 16, 16)
        labels = y_all[idx].clone()  # (B,)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        labels[drop] = null_id
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
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
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    path = Path(path) if path is not None else DIGITS_DIT_DIR
    model = DiTTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch.float32).eval()
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    return model, scheduler


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """Small CNN on (N, 1, 16, 16) inputs in [-1, 1].

    conv(1->c1) conv(c1->c1) pool -> conv(c1->c2) conv(c2->c2) pool -> fc(16*c2 -> F) -> fc(F -> 10).
    `features` is the F-dim ReLU output of the first fc (for Frechet distances).
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "feature_dim": feature_dim, "dropout": dropout}

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(conv(1, c1), conv(c1, c1), nn.MaxPool2d(2),  # (N, c1, 8, 8)
                                  conv(c1, c2), conv(c2, c2), nn.MaxPool2d(2))  # (N, c2, 4, 4)
        self.fc = nn.Linear(c2 * 16, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) -> (N, feature_dim)."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) -> logits (N, 10)."""
        return self.head(self.drop(self.features(x)))


@dataclass
class ClassifierTrainConfig:
    # Width of the two conv stages; plenty for 16x16 digits.
    channels: tuple[int, int] = (32, 64)
    # Penultimate feature size used for Frechet distances.
    feature_dim: int = 128
    # Dropout before the last layer: 1,437 training images overfit quickly without it.
    dropout: float = 0.3
    # ~1,200 steps at batch 64; converges well before that.
    epochs: int = 50
    batch_size: int = 64
    # Adam with cosine decay to 0.
    lr: float = 2e-3
    # Random shifts of up to 1 px: generated digits are not always perfectly centred.
    max_shift: int = 1
    # Gaussian pixel noise std (applied to half of each batch): robustness to sampling artefacts.
    noise_std: float = 0.15
    # Seeds the init, the split (0 = the standard split) and the augmentation.
    seed: int = 0


def train_classifier(cfg: ClassifierTrainConfig = ClassifierTrainConfig(), out_dir: Optional[Path] = None,
                     verbose: bool = True) -> tuple[DigitClassifier, float]:
    """Train on the train split, report held-out test accuracy; save if out_dir is given."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_tr, y_tr = load_digit_images("train", seed=0)
    x_te, y_te = load_digit_images("test", seed=0)
    clf = DigitClassifier(tuple(cfg.channels), cfg.feature_dim, cfg.dropout)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    steps_per_epoch = (len(y_tr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    for epoch in range(cfg.epochs):
        clf.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = random_shift(x_tr[idx], cfg.max_shift, gen)
            noisy = (torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5).float()
            x = (x + noisy * cfg.noise_std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(clf(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            acc = classifier_accuracy(clf, x_te, y_te)
            print(f"epoch {epoch + 1} loss {loss.item():.4f} test acc {acc:.4f}", flush=True)
    clf.eval()
    acc = classifier_accuracy(clf, x_te, y_te)
    if out_dir is not None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out_dir / "model.safetensors"))
        cfg_out = {"architecture": clf.config, "test_accuracy": acc, "n_test": len(y_te), "seed": cfg.seed,
                   "split": "sklearn load_digits, 80/20 stratified, seed 0", "train_config": asdict(cfg)}
        (out_dir / "config.json").write_text(json.dumps(cfg_out, indent=1))
    return clf, acc


@torch.no_grad()
def classifier_accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = clf.training
    clf.eval()
    pred = clf(images).argmax(1)
    clf.train(was_training)
    return float((pred == labels).float().mean())


def load_classifier(path: Optional[Path] = None) -> DigitClassifier:
    """The shipped classifier (or one saved by train_classifier at `path`), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_DIR
    arch = json.loads((path / "config.json").read_text())["architecture"]
    clf = DigitClassifier(tuple(arch["channels"]), arch["feature_dim"], arch["dropout"])
    clf.load_state_dict(load_file(str(path / "model.safetensors")))
    return clf.eval()


# ----------------------------------------------------------------------------------------------
# Evaluation of a digits DiT
# ----------------------------------------------------------------------------------------------

def image_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 2):
    """(N, 1, H, W) in [-1, 1] -> PIL image, `nrow` images per row, upscaled `scale`x (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    ncol_rows = (n + nrow - 1) // nrow
    x = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, H, W)
    x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (N, sH, sW)
    hs, ws = h * scale, w * scale
    canvas = torch.full((ncol_rows * (hs + pad) + pad, nrow * (ws + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (hs + pad):pad + r * (hs + pad) + hs, pad + c * (ws + pad):pad + c * (ws + pad) + ws] = x[i]
    return Image.fromarray(canvas.numpy(), mode="L")


def evaluate_dit(transformer, scheduler=None, classifier: Optional[nn.Module] = None,
                 per_class: int = 20, cfgs: tuple[float, ...] = (1.0, 4.0), num_steps: int = 50,
                 seed: int = 0, batch: int = 100) -> dict:
    """Sample per_class images per class at each guidance scale and classify them.

    Returns {cfg: {"accuracy": float, "per_class": [10 floats], "images": (N,1,16,16), "labels": (N,)}}.
    """
    from vq4dit.sampling import sample

    classifier = classifier if classifier is not None else load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)  # (10*per_class,) 0,0,..,1,1,..
    results = {}
    for g in cfgs:
        chunks = []
        for i in range(0, len(labels), batch):
            chunks.append(sample(transformer, labels[i:i + batch], num_steps=num_steps, guidance_scale=g,
                                 seed=seed + i, scheduler=scheduler))
        images = torch.cat(chunks)  # (N, 1, 16, 16)
        with torch.no_grad():
            pred = classifier(images).argmax(1)
        correct = (pred == labels).float()
        results[g] = {"accuracy": float(correct.mean()),
                      "per_class": correct.view(NUM_CLASSES, per_class).mean(1).tolist(),
                      "images": images, "labels": labels}
    return results


def _eval_grid(results: dict, per_class: int, ncols: int = 10):
    """Side-by-side panels (one per guidance scale) of 10 rows (classes) x ncols samples."""
    from PIL import Image, ImageDraw

    panels = []
    for g, r in results.items():
        k = min(ncols, per_class)
        imgs = r["images"].view(NUM_CLASSES, per_class, 1, IMAGE_SIZE, IMAGE_SIZE)[:, :k].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        grid = image_grid(imgs, nrow=k)
        panel = Image.new("L", (grid.width, grid.height + 16), 255)
        panel.paste(grid, (0, 16))
        ImageDraw.Draw(panel).text((4, 2), f"CFG {g:g}: acc {r['accuracy']:.1%}", fill=0)
        panels.append(panel)
    out = Image.new("L", (sum(p.width for p in panels) + 12 * (len(panels) - 1), panels[0].height), 255)
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 12
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vq4dit.digits", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train-dit", help="train (or resume / export) the digits DiT")
    p.add_argument("--out", type=Path, default=DIGITS_DIT_DIR)
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/digits-dit"))
    p.add_argument("--steps", type=int, default=DiTTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=DiTTrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=DiTTrainConfig.seed)
    p.add_argument("--export-from-checkpoint", action="store_true",
                   help="only export the newest checkpoint's EMA weights to --out, no training")

    p = sub.add_parser("train-classifier", help="train the digit classifier and save it")
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval-dit", help="sample, classify, print accuracy per CFG, save a grid")
    p.add_argument("--model", type=Path, default=DIGITS_DIT_DIR)
    p.add_argument("--classifier", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, default=None, help="PNG path for the sample grid")

    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.cmd == "train-dit":
        if args.export_from_checkpoint:
            ck = latest_checkpoint(args.ckpt_dir)
            if ck is None:
                raise SystemExit(f"no checkpoint in {args.ckpt_dir}")
            export_checkpoint(ck, args.out)
            print(f"exported EMA weights of {ck} to {args.out}")
            return
        args.ckpt_dir.mkdir(parents=True, exist_ok=True)
        ck = latest_checkpoint(args.ckpt_dir)
        if ck is not None:  # keep the run's config; only the step target may change
            cfg = DiTTrainConfig.from_dict(json.loads(ck.read_text())["config"])
            cfg.steps = args.steps
        else:
            cfg = DiTTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        t0 = time.time()
        train_dit(cfg, ckpt_dir=args.ckpt_dir, out_dir=args.out, log_path=args.ckpt_dir / "train.log")
        print(f"done in {time.time() - t0:.0f} s")
    elif args.cmd == "train-classifier":
        t0 = time.time()
        _, acc = train_classifier(ClassifierTrainConfig(seed=args.seed), out_dir=args.out)
        print(f"test accuracy {acc:.4f} ({time.time() - t0:.0f} s); saved to {args.out}")
    elif args.cmd == "eval-dit":
        model, scheduler = load_digits_dit(args.model)
        clf = load_classifier(args.classifier)
        t0 = time.time()
        res = evaluate_dit(model, scheduler, clf, per_class=args.per_class, cfgs=tuple(args.cfg),
                           num_steps=args.num_steps, seed=args.seed)
        for g, r in res.items():
            pc = " ".join(f"{a:.2f}" for a in r["per_class"])
            print(f"CFG {g:g}: accuracy {r['accuracy']:.4f}  per class [{pc}]")
        print(f"({time.time() - t0:.0f} s for {len(res) * NUM_CLASSES * args.per_class} samples)")
        if args.grid is not None:
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            _eval_grid(res, args.per_class).save(args.grid)
            print(f"grid saved to {args.grid}")


if __name__ == "__main__":
    main()
