"""One quantization run and its evaluation: the shared path of the benchmark and the app.

    teacher = load_dit(DIGITS_DIT_DIR).transformer
    result = run_method(teacher, "vq4dit", bits=2)   # recipe "auto": the model's own
    fp = generate(teacher, EvalSpec())
    q = generate(result.model, EvalSpec())
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .config import build_config
from .metrics import block_mse
from .quant_api import quantize
from .size import size_summary
from .trace import Trace
from .sampling import sample

@dataclass
class RunResult:
    method: str
    bits: int
    model: torch.nn.Module
    config: object
    trace: Optional[Trace]
    seconds: float            # calibration (and k-means) wall time
    size: dict                # size_summary: bits_per_weight incl. codebooks, bytes
    block_mse: float = float("nan")
    per_block_mse: list = field(default_factory=list)

    def summary(self) -> dict:
        cfg = self.config
        return dict(method=self.method, bits=self.bits, k=getattr(cfg, "k", None), d=getattr(cfg, "d", None),
                    bits_per_weight=self.size["bits_per_weight"], block_mse=self.block_mse,
                    seconds=self.seconds, index_bytes=self.size["index_bytes"], side_bytes=self.size["side_bytes"],
                    stopped=(self.trace.meta.get("stopped") if self.trace is not None else None),
                    **self.budget())

    def budget(self) -> dict:
        """Steps run, steps with soft layers (about 3x a hard step's cost), the last step a layer
        switched to hard by itself, and how many layers `finalize` forced (issue 19)."""
        m = self.trace.meta if self.trace is not None else {}
        return dict(steps=m.get("steps_done"), soft_steps=m.get("soft_steps"),
                    last_switch_step=m.get("last_switch_step"), forced_layers=m.get("forced_layers"))


def run_method(teacher, method: Optional[str] = None, bits: int = 2, calib: Optional[dict] = None,
               vq: Optional[dict] = None, recipe: str = "auto",
               on_step: Optional[Callable[[dict], Optional[bool]]] = None, progress=True,
               measure_block_mse: bool = True, config=None) -> RunResult:
    """Quantize a copy of `teacher` with `method` at `bits`; the teacher is left untouched.

    The config comes from `build_config` (the one adapter every front end uses): `recipe="auto"`
    is the teacher's own recipe (small models get "small"), `calib` and `vq` override it and are
    ignored for methods without calibration / codebooks (RTN). Or pass a built `config`."""
    if config is None:
        if method is None:
            raise ValueError("run_method needs a method name or a built config")
        config = build_config(method, bits=bits, recipe=recipe, model=teacher, calib=calib, **(vq or {}))
    bits = config.bits if config.bits is not None else bits
    model = copy.deepcopy(teacher).eval()
    t0 = time.time()
    trace = quantize(model, config, teacher=teacher, on_step=on_step, progress=progress)
    seconds = time.time() - t0
    model.eval()
    res = RunResult(config.method, bits, model, config, trace, seconds, size_summary(model))
    if measure_block_mse:
        m = block_mse(model, teacher)
        res.block_mse, res.per_block_mse = m["mean"], m["per_block"]
    return res


@dataclass
class EvalSpec:
    """Same seeds, labels and sampler for every model compared."""
    n_per_class: int = 10
    num_classes: int = 10
    guidance_scale: float = 4.0
    num_steps: int = 50
    seed: int = 0
    batch: int = 100

    def labels(self) -> list[int]:
        return [c for c in range(self.num_classes) for _ in range(self.n_per_class)]


@torch.no_grad()
def generate(model, spec: EvalSpec, scheduler=None, vae=None, on_step=None) -> torch.Tensor:
    """Images for spec.labels(); batch b uses seed spec.seed + b so any model sees the same noise.
    `on_step(i, x)`: called after each denoising step of each batch (progress)."""
    labels = spec.labels()
    out = []
    for b, s in enumerate(range(0, len(labels), spec.batch)):
        out.append(sample(model, labels[s:s + spec.batch], num_steps=spec.num_steps,
                          guidance_scale=spec.guidance_scale, seed=spec.seed + b, scheduler=scheduler, vae=vae,
                          on_step=on_step))
    return torch.cat(out)
