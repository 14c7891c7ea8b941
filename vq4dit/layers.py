"""Quantized layers and k-means: the paper's per-layer concepts, 1:1.

  k-means codebook ........ `kmeans()`                       (spec step 1)
  candidate set ........... `VQLinear.init_soft()`           (step 2)
  assignment ratios ....... `VQLinear.assignment_ratios()`   (step 3)
  L_r regularizer ......... `VQLinear.ratio_regularizer()`   (step 4)
  progressive freezing .... `VQLinear.freeze_confident()`    (step 7)
  hard switch ............. `VQLinear.make_hard()`           (step 7)
  storage ................. `storage_bits()`                 (what a packed layer costs)
Calibration (steps 5-6) lives in `calibrate.py`; the in-place entry point in `quant_api.py`.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import KMEANS_POINTS_PER_CODEWORD, RTNConfig, VQConfig, index_bits

# ----------------------------------------------------------------------------------------
# Which layers: every nn.Linear inside the transformer blocks except the embedders
# ----------------------------------------------------------------------------------------

# Layer kinds inside a DiT block (diffusers names): one heatmap column per kind in the app.
LAYER_KINDS = {
    "q": r"attn\d*\.to_q$",
    "k": r"attn\d*\.to_k$",
    "v": r"attn\d*\.to_v$",
    "out": r"attn\d*\.to_out\.0$",
    "fc1": r"ff\.net\.0\.proj$",
    "fc2": r"ff\.net\.2$",
    "adaLN": r"norm1\.linear$",
}


def layer_kind(name: str) -> str:
    """'transformer_blocks.3.attn1.to_q' -> 'q'; unknown layers keep their last name part."""
    for kind, pattern in LAYER_KINDS.items():
        if re.search(pattern, name):
            return kind
    return name.rsplit(".", 1)[-1]


def layer_type(name: str) -> str:
    """Coarser grouping for reports: q, k and v are one type ('qkv')."""
    kind = layer_kind(name)
    return "qkv" if kind in ("q", "k", "v") else kind if kind in LAYER_KINDS else "other"


def block_index(name: str) -> int:
    m = re.search(r"transformer_blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Target Linears inside `transformer_blocks`, skipping the timestep/label embedders."""
    return (isinstance(module, nn.Linear) and fqn.startswith("transformer_blocks.")
            and ".emb." not in fqn)


# ----------------------------------------------------------------------------------------
# K-means (spec step 1)
# ----------------------------------------------------------------------------------------

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
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        c_cpu, a_cpu = c.cpu().contiguous(), a.cpu().contiguous()
        save_file({"codebook": c_cpu, "assignment": a_cpu}, str(tmp),
                  metadata={"sha256": _kmeans_digest(c_cpu, a_cpu)})
        os.replace(tmp, f)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache is not an error
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


def _sq_dists(x: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    # (S, d), (k, d) -> (S, k) squared Euclidean distances (weighted per coordinate by w (S, d))
    if w is None:
        return torch.addmm(c.pow(2).sum(1), x, c.T, alpha=-2).add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0)
    return torch.addmm(w @ c.pow(2).T, w * x, c.T, alpha=-2).add_((w * x * x).sum(1, keepdim=True)).clamp_min_(0)


# ----------------------------------------------------------------------------------------
# Quantized layers
# ----------------------------------------------------------------------------------------

