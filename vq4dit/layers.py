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

from .config import RTNConfig, VQConfig, index_bits

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

def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest codeword for each row of x (chunked to stay in cache)."""
    c_sq = c.pow(2).sum(1)
    return torch.cat([torch.addmm(c_sq, x[s:s + chunk], c.T, alpha=-2).argmin(1)
                      for s in range(0, x.shape[0], chunk)])


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ init. x: (S, d) -> codebook (k, d), assignment (S,).

    Stops early when the squared centroid shift falls below tol * mean feature variance
    (scikit-learn's criterion).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    s = x.shape[0]
    if s < k:
        raise ValueError(f"{s} sub-vectors is fewer than k={k} codewords")
    # k-means++ on a subsample (keeps init O(k * 20k) for huge layers)
    pool = x[torch.randperm(s, generator=g)[: min(s, 20000)].to(x.device)]
    first = pool[torch.randint(len(pool), (1,), generator=g).item()]
    centers = [first]
    d2 = (pool - first).pow(2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1 / len(d2))
        j = torch.multinomial(probs.cpu(), 1, generator=g).item()
        centers.append(pool[j])
        d2 = torch.minimum(d2, (pool - pool[j]).pow(2).sum(1))
    c = torch.stack(centers)  # (k, d)
    threshold = tol * x.var(0).mean()
    ones = torch.ones(s, device=x.device)
    for _ in range(iters):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, ones)
        new_c = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at random points
            new_c[empty] = x[torch.randint(s, (int(empty.sum()),), generator=g).to(x.device)]
        shift = (new_c - c).pow(2).sum()
        c = new_c
        if shift <= threshold:
            break
    return c, _nearest(x, c)


def kmeans_cache_dir() -> Optional[Path]:
    """$VQ4DIT_CACHE (default ~/.cache/vq4dit); set VQ4DIT_CACHE=off to disable."""
    v = os.environ.get("VQ4DIT_CACHE", str(Path.home() / ".cache" / "vq4dit"))
    return None if v.lower() in ("", "0", "off", "none") else Path(v) / "kmeans"


def kmeans_cached(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means keyed by the exact data and settings: re-quantizing the same model is instant."""
    root = kmeans_cache_dir()
    if root is None:
        return kmeans(x, k, iters, seed)
    from safetensors.torch import load_file, save_file
    h = hashlib.sha1(x.detach().cpu().numpy().tobytes())
    h.update(f"{k}/{iters}/{seed}/{x.shape}".encode())
    f = root / f"{h.hexdigest()}.safetensors"
    if f.is_file():
        try:
            t = load_file(str(f))
            return t["codebook"].to(x.device), t["assignment"].to(x.device)
        except Exception:
            pass  # unreadable cache entry: recompute and overwrite
    c, a = kmeans(x, k, iters, seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        save_file({"codebook": c.cpu().contiguous(), "assignment": a.cpu().contiguous()}, str(tmp))
        os.replace(tmp, f)
    except OSError:
        pass  # a read-only cache is not an error
    return c, a


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # (S, d), (k, d) -> (S, k) squared Euclidean distances
    return torch.addmm(c.pow(2).sum(1), x, c.T, alpha=-2).add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0)


# ----------------------------------------------------------------------------------------
# Quantized layers
# ----------------------------------------------------------------------------------------

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
        self.record_weight_grad = False
        self.last_weight: Optional[torch.Tensor] = None  # w_hat of the last forward, for conflict stats

    @property
    def num_subvectors(self) -> int:
        return self.assignment.numel()

    @property
    def index_bits(self) -> int:
        return index_bits(self.k)

    def storage_bits(self) -> dict:
        return storage_bits(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: VQConfig, name: str = "", seed: int = 0) -> "VQLinear":
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, cfg.k, cfg.d, cfg.n_candidates,
                linear.bias is not None, name, cfg.codebook_dtype).to(w.device)
        x = w.float().reshape(-1, cfg.d)  # (S, d)
        codebook, assign = kmeans_cached(x, cfg.k, cfg.kmeans_iters, seed)
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
            d2 = _sq_dists(x[s:s + (1 << 16)], self.codebook.detach())      # (chunk, k)
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
        r = torch.softmax(self.logits, dim=1)
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
        r = torch.softmax(self.logits[soft], dim=1)
        return self.n_candidates * (r * (1 - r)).mean()

    def current_assignment(self) -> torch.Tensor:
        """(S,) codeword each sub-vector uses now (top candidate while soft)."""
        if self.hard:
            return self.assignment
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
        r = torch.softmax(self.logits, dim=1)
        self.frozen_mask |= r.max(1).values > freeze_threshold
        # float64 share: in float32, 99/100 frozen reads 0.99000001 > 0.99 and switches too early
        if self.frozen_mask.double().mean().item() > hard_threshold:
            self.make_hard()
            return True
        return False

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
    raise TypeError(f"not a quantized layer: {type(layer).__name__}")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (VQLinear, RTNLinear))}
