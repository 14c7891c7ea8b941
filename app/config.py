"""What the app is told: server-side options (`AppConfig`), one run's request (`RunRequest`), and the
documented limits every request is checked against before any work starts.

A run's config is built by the library's one adapter, `vq4dit.config.build_config`, with the loaded
model's recipe (`recipe="auto"`: `small` on the embedded digits DiT): the CLI and the bench call the
same function, so the same choices give the same config everywhere (tests/test_app_config.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vq4dit.config import DEFAULT_METHOD, METHODS, build_config
from vq4dit.peers import PEERS, installed
from vq4dit.testbed import DIGITS_DIT_DIR

ROOT = Path(__file__).resolve().parent.parent

# Documented limits of what the app accepts (README "Safety"); checked before any work is done.
APP_LIMITS = dict(iterations=10_000, sampling_steps=1000, total_steps=500_000, kmeans_iters=1000, k=65536,
                  d=64, n_candidates=16, seed=2 ** 32 - 1, image_labels=32, image_steps=1000, guidance=100.0)
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The calibration fields the Set-up panel shows; every other one comes from the recipe.
FORM_CALIB_KEYS = ("iterations", "num_sampling_steps", "lr_logits", "lr_codebook", "lambda_r")


@dataclass
class AppConfig:
    """What `python app.py` flags set. None = the library's recipe for the loaded model."""
    model: str = str(DIGITS_DIT_DIR)
    runs_dir: str = str(ROOT / "runs")
    device: Optional[str] = None
    iterations: Optional[int] = None      # calibration trajectories (default: the model's recipe)
    sampling_steps: Optional[int] = None  # teacher steps per trajectory (default: the model's recipe)
    kmeans_iters: Optional[int] = None    # default: the model's recipe (RECIPE_KMEANS_ITERS)
    eval_per_class: int = 5               # images per class for a run's accuracy / FD-digits / PSNR
    eval_steps: int = 25                  # sampler steps for those images
    image_steps: int = 25                 # default sampler steps in the Images view
    warm_umap: bool = True                # compile umap's numba code in the background at start
    demo_runs: bool = True                # list the shipped demo runs (embedded model only; read-only)
    cache_weights: bool = False           # packed runs keep decoded weights (faster, more memory; io.load_quantized)
    threads: Optional[int] = None         # torch CPU threads of the calibration worker (None: the server's)
    cancel_grace_s: float = 120.0         # after Cancel, a worker silent this long is terminated (one XL step fits)
    spare_worker: bool = True             # start the next run's worker ahead: Run skips its imports (3-4 CPU s)


