"""K-means codebooks (spec step 1): chunked nearest-codeword search, Lloyd with Hamerly bounds,
k-means++ seeding, and an on-disk cache keyed by the exact data and settings.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

from .config import KMEANS_POINTS_PER_CODEWORD
from .fs import atomic_file

_PACKED_INDEX_BITS = 8  # k <= 256: the index rides in the low mantissa bits (distance kept to 2^-15)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 4096, w: Optional[torch.Tensor] = None,
             second: bool = False):
    """Nearest codeword for each row of x (S, d), in chunks of `chunk` rows, so memory stays
    O(chunk * k) however many rows x has. Returns the indices (S,), or with second=True
    (indices, distance to the nearest, distance to the second nearest).

    With per-row coordinate weights w (S, d) the distance is sum_i w_i (x_i - c_i)^2. Squared
    distances come from one matmul into a reused buffer: [x, |x|^2, 1] @ [-2c, 1, |c|^2]^T, or
    [w, -2 w x, sum w x^2] @ [c^2, c, 1]^T when weighted. For k <= 256 the codeword index is
    written into the 8 low mantissa bits of each (non-negative) squared distance, so one vectorised
    integer min gives distance and index together (~2.5x faster than argmin, measured on CPU); ties
    closer than a relative 2^-15 go to the lower index."""
    s, d = x.shape
    k = c.shape[0]
    c = c.float()
    ones = torch.ones(k, 1, device=c.device)
    if w is None:
        c_aug = torch.cat([-2 * c, ones, c.pow(2).sum(1, keepdim=True)], 1).T.contiguous()  # (d+2, k)
    else:
        c_aug = torch.cat([c.pow(2), c, ones], 1).T.contiguous()                             # (2d+1, k)
    packed = k <= 1 << _PACKED_INDEX_BITS
    low = (1 << _PACKED_INDEX_BITS) - 1
    ids = torch.arange(k, dtype=torch.int32, device=x.device)
    buf = torch.empty(min(chunk, s), k, device=x.device)
    out = torch.empty(s, dtype=torch.long, device=x.device)
    d1 = torch.empty(s, device=x.device) if second else None
    d2 = torch.empty(s, device=x.device) if second else None
    for a in range(0, s, chunk):
        xs = x[a:a + chunk].float()
        if w is None:
            x_aug = torch.cat([xs, xs.pow(2).sum(1, keepdim=True), torch.ones(len(xs), 1, device=x.device)], 1)
        else:
            ws = w[a:a + chunk].float()
            wx = ws * xs
            x_aug = torch.cat([ws, -2 * wx, (wx * xs).sum(1, keepdim=True)], 1)
        dist = torch.mm(x_aug, c_aug, out=buf[:len(xs)]).clamp_min_(0)   # (chunk, k) squared distances
        if packed:
            key = dist.view(torch.int32).bitwise_and_(~low).bitwise_or_(ids)
            best = key.amin(1)                                             # (chunk,)
            out[a:a + chunk] = best.bitwise_and(low)
            if second:
                d1[a:a + chunk] = best.view(torch.float32)
                d2[a:a + chunk] = key.masked_fill_(key == best[:, None], torch.iinfo(torch.int32).max
                                                   ).amin(1).view(torch.float32)
        elif second:
            v, i = dist.topk(2, dim=1, largest=False)
            out[a:a + chunk], d1[a:a + chunk], d2[a:a + chunk] = i[:, 0], v[:, 0], v[:, 1]
        else:
            out[a:a + chunk] = dist.argmin(1)
    if second:
        return out, d1.clamp_min_(0).sqrt_(), d2.clamp_min_(0).sqrt_()
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-4,
           weights: Optional[torch.Tensor] = None,
           points_per_codeword: Optional[int] = KMEANS_POINTS_PER_CODEWORD) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ init. x: (S, d) -> codebook (k, d), assignment (S,).

    The codebook is trained on a seeded random subsample of k * points_per_codeword rows (faiss'
    rule; None = all rows), then every row is assigned to its nearest codeword in one chunked pass.
    Stops early when the squared centroid shift falls below tol * mean feature variance
    (scikit-learn's criterion). `weights` (S, d) > 0 make it weighted k-means (GPTVQ-style
    activation-aware init: distances and centroids weighted per coordinate).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = x.shape[0]
    if s < k:
        raise ValueError(f"{s} sub-vectors is fewer than k={k} codewords")
    train, w_train = x, weights
    if points_per_codeword is not None and s > k * points_per_codeword:
        rows = torch.randperm(s, generator=g)[: k * points_per_codeword].to(x.device)
        train = x[rows]
        w_train = weights[rows] if weights is not None else None
    c = _lloyd(train.float(), k, iters, g, tol, w_train.float() if w_train is not None else None)
    return c, _nearest(x, c, w=weights)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a subsample of at most 20,000 rows (keeps init O(k * 20k))."""
    pool = x[torch.randperm(x.shape[0], generator=g)[: min(x.shape[0], 20000)].to(x.device)]
    first = pool[torch.randint(len(pool), (1,), generator=g).item()]
    centers = [first]
    d2 = (pool - first).pow(2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1 / len(d2))
        j = torch.multinomial(probs.cpu(), 1, generator=g).item()
        centers.append(pool[j])
        d2 = torch.minimum(d2, (pool - pool[j]).pow(2).sum(1))
    return torch.stack(centers)  # (k, d)


