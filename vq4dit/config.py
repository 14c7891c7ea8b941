"""Method configs: what to quantize and how. One dataclass per scheme, one registry of methods.

    method_config("vq4dit", bits=2, calib={"iterations": 10})  -> VQConfig with a CalibConfig
    method_config("rtn", bits=2)                                -> RTNConfig

Nothing here touches a model: configs are validated in `__post_init__` so a bad setting fails
before any work starts (torchao style).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .checks import check_number

# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

# bits -> (k codewords, d sub-vector length), from the paper (index bits per weight = log2(k)/d).
VQ_PRESETS = {2: (256, 4), 3: (64, 2), 4: (256, 2)}
RTN_BITS = (2, 3, 4, 8)
MAX_LR = 10.0          # learning-rate cap (reference lrs are 5e-2 / 1e-4)
MAX_LAMBDA_R = 1000.0  # cap of the ratio-regularizer weight (reference: 1.0)
# k-means trains each codebook on at most this many sub-vectors per codeword (faiss' default
# max_points_per_centroid), then assigns every sub-vector: XL/2 layers have up to 1.3M of them.
KMEANS_POINTS_PER_CODEWORD = 256


# Named settings of a bit-width: the paper's presets, and two 2-bit variants for small models.
# Sub-vectors per codeword = out*in / (d*k). DiT-XL/2 at W2 shares each codeword among
# 1152*1152/(4*256) = 1,296 (attention) to 1152*4608/(4*256) = 5,184 (MLP) sub-vectors; on a
# hidden-256 model the W2 preset shares only 64-256, while k=16, d=4 shares 1,024-4,096: the
# regime where shared codewords' gradients conflict (the paper's mechanism). See README.
SETTINGS = {
    "W2": dict(bits=2),                    # k=256, d=4
    "W3": dict(bits=3),                    # k=64, d=2
    "W4": dict(bits=4),                    # k=256, d=2
    # budget-matched 2-bit: fp16 codebooks of the W2 preset cost 0.25-0.4 bits/weight at hidden
    # 256; k=64, d=4 totals ~1.6 bits/weight, under per-channel RTN W2
    "W2-budget": dict(bits=2, k=64, d=4),
    "XL-sharing": dict(bits=2, k=16, d=4),  # sharing-matched to DiT-XL/2 W2 (1.0 index bits/weight)
}


def setting_kd(name: str) -> tuple[int, int]:
    """(k, d) of a named setting."""
    s = SETTINGS[name]
    return s.get("k", VQ_PRESETS[s["bits"]][0]), s.get("d", VQ_PRESETS[s["bits"]][1])


def settings_for_bits(bits: int) -> list[str]:
    return [n for n, s in SETTINGS.items() if s["bits"] == int(bits)]


def index_bits(k: int) -> int:
    """Bits of one codeword index (k is validated to be a power of two)."""
    return int(math.log2(k))


@dataclass
class CalibConfig:
    """Zero-data block-wise calibration. Defaults are the reference code's recipe."""
    iterations: int = 1000            # sampler trajectories (reference: 1000)
    labels_per_iteration: int = 4     # random class labels per trajectory (reference: 4)
    num_sampling_steps: int = 50      # teacher sampler steps per trajectory; one optimizer step each
    guidance_scale: float = 4.0       # CFG along the teacher trajectory (reference: 4.0)
    teacher_sampler: str = "ddpm"     # reference code: stochastic DDPM; "ddim" = deterministic
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
    temperature_end: Optional[float] = None  # anneal the ratios' softmax temperature from 1 to this
                                             # (geometric, AdaRound-style); None = paper (T = 1)
    commit_until: Optional[float] = None   # commit the most confident sub-vectors on a linear schedule,
                                           # all by this fraction of the run (ViM-VQ style); None = paper
    finish_repick: bool = False            # after calibration, re-pick each sub-vector's codeword among
                                           # its nearest with the codebook fixed (PV-tuning style)
    max_seconds: Optional[float] = None  # wall-clock budget; stops early and keeps the result
    # Stop rule (budget, not algorithm; issue 19): a run that ends with layers still soft has them
    # forced to argmax by `finalize`, shipping codebooks trained for soft mixtures (10-25x error).
    until_hard: bool = False          # after `iterations`, keep drawing teacher trajectories until every
                                      # layer has switched by itself, then `hard_margin` more steps
    hard_margin: int = 50             # steps of hard-phase codebook training after the last own switch
                                      # (2 trajectories of the small recipe)
    max_steps: Optional[int] = None   # cap of until_hard (None: 4x total_steps); layers still soft at
                                      # the cap are forced (and recorded as forced)
    lr_gate: bool = False             # reference code: add L_r only on steps where it rises above its
                                      # running minimum within the trajectory; False = paper (every step)
    trace_every: Optional[int] = None    # record layer stats every N steps (None: ~100 records)
    n_snapshots: int = 6              # codebook/sample snapshots over the run (+ start and end)
    trace_samples: int = 512          # fixed random sub-vectors per layer kept for cluster plots
    seed: int = 0
    device: Optional[str] = None      # None: CUDA when available, else CPU
    autocast: Optional[str] = None    # "bf16": teacher and student forwards under bf16 autocast (GPU
                                      # speed); codebooks, logits, biases and the optimizer stay fp32
                                      # (master copies). None = fp32 throughout (results as measured)
    recipe: str = "reference"         # name of the budget these settings started from (reports only)

    def __post_init__(self):
        for name in ("iterations", "labels_per_iteration", "num_sampling_steps"):
            check_number(f"CalibConfig.{name}", getattr(self, name), 1, integer=True)
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {self.autocast!r}")
        # bounded, finite numbers (a huge lr or a NaN lambda_r ends in NaN losses)
        for name in ("lr_logits", "lr_codebook", "lr_bias"):
            check_number(f"CalibConfig.{name}", getattr(self, name), 0, MAX_LR)
        check_number("CalibConfig.lambda_r", self.lambda_r, 0, MAX_LAMBDA_R)
        check_number("CalibConfig.guidance_scale", self.guidance_scale, 0)
        check_number("CalibConfig.freeze_threshold", self.freeze_threshold, 0.5, 1.0)
        check_number("CalibConfig.hard_threshold", self.hard_threshold, 0.0, 1.0)
        check_number("CalibConfig.freeze_after", self.freeze_after, 0, integer=True)
        if self.teacher_sampler not in ("ddim", "ddpm"):
            raise ValueError(f"teacher_sampler must be 'ddim' or 'ddpm', got {self.teacher_sampler!r}")
        if self.force_hard_at is not None:
            check_number("CalibConfig.force_hard_at", self.force_hard_at, 0.0, 1.0)
        # open intervals: 0 is not a temperature, a commit schedule or a time budget
        if self.temperature_end is not None and not 0.0 < check_number("temperature_end", self.temperature_end, 0.0, 1.0):
            raise ValueError(f"temperature_end must be in (0, 1], got {self.temperature_end}")
        if self.commit_until is not None and not 0.0 < check_number("commit_until", self.commit_until, 0.0, 1.0):
            raise ValueError(f"commit_until must be a fraction in (0, 1], got {self.commit_until}")
        if self.max_seconds is not None and not 0 < check_number("CalibConfig.max_seconds", self.max_seconds, 0):
            raise ValueError(f"CalibConfig.max_seconds must be a finite number > 0 (or None), got {self.max_seconds}")
        if self.hard_margin < 0:
            raise ValueError(f"CalibConfig.hard_margin must be >= 0 steps, got {self.hard_margin}")
        if self.max_steps is not None and self.max_steps < self.total_steps:
            raise ValueError(f"CalibConfig.max_steps ({self.max_steps}) must be >= iterations x num_sampling_steps "
                             f"({self.total_steps}): it caps until_hard, it does not shorten the run")
        if not 0 < check_number("CalibConfig.rmsprop_alpha", self.rmsprop_alpha, 0, 1) < 1:
            raise ValueError(f"CalibConfig.rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha}")

    @property
    def total_steps(self) -> int:
        """Planned optimizer steps (until_hard may run past them, up to `step_cap`)."""
        return self.iterations * self.num_sampling_steps

    @property
    def step_cap(self) -> int:
        """The most steps a run takes: total_steps, or until_hard's cap."""
        if not self.until_hard:
            return self.total_steps
        return self.max_steps if self.max_steps is not None else 4 * self.total_steps


