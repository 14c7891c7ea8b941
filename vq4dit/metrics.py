"""Quality metrics: block-output MSE vs FP, image error vs FP and Frechet distances.

Accuracy and FD-digits of the embedded model live with its classifier
(`vq4dit.testbed.classifier.DigitsEvaluator`). `fid()` is the real-model path with Inception
features, used only when Inception weights are available locally.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .trajectories import block_losses, teacher_trajectory
from .sampling import random_labels_and_noise


@torch.no_grad()
def block_mse(student, teacher, n_labels: int = 8, num_steps: int = 10, guidance_scale: float = 4.0,
              seed: int = 1234) -> dict:
    """Mean block-output MSE of student vs teacher along fixed teacher trajectories.

    Uses a seed different from calibration's so it measures held-out trajectories.
    Returns {"mean": float, "per_block": [float, ...]}.
    """
    device = next(teacher.parameters()).device
    student.to(device)
    labels, noise = random_labels_and_noise(teacher, n_labels, torch.Generator().manual_seed(seed), device)
    per_block, count = None, 0
    for x_in, t_in, y_in, targets in teacher_trajectory(teacher, labels, noise, num_steps, guidance_scale):
        losses = torch.stack(block_losses(student, x_in, t_in, y_in, targets)).cpu()
        per_block = losses if per_block is None else per_block + losses
        count += 1
    per_block = (per_block / count).tolist()
    return {"mean": float(np.mean(per_block)), "per_block": per_block}


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2). (N, C, H, W) -> (N,)."""
    mse = ((images.float() - reference.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def image_mse(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((images.float() - reference.float()) ** 2).flatten(1).mean(1)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F)."""
    from scipy import linalg
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set for a Frechet distance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-singular products (few samples) are handled below
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # numerically singular: regularize as pytorch-fid does
            off = np.eye(a.shape[1]) * 1e-6
            covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def fid(real_images: torch.Tensor, fake_images: torch.Tensor, weights: Optional[str] = None) -> float:
    """FID with torchmetrics' Inception network, for real DiT-XL/2 runs.

    Needs the Inception weights locally (FID library downloads are not possible offline): set
    VQ4DIT_INCEPTION_WEIGHTS or pass `weights` (a torch-fidelity 'weights-inception-2015-12-05'
    file). Images are (N, 3, H, W) in [-1, 1].
    """
    weights = weights or os.environ.get("VQ4DIT_INCEPTION_WEIGHTS")
    if not weights or not Path(weights).is_file():
        raise RuntimeError("FID needs local Inception weights: set VQ4DIT_INCEPTION_WEIGHTS to the "
                           "torch-fidelity 'weights-inception-2015-12-05' file (no download is attempted). "
                           "Use FD-digits for the embedded model.")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise RuntimeError("FID needs torchmetrics and torch-fidelity: pip install torchmetrics torch-fidelity") from e
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, normalize=True)
    metric.update(((real_images + 1) / 2).clamp(0, 1), real=True)
    metric.update(((fake_images + 1) / 2).clamp(0, 1), real=False)
    return float(metric.compute())
