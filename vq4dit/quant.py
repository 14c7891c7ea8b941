"""Quantized layers, method configs and the one in-place entry point `quantize(model, config)`.

Paper concepts, 1:1:
  k-means codebook ........ `kmeans()`                       (spec step 1)
  candidate set ........... `VQLinear.candidates`            (step 2)
  assignment ratios ....... `VQLinear.assignment_ratios()`   (step 3)
  L_r regularizer ......... `VQLinear.ratio_regularizer()`   (step 4)
  progressive freezing .... `VQLinear.freeze_confident()`    (step 7)
  hard switch ............. `VQLinear.make_hard()`           (step 7)
Calibration (steps 5-6) lives in `calibrate.py`.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import re
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

# bits -> (k codewords, d sub-vector length), from the paper (index bits per weight = log2(k)/d).
VQ_PRESETS = {2: (256, 4), 3: (64, 2), 4: (256, 2)}
RTN_BITS = (2, 3, 4, 8)
MAX_LR = 10.0          # issue 11: learning-rate cap (reference lrs are 5e-2 / 1e-4)
MAX_LAMBDA_R = 1000.0  # issue 11: cap of the ratio-regularizer weight (reference: 1.0)


@dataclass
class CalibConfig:
    """Zero-data block-wise calibration. Defaults are the reference code's recipe."""
    iterations: int = 1000            # sampler trajectories (reference: 1000)
    labels_per_iteration: int = 4     # random class labels per trajectory (reference: 4)
    num_sampling_steps: int = 50      # teacher DDIM steps per trajectory; one optimizer step each
    guidance_scale: float = 4.0       # CFG along the teacher trajectory (reference: 4.0)
    lr_logits: float = 5e-2           # RMSprop lr for assignment logits (reference)
    lr_codebook: float = 1e-4         # RMSprop lr for codebooks (reference)
    lr_bias: float = 1e-4             # RMSprop lr for biases (reference)
    rmsprop_alpha: float = 0.9        # reference
    lambda_r: float = 1.0             # weight of L_r; ratio regularizer pushes ratios to one-hot
    train_assignments: bool = True    # False = classic VQ (codebook-only calibration)
    train_codebook_soft: bool = True  # paper: codebook trains with the ratios; reference code: False
    freeze_threshold: float = 0.99    # top ratio above this fixes a sub-vector to its codeword
    hard_threshold: float = 0.99      # frozen share above this switches the layer to hard indices
    freeze_after: int = 0             # optimizer steps before freezing may start (0 = reference)
    hard_forward: bool = False        # straight-through: forward uses the top candidate (the weights
                                      # that will ship), gradients reach the ratios through the soft
                                      # mix. False = paper (soft forward)
    force_hard_at: Optional[float] = None  # fraction of the run after which every layer is made hard
                                           # (its codebook keeps training); None = reference
    max_seconds: Optional[float] = None  # wall-clock budget; stops early and keeps the result
    trace_every: Optional[int] = None    # record layer stats every N steps (None: ~100 records)
    n_snapshots: int = 6              # codebook/sample snapshots over the run (+ start and end)
    trace_samples: int = 512          # fixed random sub-vectors per layer kept for cluster plots
    seed: int = 0
    device: Optional[str] = None      # None: CUDA when available, else CPU

    def __post_init__(self):
        for name in ("iterations", "labels_per_iteration", "num_sampling_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_logits", "lr_codebook", "lr_bias"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"CalibConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.force_hard_at is not None and not 0.0 <= self.force_hard_at <= 1.0:
            raise ValueError(f"force_hard_at must be a fraction in [0, 1], got {self.force_hard_at}")
        if not 0.5 <= self.freeze_threshold <= 1.0 or not 0.0 <= self.hard_threshold <= 1.0:
            raise ValueError("freeze_threshold must be in [0.5, 1] and hard_threshold in [0, 1]")
        # issue 11: bounded, finite numbers (a huge lr or a NaN lambda_r ends in NaN losses)
        for name in ("lr_logits", "lr_codebook", "lr_bias"):
            if getattr(self, name) > MAX_LR:
                raise ValueError(f"CalibConfig.{name} must be <= {MAX_LR}, got {getattr(self, name)}")
        if not (math.isfinite(self.lambda_r) and 0 <= self.lambda_r <= MAX_LAMBDA_R):
            raise ValueError(f"CalibConfig.lambda_r must be a finite number in [0, {MAX_LAMBDA_R}], got {self.lambda_r}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"CalibConfig.guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"CalibConfig.max_seconds must be a finite number > 0 (or None), got {self.max_seconds}")
        if not 0 < self.rmsprop_alpha < 1:
            raise ValueError(f"CalibConfig.rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha}")

    @property
    def total_steps(self) -> int:
        return self.iterations * self.num_sampling_steps


@dataclass
class VQConfig:
    """Vector quantization with per-layer k-means codebooks (+ optional calibration)."""
    bits: Optional[int] = 2           # preset: 2 -> (256, 4), 3 -> (64, 2), 4 -> (256, 2)
    k: Optional[int] = None           # codewords; overrides the preset
    d: Optional[int] = None           # sub-vector length; overrides the preset
    n_candidates: int = 2             # candidate codewords per sub-vector (paper: 2)
    kmeans_iters: int = 100           # paper: ~100 Lloyd iterations
    seed: int = 0
    codebook_dtype: str = "float16"   # stored codebook precision (counted in bits/weight)
    calib: Optional[CalibConfig] = None  # None = plain k-means VQ, no calibration
    method: str = "kmeans"            # name used in reports; set by `method_config`

    def __post_init__(self):
        if self.k is None or self.d is None:
            if self.bits not in VQ_PRESETS:
                raise ValueError(f"unsupported bits={self.bits} for VQ: choose one of {sorted(VQ_PRESETS)} "
                                 f"or set k and d explicitly")
            pk, pd = VQ_PRESETS[self.bits]
            self.k = self.k if self.k is not None else pk
            self.d = self.d if self.d is not None else pd
        if not (2 <= self.k <= 65536) or self.k & (self.k - 1):
            raise ValueError(f"k must be a power of two in [2, 65536], got k={self.k}")
        if not 1 <= self.d <= 64:
            raise ValueError(f"d (sub-vector length) must be in [1, 64], got d={self.d}")
        if not 1 <= self.n_candidates <= self.k:
            raise ValueError(f"n_candidates must be in [1, k={self.k}], got {self.n_candidates}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.codebook_dtype not in ("float16", "float32"):
            raise ValueError(f"codebook_dtype must be 'float16' or 'float32', got {self.codebook_dtype!r}")

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.k))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RTNConfig:
    """Uniform round-to-nearest, min-max asymmetric (the paper's 'UQ' baseline)."""
    bits: int = 2
    per_channel: bool = True          # one scale/zero per output row (False: one per tensor)
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in RTN_BITS:
            raise ValueError(f"unsupported bits={self.bits} for RTN: choose one of {RTN_BITS}")

    def to_dict(self) -> dict:
        return asdict(self)


