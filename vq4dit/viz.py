"""Image helpers (no plotting library): grids for the CLI, the benchmark and the app."""
from __future__ import annotations

import os
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


# The image formats `save_grid` writes, by file extension (the bytes always match the name).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def image_format(path) -> str:
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"--out {path}: unknown image format {Path(path).suffix or '(no extension)'!r}: "
                         f"name the file {' / '.join(IMAGE_FORMATS)}")
    return fmt


def check_image_out(path, overwrite: bool = False, protect=()) -> str:
    """Before any work: `path` names a known image format, is not inside an input model directory
    (`protect`), is not a link or a directory, and exists only with overwrite=True. Returns the format."""
    path = Path(path)
    r = Path(os.path.abspath(path)).parent.resolve() / path.name
    for p in protect:
        if p is not None and Path(p).exists():
            pr = Path(p).resolve()
            if r == pr or pr in r.parents:
                raise FileExistsError(f"refusing to write {path}: it is inside the model directory {p}; "
                                      f"write the image somewhere else")
    fmt = image_format(path)
    if path.is_symlink():
        raise FileExistsError(f"refusing to write {path}: it is a symbolic link")
    if path.is_dir():
        raise FileExistsError(f"--out {path} is a directory: give an image file path such as grid.png")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite to replace it, or pick another name")
    return fmt


def save_grid(images: torch.Tensor, path, nrow: int = 10, scale: int = 0, overwrite: bool = True):
    """Write an image grid atomically, in the format the extension names (PNG, JPEG, WEBP, BMP).
    scale=0 picks one that makes small images visible (>= 64 px). overwrite=False never replaces a
    file that appeared meanwhile (the temp file is linked into place, which fails if the name exists)."""
    from PIL import Image
    fmt = image_format(path)
    h = images.shape[-1]
    scale = scale or max(1, 64 // h)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(make_grid(images, nrow=nrow, scale=scale))
    if overwrite and path.is_symlink():
        raise FileExistsError(f"refusing to write {path}: it is a symbolic link")
    try:
        with atomic_file(path, overwrite=overwrite) as tmp:
            grid.save(tmp, format=fmt)
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while sampling: not replaced (pass --overwrite)") from None