@dataclass
class VQConfig:
    """Vector quantization with per-layer k-means codebooks (+ optional calibration)."""
    bits: Optional[int] = 2           # preset: 2 -> (256, 4), 3 -> (64, 2), 4 -> (256, 2)
    k: Optional[int] = None           # codewords; overrides the preset
    d: Optional[int] = None           # sub-vector length; overrides the preset
    n_candidates: int = 2             # candidate codewords per sub-vector (paper: 2)
    kmeans_iters: int = 100           # paper: ~100 Lloyd iterations
    kmeans_points_per_codeword: Optional[int] = KMEANS_POINTS_PER_CODEWORD  # Lloyd on k * this many
                                      # sampled sub-vectors, then all assigned; None = on all of them
    seed: int = 0
    codebook_dtype: str = "float16"   # stored codebook precision (counted in bits/weight)
    activation_aware: bool = False    # weight k-means and candidate distances by the layer input's
                                      # E[x^2] (GPTVQ-style init); False = paper (plain distances)
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
        if check_number("k", self.k, 2, 65536, integer=True) & (self.k - 1):
            raise ValueError(f"k must be a power of two in [2, 65536], got k={self.k}")
        check_number("d (sub-vector length)", self.d, 1, 64, integer=True)
        check_number(f"n_candidates (k={self.k})", self.n_candidates, 1, self.k, integer=True)
        check_number("kmeans_iters", self.kmeans_iters, 1, integer=True)
        if self.kmeans_points_per_codeword is not None:
            check_number("kmeans_points_per_codeword", self.kmeans_points_per_codeword, 1, integer=True)
        check_number("seed", self.seed, integer=True)
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
        if isinstance(self.bits, bool) or self.bits not in RTN_BITS:
            raise ValueError(f"unsupported bits={self.bits} for RTN: choose one of {RTN_BITS}")

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_dict(d: dict):
    """The config a `to_dict()` came from: a VQConfig (with its CalibConfig) or an RTNConfig.
    TypeError / ValueError for fields this version does not have or values it refuses."""
    if "k" in d:
        calib = d.get("calib")
        return VQConfig(**dict(d, calib=None if calib is None else CalibConfig(**calib)))
    return RTNConfig(**d)