def ratio_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over candidates (S, n). For the paper's n = 2 it is a sigmoid of the
    logit difference: the same values, ~10x faster on CPU than a softmax over a dim of size 2."""
    if logits.shape[1] == 2:
        p = torch.sigmoid((logits[:, :1] - logits[:, 1:]) / temperature)  # (S, 1)
        return torch.cat([p, 1 - p], 1)
    return torch.softmax(logits / temperature, dim=1)


class VQLinear(nn.Module):
    """Linear layer whose weight is rebuilt from a codebook.

    W (out, in) is cut row-wise into S = out*in/d sub-vectors of length d. Soft phase:
    w_hat_j = sum_i r_ji * C[cand_ji] with r_j = softmax(logits_j); frozen sub-vectors use a
    one-hot r_j. Hard phase: w_hat_j = C[assignment_j].
    """

    def __init__(self, in_features: int, out_features: int, k: int, d: int, n_candidates: int = 2,
                 bias: bool = True, name: str = "", codebook_dtype: str = "float16"):
        super().__init__()
        if in_features % d:
            raise ValueError(f"layer {name or '?'}: in_features={in_features} is not divisible by d={d}")
        self.in_features, self.out_features, self.k, self.d = in_features, out_features, k, d
        self.n_candidates, self.name, self.codebook_dtype = n_candidates, name, codebook_dtype
        s = out_features * in_features // d
        self.codebook = nn.Parameter(torch.zeros(k, d))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("assignment", torch.zeros(s, dtype=torch.long))         # hard index
        self.register_buffer("kmeans_assignment", torch.zeros(s, dtype=torch.long))  # for "changed" stats
        self.candidates: Optional[torch.Tensor] = None  # (S, n) codeword ids, soft phase only
        self.logits: Optional[nn.Parameter] = None      # (S, n) assignment logits
        self.frozen_mask: Optional[torch.Tensor] = None  # (S,) bool
        self.hard = True
        self.hard_forward = False  # straight-through soft phase (CalibConfig.hard_forward)
        self.input_power: Optional[torch.Tensor] = None  # (in,) E[x^2], activation-aware distances
        self.temperature = 1.0     # softmax temperature of the ratios (1 = paper; annealed by vq4dit-anneal)
        self.record_weight_grad = False
        self.last_weight: Optional[torch.Tensor] = None  # w_hat of the last forward, for conflict stats

    @property
    def num_subvectors(self) -> int:
        return self.assignment.numel()

    @property
    def index_bits(self) -> int:
        return index_bits(self.k)

    def subvector_weights(self, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
        """(S, d) per-coordinate distance weights from the input power, or None (plain distances)."""
        if self.input_power is None:
            return None
        w = self.input_power.view(1, -1, self.d).expand(self.out_features, -1, -1).reshape(-1, self.d)
        return w if rows is None else w[rows]

    def storage_bits(self) -> dict:
        return storage_bits(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: VQConfig, name: str = "", seed: int = 0,
                    input_power: Optional[torch.Tensor] = None) -> "VQLinear":
        """k-means init from a Linear. `input_power` (in,) = E[x_i^2] of the layer input makes the
        k-means and the candidate distances activation-aware (VQConfig.activation_aware)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, cfg.k, cfg.d, cfg.n_candidates,
                linear.bias is not None, name, cfg.codebook_dtype).to(w.device)
        x = w.float().reshape(-1, cfg.d)  # (S, d)
        if input_power is not None:
            q.input_power = (input_power / input_power.mean().clamp_min(1e-30)).float().to(w.device)
        codebook, assign = kmeans_cached(x, cfg.k, cfg.kmeans_iters, seed, q.subvector_weights(),
                                         cfg.kmeans_points_per_codeword)
        with torch.no_grad():
            q.codebook.copy_(codebook)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        q.assignment.copy_(assign)
        q.kmeans_assignment.copy_(assign)
        q.round_codebook()
        return q

    # -- soft assignment ratios (spec steps 2-3) --------------------------------------------
    def init_soft(self, weight: torch.Tensor):
        """Candidate set = n nearest codewords of each original sub-vector; logits from distances."""
        x = weight.detach().float().reshape(-1, self.d).to(self.codebook.device)
        n = self.n_candidates
        cands, dists = [], []
        for s in range(0, x.shape[0], 1 << 16):
            d2 = _sq_dists(x[s:s + (1 << 16)], self.codebook.detach(),
                           self.subvector_weights(slice(s, s + (1 << 16))))  # (chunk, k)
            own = self.assignment[s:s + (1 << 16), None]
            true_own = d2.gather(1, own)
            d2.scatter_(1, own, -1.0)  # the k-means codeword is always candidate 0 (ties, fp16)
            v, i = d2.topk(n, dim=1, largest=False)  # nearest first
            v[:, :1] = true_own
            cands.append(i)
            dists.append(v.clamp_min(0).sqrt())
        self.candidates = torch.cat(cands)     # (S, n)
        dist = torch.cat(dists)                # (S, n)
        logits = torch.zeros_like(dist)
        # logit_i = log(dist_last / (dist_i + 1e-5)) for i < n-1, logit_last = 0
        logits[:, :-1] = torch.log((dist[:, -1:] + 1e-12) / (dist[:, :-1] + 1e-5))
        self.logits = nn.Parameter(logits)
        self.frozen_mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.hard = False
        self.assignment.copy_(self.candidates[:, 0])

    def assignment_ratios(self) -> torch.Tensor:
        """(S, n) ratios over candidates; frozen sub-vectors are one-hot at their top candidate."""
        r = ratio_softmax(self.logits, self.temperature)
        if self.frozen_mask.any():
            onehot = F.one_hot(self.logits.detach().argmax(1), self.n_candidates).to(r.dtype)
            r = torch.where(self.frozen_mask[:, None], onehot, r)
        return r

    def ratio_regularizer(self) -> torch.Tensor:
        """L_r = n * mean(r * (1 - r)) over the sub-vectors still soft (0 when hard)."""
        if self.hard:
            return self.codebook.new_zeros(())
        soft = ~self.frozen_mask
        if not soft.any():
            return self.codebook.new_zeros(())
        if self.n_candidates == 2:  # r = (p, 1-p): both entries of r(1-r) equal p(1-p); masked mean, no gather
            p = torch.sigmoid((self.logits[:, 0] - self.logits[:, 1]) / self.temperature)
            return 2 * (p * (1 - p) * soft).sum() / soft.sum()
        r = ratio_softmax(self.logits[soft], self.temperature)
        return self.n_candidates * (r * (1 - r)).mean()

    def current_assignment(self) -> torch.Tensor:
        """(S,) codeword each sub-vector uses now (top candidate while soft)."""
        if self.hard:
            return self.assignment
        if self.n_candidates == 2:  # argmax of two logits (ties -> candidate 0, like argmax)
            second = self.logits.detach()[:, 1] > self.logits.detach()[:, 0]
            return torch.where(second, self.candidates[:, 1], self.candidates[:, 0])
        return self.candidates.gather(1, self.logits.detach().argmax(1, keepdim=True)).squeeze(1)

    def top_ratio(self) -> torch.Tensor:
        if self.hard:
            return torch.ones(self.num_subvectors, device=self.assignment.device)
        return self.assignment_ratios().detach().max(1).values

    # -- progressive freezing (spec step 7) ---------------------------------------------------
    @torch.no_grad()
    def freeze_confident(self, freeze_threshold: float, hard_threshold: float) -> bool:
        """Freeze sub-vectors whose top ratio > threshold; go hard when enough are frozen.
        Returns True if the layer switched to hard assignments now."""
        if self.hard:
            return False
        r = ratio_softmax(self.logits, self.temperature)
        self.frozen_mask |= r.max(1).values > freeze_threshold
        # float64 share: in float32, 99/100 frozen reads 0.99000001 > 0.99 and switches too early
        if self.frozen_mask.double().mean().item() > hard_threshold:
            self.make_hard()
            return True
        return False

    @torch.no_grad()
    def commit_most_confident(self, target_share: float, hard_threshold: float) -> bool:
        """Incremental commitment (ViM-VQ style): freeze the most confident soft sub-vectors until
        `target_share` of the layer is frozen. Returns True if the layer switched to hard now."""
        if self.hard:
            return False
        need = int(round(target_share * self.num_subvectors)) - int(self.frozen_mask.sum())
        if need > 0:
            top = ratio_softmax(self.logits, self.temperature).max(1).values
            top[self.frozen_mask] = -1.0
            self.frozen_mask[top.topk(min(need, int((~self.frozen_mask).sum()))).indices] = True
        if self.frozen_mask.double().mean().item() > hard_threshold:
            self.make_hard()
            return True
        return False

    @torch.no_grad()
    def repick(self, weight: torch.Tensor, hessian: torch.Tensor, n_candidates: int = 4, sweeps: int = 2) -> float:
        """Discrete finishing pass (PV-tuning style), codebook fixed: greedily re-pick each
        sub-vector's codeword among its `n_candidates` nearest to lower the layer's output error
        tr((W_hat - W) H (W_hat - W)^T), H = E[x x^T] of the layer input. Returns the share changed."""
        assert self.hard, "repick runs on hard layers (after calibration)"
        out_f, in_f, d = self.out_features, self.in_features, self.d
        w = weight.detach().float().to(self.codebook.device)                 # (out, in)
        h = hessian.float().to(self.codebook.device)                          # (in, in)
        cb = self.codebook.detach()
        assign = self.assignment.view(out_f, in_f // d).clone()               # (out, in/d)
        cand = _sq_dists(w.reshape(-1, d), cb).topk(min(n_candidates, self.k), dim=1, largest=False).indices
        cand = cand.view(out_f, in_f // d, -1)                                # (out, in/d, m)
        w_hat = cb[assign].reshape(out_f, in_f)
        err = w_hat - w                                                       # (out, in)
        before = assign.clone()
        for _ in range(sweeps):
            for b in range(in_f // d):
                cols = slice(b * d, (b + 1) * d)
                g = err @ h[:, cols]                                          # (out, d)
                delta = cb[cand[:, b]] - w_hat[:, None, cols]                 # (out, m, d)
                gain = torch.einsum("omd,de,ome->om", delta, h[cols, cols], delta) \
                    + 2 * torch.einsum("omd,od->om", delta, g)               # change of the error
                best = gain.argmin(1)                                         # (out,)
                better = gain.gather(1, best[:, None]).squeeze(1) < 0
                new = torch.where(better, cand[:, b].gather(1, best[:, None]).squeeze(1), assign[:, b])
                step = cb[new] - w_hat[:, cols]
                w_hat[:, cols] += step
                err[:, cols] += step
                assign[:, b] = new
        self.assignment.copy_(assign.reshape(-1))
        return float((assign != before).float().mean())

    @torch.no_grad()
    def make_hard(self):
        """Switch to hard assignments (top candidate); logits are dropped."""
        if self.hard:
            return
        self.assignment.copy_(self.current_assignment())
        self.candidates = self.logits = self.frozen_mask = None
        self.hard = True

    @torch.no_grad()
    def round_codebook(self):
        """Keep the in-memory codebook at storage precision so packed reload is exact."""
        if self.codebook_dtype == "float16":
            self.codebook.copy_(self.codebook.half().float())

    # -- forward ----------------------------------------------------------------------------
    def weight_hat(self) -> torch.Tensor:
        if self.hard:
            sub = self.codebook[self.assignment]  # (S, d)
        elif self.n_candidates == 2:
            # Same values and gradients as the general mix below, without the (S, n, d) gather:
            # r = (p, 1-p), so sum_i r_i C[c_i] = C[c_1] + p (C[c_0] - C[c_1]).
            p = self.assignment_ratios()[:, :1]                                   # (S, 1)
            c0, c1 = self.candidates[:, 0], self.candidates[:, 1]
            if self.hard_forward:  # value: the codeword in use; d/dp through the soft mix (STE)
                cb = self.codebook.detach()
                sub = self.codebook[self.current_assignment()] + (p - p.detach()) * (cb[c0] - cb[c1])
            else:  # one gather: its backward (an index-add into the codebook) is the costly part
                g = self.codebook[self.candidates]                                 # (S, 2, d)
                sub = torch.lerp(g[:, 1], g[:, 0], p)  # exact at p = 0 and 1 (frozen rows)
        elif self.hard_forward:
            # value = top candidate's codeword; gradient to logits through the soft mix (STE)
            r = self.assignment_ratios()                                              # (S, n)
            soft = (r.unsqueeze(-1) * self.codebook.detach()[self.candidates]).sum(1)  # (S, d)
            sub = self.codebook[self.current_assignment()] + (soft - soft.detach())
        else:
            r = self.assignment_ratios()                                     # (S, n)
            sub = (r.unsqueeze(-1) * self.codebook[self.candidates]).sum(1)  # (S, d)
        return sub.reshape(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` (and diffusers) keeps working
        return self.weight_hat().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard and not torch.is_grad_enabled():
            # inference: rebuild W only when codebook or indices changed (saves a gather per step)
            key = (self.codebook._version, self.assignment._version, self.codebook.data_ptr(), x.dtype)
            if getattr(self, "_cache_key", None) != key:
                self._cached_weight = self.weight_hat().detach().to(x.dtype)
                self._cache_key = key
            return F.linear(x, self._cached_weight, None if self.bias is None else self.bias.to(x.dtype))
        w = self.weight_hat()
        if self.record_weight_grad and w.requires_grad:
            w.retain_grad()
            self.last_weight = w
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        state = "hard" if self.hard else f"soft n={self.n_candidates}"
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, d={self.d}, "
                f"bits/weight={storage_bits(self)['bits_per_weight']:.3f}, {state}")


class RTNLinear(nn.Module):
    """Uniform min-max asymmetric round-to-nearest weights: w = (q - zero) * scale."""

    def __init__(self, in_features: int, out_features: int, bits: int, per_channel: bool = True,
                 bias: bool = True, name: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.per_channel, self.name = (
            in_features, out_features, bits, per_channel, name)
        rows = out_features if per_channel else 1
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero", torch.zeros(rows, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: RTNConfig, name: str = "") -> "RTNLinear":
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, cfg.bits, cfg.per_channel,
                linear.bias is not None, name).to(w.device)
        levels = 2 ** cfg.bits - 1
        lo = w.min(1, keepdim=True).values if cfg.per_channel else w.min().reshape(1, 1)
        hi = w.max(1, keepdim=True).values if cfg.per_channel else w.max().reshape(1, 1)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()  # stored as fp16
        zero = torch.round(-lo / scale).clamp(0, levels).half().float()
        with torch.no_grad():
            q.qweight.copy_(torch.clamp(torch.round(w / scale) + zero, 0, levels).to(torch.uint8))
            q.scale.copy_(scale)
            q.zero.copy_(zero)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        return q

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.float() - self.zero) * self.scale

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {gran}, "
                f"bits/weight={storage_bits(self)['bits_per_weight']:.3f}")

    def storage_bits(self) -> dict:
        return storage_bits(self)


# ----------------------------------------------------------------------------------------
# Bit accounting: the one place. The size report, the packer's check and extra_repr use it,
# and it counts exactly what `io.save_quantized` stores for a layer.
# ----------------------------------------------------------------------------------------

DTYPE_BITS = {"float16": 16, "float32": 32}
BIAS_BITS = 32        # biases are stored as float32
RTN_SCALE_BITS = 16   # per row (or per tensor): fp16 scale ...
RTN_ZERO_BITS = 8     # ... and a uint8 zero point


def vq_storage_bits(out_features: int, in_features: int, k: int, d: int, codebook_dtype: str = "float16",
                    bias: bool = True) -> dict:
    """Bits a packed VQ layer stores: indices, its codebook (side) and its bias."""
    n = out_features * in_features
    return _bits(n, index=n // d * index_bits(k), side=k * d * DTYPE_BITS[codebook_dtype],
                 bias=out_features * BIAS_BITS if bias else 0)


def rtn_storage_bits(out_features: int, in_features: int, bits: int, per_channel: bool = True,
                     bias: bool = True) -> dict:
    """Bits a packed RTN layer stores: codes, scale + zero per row or tensor (side) and its bias."""
    n = out_features * in_features
    rows = out_features if per_channel else 1
    return _bits(n, index=n * bits, side=rows * (RTN_SCALE_BITS + RTN_ZERO_BITS),
                 bias=out_features * BIAS_BITS if bias else 0)


def _bits(n_weights, index, side, bias) -> dict:
    return dict(n_weights=n_weights, index_bits=index, side_bits=side, bias_bits=bias,
                bits_per_weight=(index + side + bias) / n_weights)


def storage_bits(layer: nn.Module) -> dict:
    if isinstance(layer, VQLinear):
        return vq_storage_bits(layer.out_features, layer.in_features, layer.k, layer.d, layer.codebook_dtype,
                               layer.bias is not None)
    if isinstance(layer, RTNLinear):
        return rtn_storage_bits(layer.out_features, layer.in_features, layer.bits, layer.per_channel,
                                layer.bias is not None)
    from .peers import PeerLinear  # a peer library's layer counts what that library stores
    if isinstance(layer, PeerLinear):
        return dict(layer.stored)
    raise TypeError(f"not a quantized layer: {type(layer).__name__}")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from .peers import PeerLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, (VQLinear, RTNLinear, PeerLinear))}