def _vq(method, **calib_kw):
    def make(bits=2, calib=None, **kw):
        c = CalibConfig(**{**calib_kw, **(calib or {})}) if method != "kmeans" else None
        return VQConfig(bits=bits, calib=c, method=method, **kw)
    return make


# Every method is a config through the same code path (torchao style).
METHODS: dict[str, Callable[..., object]] = {
    "vq4dit": _vq("vq4dit", train_assignments=True, train_codebook_soft=True),
    "vq4dit-ref": _vq("vq4dit-ref", train_assignments=True, train_codebook_soft=False),
    "codebook-only": _vq("codebook-only", train_assignments=False),
    "kmeans": _vq("kmeans"),
    "rtn": lambda bits=2, **kw: RTNConfig(bits=bits, per_channel=True, method="rtn"),
    "rtn-tensor": lambda bits=2, **kw: RTNConfig(bits=bits, per_channel=False, method="rtn-tensor"),
}


def method_config(method: str, bits: int = 2, calib: Optional[dict] = None, **kw):
    """`method_config("vq4dit", bits=2, calib={"iterations": 10})` -> a validated config."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    if method.startswith("rtn"):
        return METHODS[method](bits=bits)
    return METHODS[method](bits=bits, calib=calib, **kw)


# ----------------------------------------------------------------------------------------
# Which layers: every nn.Linear inside the transformer blocks except the embedders
# ----------------------------------------------------------------------------------------

_LAYER_TYPES = [  # (regex on the name inside a block, short type used in plots)
    (r"attn\d*\.to_[qkv]$", "qkv"),
    (r"attn\d*\.to_out\.0$", "out"),
    (r"ff\.net\.0\.proj$", "fc1"),
    (r"ff\.net\.2$", "fc2"),
    (r"norm1\.linear$", "adaLN"),
]


def layer_type(name: str) -> str:
    for pattern, short in _LAYER_TYPES:
        if re.search(pattern, name):
            return short
    return "other"


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
        hit = _read_kmeans_entry(f, x.shape[0], k, x.shape[1])
        if hit is not None:
            return hit[0].to(x.device), hit[1].to(x.device)
        # corrupt, tampered or unreadable entry: recompute and overwrite
    c, a = kmeans(x, k, iters, seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        c_cpu, a_cpu = c.cpu().contiguous(), a.cpu().contiguous()
        save_file({"codebook": c_cpu, "assignment": a_cpu}, str(tmp),
                  metadata={"sha256": _kmeans_digest(c_cpu, a_cpu)})
        os.replace(tmp, f)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except (OSError, NameError):
            pass
        # a read-only cache is not an error
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
                 bias: bool = True, name: str = ""):
        super().__init__()
        if in_features % d:
            raise ValueError(f"layer {name or '?'}: in_features={in_features} is not divisible by d={d}")
        self.in_features, self.out_features, self.k, self.d = in_features, out_features, k, d
        self.n_candidates, self.name = n_candidates, name
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: VQConfig, name: str = "", seed: int = 0) -> "VQLinear":
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, cfg.k, cfg.d, cfg.n_candidates,
                linear.bias is not None, name).to(w.device)
        x = w.float().reshape(-1, cfg.d)  # (S, d)
        codebook, assign = kmeans_cached(x, cfg.k, cfg.kmeans_iters, seed)
        with torch.no_grad():
            q.codebook.copy_(codebook)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        q.assignment.copy_(assign)
        q.kmeans_assignment.copy_(assign)
        q.round_codebook(cfg.codebook_dtype)
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
        if self.frozen_mask.float().mean().item() > hard_threshold:
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
    def round_codebook(self, dtype: str = "float16"):
        """Keep the in-memory codebook at storage precision so packed reload is exact."""
        if dtype == "float16":
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
                f"bits/weight={bits_per_weight_vq(self.out_features * self.in_features, self.k, self.d):.3f}, {state}")


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
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {gran}"


# ----------------------------------------------------------------------------------------
# Bit accounting (one place: used by size reports, the packer's check and the benchmark)
# ----------------------------------------------------------------------------------------

def bits_per_weight_vq(n_weights: int, k: int, d: int, codebook_bits: int = 16) -> float:
    """Total bits per weight of one VQ layer: indices + its codebook."""
    return (n_weights // d * math.log2(k) + k * d * codebook_bits) / n_weights


def vq_index_bytes(shapes: list[tuple[int, int]], k: int, d: int) -> int:
    """Bytes of bit-packed indices for Linear weights of the given (out, in) shapes."""
    return sum(math.ceil(o * i // d * int(math.log2(k)) / 8) for o, i in shapes)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (VQLinear, RTNLinear))}


def size_report(model: nn.Module):
    """Per-layer and total storage of the quantized layers (pandas DataFrame).

    bits_per_weight counts everything stored for the weight: indices + fp16 codebook (VQ) or
    codes + fp16 scale/zero (RTN). Biases and non-quantized parts are reported separately.
    """
    import pandas as pd
    rows = []
    for name, m in quantized_layers(model).items():
        n_w = m.out_features * m.in_features
        if isinstance(m, VQLinear):
            index_bits = m.num_subvectors * int(math.log2(m.k))
            side_bits = m.k * m.d * 16
        else:
            index_bits = n_w * m.bits
            side_bits = m.scale.numel() * 32
        rows.append(dict(layer=name, block=block_index(name), type=layer_type(name),
                         shape=f"{m.out_features}x{m.in_features}", n_weights=n_w,
                         index_bits=index_bits, side_bits=side_bits,
                         bits_per_weight=(index_bits + side_bits) / n_w))
    df = pd.DataFrame(rows)
    fp_params = sum(p.numel() for n, p in model.named_parameters()
                    if not any(n.startswith(q + ".") for q in quantized_layers(model)))
    df.attrs["fp_params"] = fp_params
    return df


def size_summary(model: nn.Module) -> dict:
    df = size_report(model)
    n_w = int(df.n_weights.sum()) if len(df) else 0
    idx = int(df.index_bits.sum()) if len(df) else 0
    side = int(df.side_bits.sum()) if len(df) else 0
    return dict(quantized_weights=n_w, index_bytes=math.ceil(idx / 8), side_bytes=math.ceil(side / 8),
                bits_per_weight=(idx + side) / max(n_w, 1), index_bits_per_weight=idx / max(n_w, 1),
                fp_params=df.attrs.get("fp_params", 0))


# ----------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------

def check_finite(model: nn.Module):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise ValueError(f"parameter {name} has {bad} NaN/Inf values: refusing to quantize")


def _replace(model: nn.Module, fqn: str, new: nn.Module):
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _targets(model, filter_fn):
    return [(n, m) for n, m in model.named_modules() if filter_fn(m, n)]


def _quantize_vq(model, cfg: VQConfig, targets, progress):
    for name, lin in targets:  # validate every layer before touching the model
        if lin.in_features % cfg.d:
            raise ValueError(f"layer {name}: in_features={lin.in_features} is not divisible by d={cfg.d}; "
                             f"choose a d that divides it")
        if lin.out_features * lin.in_features // cfg.d < cfg.k:
            raise ValueError(f"layer {name}: only {lin.out_features * lin.in_features // cfg.d} sub-vectors "
                             f"for k={cfg.k} codewords; use a smaller k")
    originals = {}
    for i, (name, lin) in enumerate(progress(targets, desc=f"k-means k={cfg.k} d={cfg.d}")):
        q = VQLinear.from_linear(lin, cfg, name=name, seed=cfg.seed + i)
        originals[name] = lin.weight.detach()
        _replace(model, name, q)
    return originals


def _quantize_rtn(model, cfg: RTNConfig, targets, progress):
    for name, lin in progress(targets, desc=f"RTN {cfg.bits}-bit"):
        _replace(model, name, RTNLinear.from_linear(lin, cfg, name=name))
    return {}


_QUANTIZERS = {VQConfig: _quantize_vq, RTNConfig: _quantize_rtn}


def quantize(model: nn.Module, config, filter_fn=default_filter, teacher: Optional[nn.Module] = None,
             on_step=None, progress: bool = True):
    """Quantize `model` in place: swap target Linears, k-means init, then calibrate if the config asks.

    Returns the calibration `Trace` (None for methods without calibration). `teacher` defaults to
    a full-precision copy of `model` taken before quantizing. `on_step(info)` is called after each
    calibration step; returning False (or raising KeyboardInterrupt) stops calibration cleanly.
    """
    if type(config) not in _QUANTIZERS:
        raise TypeError(f"unsupported config type {type(config).__name__}: use method_config(...)")
    check_finite(model)
    targets = _targets(model, filter_fn)
    if not targets:
        raise ValueError("no target layers found: expected nn.Linear layers under 'transformer_blocks.' "
                         "(is this a diffusers DiTTransformer2DModel?)")
    needs_teacher = isinstance(config, VQConfig) and config.calib is not None
    if needs_teacher and teacher is None:
        teacher = copy.deepcopy(model).eval()
    bar = _progress if progress else (lambda it, desc=None: it)
    originals = _QUANTIZERS[type(config)](model, config, targets, bar)
    model._vq4dit_config = config
    if not needs_teacher:
        return None
    from .calibrate import calibrate
    return calibrate(model, teacher, config, originals, on_step=on_step, progress=progress)


def _progress(it, desc=None):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)


def dequantize_layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective weights of every quantized layer (for comparisons and tests)."""
    return {n: m.weight.detach().clone() for n, m in quantized_layers(model).items()}