# ----------------------------------------------------------------------------------------
# Recipes: budget and learning rates only, applied the same way to every calibrated method
# ----------------------------------------------------------------------------------------

RECIPES: dict[str, dict] = {
    # The reference code's budget: 1000 trajectories x 50 steps, lr 5e-2 / 1e-4 / 1e-4.
    "reference": {},
    # The embedded digits DiT on a 2-core CPU: 8 x 25 = 200 optimizer steps (about a minute).
    "small": dict(
        iterations=8,            # trajectories (reference: 1000)
        num_sampling_steps=25,   # teacher steps per trajectory, one optimizer step each (reference: 50)
        lr_codebook=3e-4,        # 3x the reference: 200 steps instead of 50,000 (1e-3 overshoots)
        lr_logits=2e-2,          # below the reference 5e-2, which flips too many assignments per step
        teacher_sampler="ddim",  # deterministic trajectories: what the small recipe was tuned with
    ),
}
# k-means Lloyd iterations per recipe (a VQConfig field, so kept apart from the CalibConfig keys):
# on the small model k-means converges (scikit-learn tolerance) well before the paper's 100.
RECIPE_KMEANS_ITERS = {"reference": 100, "small": 50}
# Lloyd on a subsample of k * this many sub-vectors (faiss's default), then one assignment pass:
# what makes XL/2's 196 layers tractable. The small recipe keeps full Lloyd: its layers are small,
# and on the digits model subsampling cost W3 k-means +17% block MSE (seeds 0-2, docs/scale.md).
RECIPE_KMEANS_POINTS = {"reference": KMEANS_POINTS_PER_CODEWORD, "small": None}
SMALL_MODEL_KMEANS_ITERS = RECIPE_KMEANS_ITERS["small"]
# Models with fewer quantizable weights than this default to the small recipe (the embedded
# digits DiT has 7.1M; DiT-XL/2 has 669M and gets the reference budget).
SMALL_MODEL_WEIGHTS = 50_000_000


def default_recipe(n_quantizable_weights: int) -> str:
    return "small" if n_quantizable_weights < SMALL_MODEL_WEIGHTS else "reference"


# ----------------------------------------------------------------------------------------
# Methods: a name is its algorithm. Switches below belong to the method; a run that changes one
# is saved under a derived name (see `method_config`), never under the registry name.
# ----------------------------------------------------------------------------------------