def _lloyd(x: torch.Tensor, k: int, iters: int, g: torch.Generator, tol: float,
           w: Optional[torch.Tensor]) -> torch.Tensor:
    """Lloyd iterations from k-means++ seeds; returns the codebook (k, d).

    Plain distances use Hamerly's bounds: a row is re-assigned only when its distance to its own
    codeword (upper bound u, grown by that codeword's shift) may exceed its distance to any other
    (lower bound l, shrunk by the largest shift) or half the gap to the nearest other codeword, so
    results are Lloyd's while late iterations touch only the few rows near a boundary."""
    s = x.shape[0]
    c = _kmeans_pp(x, k, g)
    threshold = tol * x.var(0).mean()
    ones = torch.ones(s, device=x.device)
    if w is None:
        assign, upper, lower = _nearest(x, c, second=True)
    else:
        assign = _nearest(x, c, w=w)
    for it in range(iters):
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, ones)
        if w is None:
            new_c = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp_min(1)[:, None]
        else:
            wsum = torch.zeros_like(c).index_add_(0, assign, w)
            new_c = torch.zeros_like(c).index_add_(0, assign, w * x) / wsum.clamp_min(1e-30)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at random points
            new_c[empty] = x[torch.randint(s, (int(empty.sum()),), generator=g).to(x.device)]
        moved = (new_c - c).pow(2).sum(1)                                  # (k,)
        c = new_c
        if moved.sum() <= threshold or it == iters - 1:
            break
        if w is not None:
            assign = _nearest(x, c, w=w)
            continue
        # Hamerly bounds: u grows by the own codeword's move, l shrinks by the largest other move
        step = moved.sqrt()
        top2 = step.topk(min(2, k)).values
        upper += step[assign]
        lower -= torch.where(assign == step.argmax(), top2[-1], top2[0])
        gaps = torch.cdist(c, c).fill_diagonal_(float("inf")).min(1).values / 2   # (k,)
        bound = torch.maximum(gaps[assign], lower)
        slack = 1e-4 * (upper + bound)  # distance rounding (2^-15 packed): re-check near-ties
        check = (upper + slack > bound).nonzero().squeeze(1)
        if len(check):
            upper[check] = (x[check] - c[assign[check]]).pow(2).sum(1).sqrt()
            check = check[upper[check] + slack[check] > bound[check]]
        if len(check):
            assign[check], upper[check], lower[check] = _nearest(x[check], c, second=True)
    return c


def kmeans_cache_dir() -> Optional[Path]:
    """$VQ4DIT_CACHE (default ~/.cache/vq4dit); set VQ4DIT_CACHE=off to disable."""
    v = os.environ.get("VQ4DIT_CACHE", str(Path.home() / ".cache" / "vq4dit"))
    return None if v.lower() in ("", "0", "off", "none") else Path(v) / "kmeans"


def kmeans_cached(x: torch.Tensor, k: int, iters: int, seed: int, weights: Optional[torch.Tensor] = None,
                  points_per_codeword: Optional[int] = KMEANS_POINTS_PER_CODEWORD) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means keyed by the exact data and settings (subsampling included): re-quantizing the same
    model is instant."""
    root = kmeans_cache_dir()
    if root is None:
        return kmeans(x, k, iters, seed, weights=weights, points_per_codeword=points_per_codeword)
    from safetensors.torch import save_file
    h = hashlib.sha1(x.detach().cpu().numpy().tobytes())
    h.update(f"{k}/{iters}/{seed}/{x.shape}/ppc={points_per_codeword}".encode())
    if weights is not None:
        h.update(weights.detach().float().cpu().numpy().tobytes())
    f = root / f"{h.hexdigest()}.safetensors"
    if f.is_file():
        hit = _read_kmeans_entry(f, x.shape[0], k, x.shape[1])
        if hit is not None:
            return hit[0].to(x.device), hit[1].to(x.device)
        # corrupt, tampered or unreadable entry: recompute and overwrite
    c, a = kmeans(x, k, iters, seed, weights=weights, points_per_codeword=points_per_codeword)
    try:
        root.mkdir(parents=True, exist_ok=True)
        c_cpu, a_cpu = c.cpu().contiguous(), a.cpu().contiguous()
        with atomic_file(f) as tmp:
            save_file({"codebook": c_cpu, "assignment": a_cpu}, str(tmp),
                      metadata={"sha256": _kmeans_digest(c_cpu, a_cpu)})
    except OSError:
        pass  # a read-only cache is not an error
    return c, a


def _kmeans_digest(codebook: torch.Tensor, assignment: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (codebook, assignment):
        h.update(f"{t.dtype}/{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_kmeans_entry(f: Path, s: int, k: int, d: int):
    """(codebook, assignment) of a cache entry, or None unless shape, dtype, finiteness, index range
    and the stored sha256 of its content all check out."""
    from safetensors import safe_open
    try:
        with safe_open(str(f), framework="pt") as fh:
            digest = (fh.metadata() or {}).get("sha256")
            c, a = fh.get_tensor("codebook"), fh.get_tensor("assignment")
    except Exception:
        return None
    if (digest is None or tuple(c.shape) != (k, d) or c.dtype != torch.float32 or tuple(a.shape) != (s,)
            or a.dtype != torch.long or not torch.isfinite(c).all()
            or (s and (int(a.min()) < 0 or int(a.max()) >= k)) or _kmeans_digest(c, a) != digest):
        return None
    return c, a


def sq_dists(x: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    # (S, d), (k, d) -> (S, k) squared Euclidean distances (weighted per coordinate by w (S, d))
    if w is None:
        return torch.addmm(c.pow(2).sum(1), x, c.T, alpha=-2).add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0)
    return torch.addmm(w @ c.pow(2).T, w * x, c.T, alpha=-2).add_((w * x * x).sum(1, keepdim=True)).clamp_min_(0)

