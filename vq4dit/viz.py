"""Image helpers (no plotting library): grids for the CLI, the benchmark and the app."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .fs import atomic_file


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int = 10, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images into one (H, W, 3) uint8 array, each image upscaled by `scale` (nearest)."""
    x = to_uint8(images)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = x.shape
    ncol = max(1, min(nrow, n))
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return grid


def save_grid(images: torch.Tensor, path, nrow: int = 10, scale: int = 0):
    """Write a PNG grid atomically. scale=0 picks one that makes small images visible (>= 64 px)."""
    from PIL import Image
    h = images.shape[-1]
    scale = scale or max(1, 64 // h)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # no half-written PNG, no temp file left behind
        Image.fromarray(make_grid(images, nrow=nrow, scale=scale)).save(tmp, format="PNG")