# CalibConfig fields that change the algorithm (not the budget).
ALGORITHM_SWITCHES = ("train_assignments", "train_codebook_soft", "hard_forward", "force_hard_at",
                      "freeze_after", "temperature_end", "commit_until", "finish_repick", "lr_gate")
# VQConfig fields that change the algorithm: how the codebooks and candidates are initialised.
VQ_SWITCHES = ("activation_aware",)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str              # "vq" (codebooks) or "rtn" (uniform grid)
    description: str       # one line: what it is, and how it differs from the paper
    calib: Optional[dict]  # algorithm switches of its calibration; None = no calibration
    rtn_per_channel: bool = True
    vq: dict = field(default_factory=dict)  # VQ_SWITCHES it sets (init); unset = VQConfig default

    @property
    def calibrated(self) -> bool:
        return self.calib is not None

    @property
    def trains_assignments(self) -> bool:
        return bool(self.calib and self.calib.get("train_assignments", True))


_PAPER = dict(train_assignments=True, train_codebook_soft=True, hard_forward=False, force_hard_at=None,
              freeze_after=0, temperature_end=None, commit_until=None, finish_repick=False, lr_gate=False)

# Every method is a config through the same code path (torchao style).
METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("vq4dit", "vq", "VQ4DiT as in the paper: codebooks and soft assignment ratios calibrated "
               "together, soft forward, L_r on every step, progressive freezing, hard switch.", dict(_PAPER)),
    MethodSpec("vq4dit-ref", "vq", "VQ4DiT as in the reference code: like vq4dit, but codebooks stay frozen "
               "while a layer's assignments are soft, and L_r is added only on steps where it rises above its "
               "running minimum within the trajectory.", dict(_PAPER, train_codebook_soft=False, lr_gate=True)),
    MethodSpec("vq4dit-ste", "vq", "Ours: vq4dit with a straight-through forward (the hard weights that ship), "
               "gradients reach the ratios through the soft mix.", dict(_PAPER, hard_forward=True)),
    MethodSpec("vq4dit-ste-aa", "vq", "Ours, the default: vq4dit-ste with an activation-aware k-means init "
               "(distances weighted by the layer input's E[x^2], GPTVQ-style).", dict(_PAPER, hard_forward=True),
               vq=dict(activation_aware=True)),
    MethodSpec("codebook-only", "vq", "Classic VQ calibration: k-means assignments fixed, only codebooks "
               "(and biases) trained.", dict(_PAPER, train_assignments=False)),
    MethodSpec("kmeans", "vq", "k-means codebooks, nearest-codeword assignments, no calibration.", None),
    MethodSpec("rtn", "rtn", "Uniform round-to-nearest, min-max per output channel.", None),
    MethodSpec("rtn-tensor", "rtn", "Uniform round-to-nearest, one min-max grid per tensor (the paper's UQ).",
               None, rtn_per_channel=False),
]}
DEFAULT_METHOD = "vq4dit-ste-aa"  # best measured on the embedded model (docs/benchmarks.md, benchmarks/results/digits/)


def method_names(calibrated: Optional[bool] = None) -> list[str]:
    return [n for n, m in METHODS.items() if calibrated is None or m.calibrated == calibrated]


def derived_name(method: str, calib: Optional["CalibConfig"], vq: Optional[dict] = None) -> str:
    """The name a run is saved under. Its switches (calibration + init) are compared with the
    registry: the method's own -> `method`; exactly another entry's -> that entry's name (vq4dit-ste
    with activation_aware is vq4dit-ste-aa); else `method+switch=value,...`, so a changed algorithm
    is never reported as a registry method."""
    spec = METHODS[method]
    vq_default = {k: VQConfig.__dataclass_fields__[k].default for k in VQ_SWITCHES}
    run_vq = {k: (vq or {}).get(k, spec.vq.get(k, vq_default[k])) for k in VQ_SWITCHES}

    def same(other: MethodSpec) -> bool:
        if other.kind != spec.kind or (other.calib is None) != (calib is None):
            return False
        if calib is not None and any(getattr(calib, k) != other.calib[k] for k in ALGORITHM_SWITCHES):
            return False
        return all(run_vq[k] == other.vq.get(k, vq_default[k]) for k in VQ_SWITCHES)

    if same(spec):
        return method
    match = next((name for name, other in METHODS.items() if same(other)), None)
    if match:
        return match
    diff = [f"{k}={getattr(calib, k)}" for k in ALGORITHM_SWITCHES if calib is not None and spec.calib is not None
            and getattr(calib, k) != spec.calib[k]]
    diff += [k if run_vq[k] is True else f"{k}={run_vq[k]}" for k in VQ_SWITCHES
             if run_vq[k] != spec.vq.get(k, vq_default[k])]
    return method + "+" + ",".join(diff)


