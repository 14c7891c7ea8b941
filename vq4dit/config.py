"""Method configs: what to quantize and how. One dataclass per scheme, one registry of methods.

    method_config("vq4dit", bits=2, calib={"iterations": 10})  -> VQConfig with a CalibConfig
    method_config("rtn", bits=2)                                -> RTNConfig

Nothing here touches a model: configs are validated in `__post_init__` so a bad setting fails
before any work starts (torchao style).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

# bits -> (k codewords, d sub-vector length), from the paper (index bits per weight = log2(k)/d).
VQ_PRESETS = {2: (256, 4), 3: (64, 2), 4: (256, 2)}
RTN_BITS = (2, 3, 4, 8)


def index_bits(k: int) -> int:
    """Bits of one codeword index (k is validated to be a power of two)."""
    return int(math.log2(k))


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
        return index_bits(self.k)

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