@dataclass
class RunRequest:
    """One run as the Set-up panel asks for it: flat choices, turned into the library's config by
    `build_config` (None = not chosen: the method's or the recipe's value)."""
    method: str = DEFAULT_METHOD
    bits: int = 2
    k: Optional[int] = None
    d: Optional[int] = None
    n_candidates: int = 2
    kmeans_iters: Optional[int] = None
    seed: int = 0
    init: Optional[str] = None                  # one of vq4dit.config.INITS; None = the method's own
    calib: dict = field(default_factory=dict)   # CalibConfig overrides (the form's fields)
    recipe: str = "auto"                        # "auto": the model's recipe (vq4dit.config.default_recipe)

    def config(self, n_quantizable_weights: Optional[int] = None, model=None):
        """The library's validated config (ValueError with a clear message when invalid). App limits
        (APP_LIMITS) are checked first, before anything is allocated. The seed seeds both k-means
        and calibration, as on the CLI."""
        self.check_limits()
        if self.method in PEERS:  # a peer library's fixed scheme: bits, k, d and the budget do not apply
            if not installed(PEERS[self.method].library):
                raise ValueError(f"peer {self.method!r} needs its library: pip install -r benchmarks/requirements-peers.txt")
            return build_config(self.method)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {app_methods()}")
        calib = dict(self.calib or {}, seed=self.seed)
        return build_config(self.method, bits=self.bits, k=self.k, d=self.d, init=self.init, recipe=self.recipe,
                            model=model, n_quantizable_weights=n_quantizable_weights, calib=calib,
                            n_candidates=self.n_candidates, kmeans_iters=self.kmeans_iters, seed=self.seed)

    def check_limits(self):
        L = APP_LIMITS
        for name, v, lo, hi in (("k", self.k, 2, L["k"]), ("d", self.d, 1, L["d"]),
                                ("candidates n", self.n_candidates, 1, L["n_candidates"]),
                                ("k-means iterations", self.kmeans_iters, 1, L["kmeans_iters"]),
                                ("seed", self.seed, 0, L["seed"]), ("bits", self.bits, 1, 8)):
            if v is not None:
                whole_number(v, name, lo, hi)
        c = self.calib or {}
        it = whole_number(c.get("iterations", 1), "iterations", 1, L["iterations"])
        st = whole_number(c.get("num_sampling_steps", 1), "sampling steps", 1, L["sampling_steps"])
        if "labels_per_iteration" in c:
            whole_number(c["labels_per_iteration"], "labels per iteration", 1, 256)
        if calibrated(self.method) and it * st > L["total_steps"]:
            raise ValueError(f"iterations x sampling steps = {it * st} optimizer steps is over the app's limit of "
                             f"{L['total_steps']}: use the library or the CLI for longer runs")
        for key in ("lr_logits", "lr_codebook", "lambda_r", "guidance_scale"):
            if key in c:
                try:
                    f = float(c[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{key} must be a number, got {c[key]!r}") from None
                if not math.isfinite(f):
                    raise ValueError(f"{key} must be a finite number, got {c[key]!r}")


def setup_defaults(cfg: AppConfig, n_quantizable_weights: int) -> tuple[dict, int]:
    """(calibration fields, k-means iterations) the Set-up panel opens with: the default method's
    config for this model (its recipe), then the command-line overrides."""
    c = build_config(DEFAULT_METHOD, recipe="auto", n_quantizable_weights=n_quantizable_weights)
    calib = {k: getattr(c.calib, k) for k in FORM_CALIB_KEYS}
    if cfg.iterations is not None:
        calib["iterations"] = cfg.iterations
    if cfg.sampling_steps is not None:
        calib["num_sampling_steps"] = cfg.sampling_steps
    return calib, int(cfg.kmeans_iters or c.kmeans_iters)


def app_methods() -> list[str]:
    """The Set-up panel's methods: every vq4dit method, then each peer whose library is installed."""
    return list(METHODS) + [n for n, c in PEERS.items() if installed(c.library)]


def is_peer(method: Optional[str]) -> bool:
    """A calibration-free peer scheme (vq4dit.peers): its runs keep no packed model (see RunStore)."""
    return method in PEERS


def calibrated(method: str) -> bool:
    """Does a run of `method` record a Trace? (derived names map to their registry entry)"""
    spec = method_spec(method)
    return spec is not None and spec.calibrated


def method_spec(method: Optional[str]):
    """Registry entry of a run's method, derived names ('m+switch=..', see
    `vq4dit.config.derived_name`) mapped to m; None if unknown. The app's one parser of method names."""
    return METHODS.get(str(method or "").split("+", 1)[0])


# ----------------------------------------------------------------------------------------
# Number and file validation (before anything is computed)
# ----------------------------------------------------------------------------------------


def whole_number(v, name: str, lo: int, hi: int) -> int:
    """An integer setting in [lo, hi] (bools, NaN, inf and fractions refused)."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    if not lo <= int(f) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {int(f)}")
    return int(f)


def image_params(seed, guidance, steps) -> tuple[int, float, int]:
    """Validated (seed, guidance, steps) of an Images request, before anything is sampled."""
    seed = whole_number(0 if seed is None or seed == "" else seed, "image seed", 0, APP_LIMITS["seed"])
    steps = whole_number(1 if steps is None or steps == "" else steps, "sampler steps", 1, APP_LIMITS["image_steps"])
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number, got {guidance!r}") from None
    if not (math.isfinite(g) and 0 <= g <= APP_LIMITS["guidance"]):
        raise ValueError(f"guidance scale must be in [0, {APP_LIMITS['guidance']:g}], got {guidance!r}")
    return seed, g, steps


def _num_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


# Caps on what a run.json may claim (a run of any DiT fits far inside them); a run beyond them is unreadable.
RUN_JSON_MAX_BYTES = 8 << 20
RUN_INT_CAPS = dict(k=65536, d=64, n_blocks=1024, steps_done=10 ** 9, total_steps=10 ** 9, n_candidates=65536)


def run_meta_error(meta) -> Optional[str]:
    """Why a run.json cannot be shown (None when it is fine): every field the views read is checked."""
    if not isinstance(meta, dict):
        return "run.json is not an object"
    if not isinstance(meta.get("method"), str) or (meta["method"] not in METHODS and meta["method"] not in PEERS):
        return f"unknown method {str(meta.get('method'))[:40]!r}"
    b = meta.get("bits")
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
        return f"bits is not an integer in [1, 16] ({str(b)[:20]!r})"
    for key, cap in RUN_INT_CAPS.items():
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= cap):
            return f"{key} is not an integer in [0, {cap}] ({str(v)[:20]!r})"
    for key in ("bits_per_weight", "block_mse", "seconds", "quantize_seconds"):
        if not _num_or_none(meta.get(key)):
            return f"{key} is not a number"
    for key in ("metrics", "fp_metrics"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, dict) or not all(_num_or_none(x) for x in v.values())):
            return f"{key} is not an object of numbers"
    pb = meta.get("per_block_mse")
    if pb is not None and (not isinstance(pb, list) or not all(_num_or_none(x) for x in pb)):
        return "per_block_mse is not a list of numbers"
    for key in ("status", "stopped"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"{key} is not a string"
    return None