INITS = ("kmeans", "act-aware")  # flat names of the codebook init (VQConfig.activation_aware)


def build_config(method: str, *, bits: int = 2, k: Optional[int] = None, d: Optional[int] = None,
                 init: Optional[str] = None, recipe: str = "auto", model=None,
                 n_quantizable_weights: Optional[int] = None, calib: Optional[dict] = None, **vq):
    """The one adapter from flat choices to a validated config: the CLI, the bench and the app call it.

    `None` means "not chosen" everywhere (a flag not given, an empty form field). `init` is
    "kmeans" or "act-aware" (None: the method's own). `recipe="auto"` picks `default_recipe` from
    `model`'s (or `n_quantizable_weights`') quantizable weights. Settings a method does not have are
    dropped (calibration settings of uncalibrated methods, codebook settings of RTN, everything for a
    peer name from `vq4dit.peers.PEERS`, e.g. "hqq-w2-g64"); the CLI reports
    those flags as unused before calling this.
    """
    from .peers import PEERS, peer_config  # peers import size, which imports this module
    if method in PEERS:  # a peer library's fixed scheme: no bits/recipe/calibration choices
        return peer_config(method)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)} or a peer {list(PEERS)}")
    if recipe == "auto":
        if n_quantizable_weights is None:
            if model is None:
                raise ValueError("recipe='auto' needs the model (or n_quantizable_weights) to pick a recipe")
            from .naming import default_filter
            n_quantizable_weights = sum(m.weight.numel() for name, m in model.named_modules()
                                        if default_filter(m, name))
        recipe = default_recipe(n_quantizable_weights)
    spec = METHODS[method]
    if spec.kind == "rtn":
        return method_config(method, bits=bits, recipe=recipe)
    if init is not None and init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {list(INITS)}")
    vq_kw = {key: v for key, v in dict(vq, k=k, d=d).items() if v is not None}
    if init is not None:
        vq_kw["activation_aware"] = init == "act-aware"
    calib = {key: v for key, v in (calib or {}).items() if v is not None} if spec.calibrated else None
    return method_config(method, bits=bits, recipe=recipe, calib=calib, **vq_kw)


def method_config(method: str, bits: int = 2, calib: Optional[dict] = None, recipe: str = "reference", **kw):
    """`method_config("vq4dit", bits=2, recipe="small", calib={"iterations": 10})` -> a validated config.

    Calibration settings = CalibConfig defaults <- recipe (budget, learning rates) <- the method's
    algorithm switches <- `calib` overrides. Overriding a switch renames the config (`derived_name`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {list(RECIPES)}")
    spec = METHODS[method]
    if spec.kind == "rtn":
        if kw or calib:
            raise ValueError(f"method {method!r} takes only bits; got {sorted(set(kw) | set(calib or {}))}")
        return RTNConfig(bits=bits, per_channel=spec.rtn_per_channel, method=method)
    c = None
    if spec.calibrated:
        unknown = set(calib or {}) - {f.name for f in fields(CalibConfig)}
        if unknown:
            raise ValueError(f"unknown calibration settings {sorted(unknown)}")
        c = CalibConfig(**{"recipe": recipe, **RECIPES[recipe], **spec.calib, **(calib or {})})
    elif calib:
        raise ValueError(f"method {method!r} has no calibration; got calibration settings {sorted(calib)}")
    kw.setdefault("kmeans_iters", RECIPE_KMEANS_ITERS[recipe])
    kw.setdefault("kmeans_points_per_codeword", RECIPE_KMEANS_POINTS[recipe])
    for k in VQ_SWITCHES:  # the method's own init, unless overridden
        if k in spec.vq:
            kw.setdefault(k, spec.vq[k])
    return VQConfig(bits=bits, calib=c, method=derived_name(method, c, kw), **kw)
