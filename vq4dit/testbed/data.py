"""Data: the sklearn digits as 16x16 images in [-1, 1], a fixed train/test split, shifts."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import IMAGE_SIZE, NUM_CLASSES  # noqa: F401  (IMAGE_SIZE documents the output size)

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
