"""Forms: the values of a group of components, by name.

Gradio passes component values positionally; `form_event` turns them into the form dataclass
(`SetupForm`, `ImageForm`, `ViewForm`) so a handler reads `form.bits`, not its 7th argument.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from .config import RunRequest



@dataclass
class SetupForm:
    """The Set-up panel (field order = the /run endpoint's parameter order)."""
    method: str
    bits: Any
    k: Any
    d: Any
    n_candidates: Any
    iterations: Any
    sampling_steps: Any
    kmeans_iters: Any
    lr_logits: Any
    lr_codebook: Any
    lambda_r: Any
    seed: Any

    def settings(self, calib_defaults: dict) -> RunRequest:
        """RunRequest for the library; ValueError naming the field when a value is not usable."""
        def i(v, name):
            if v is None or v == "":
                raise ValueError(f"{name} is empty")
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite whole number, got {v}")
            if float(v) != int(float(v)):
                raise ValueError(f"{name} must be a whole number, got {v}")
            return int(float(v))
        calib = dict(calib_defaults, iterations=i(self.iterations, "iterations"),
                     num_sampling_steps=i(self.sampling_steps, "sampling steps"),
                     lr_logits=float(self.lr_logits), lr_codebook=float(self.lr_codebook),
                     lambda_r=float(self.lambda_r), seed=i(self.seed, "seed"))
        return RunRequest(method=self.method, bits=i(self.bits, "bits"), k=i(self.k, "k"), d=i(self.d, "d"),
                           n_candidates=i(self.n_candidates, "candidates n"),
                           kmeans_iters=i(self.kmeans_iters, "k-means iterations"), seed=i(self.seed, "seed"),
                           calib=calib)


@dataclass
class ImageForm:
    """The Images tab's controls plus the run they sample (and the picked comparison run)."""
    run: Optional[str]
    labels: str
    seed: Any
    guidance: Any
    steps: Any
    compare: Optional[str] = None   # "" / None = automatic baselines


@dataclass
class ViewForm:
    """What the layer views read: the shared selection and the cluster-view options."""
    sel: Optional[dict]
    color_by: str
    projection: str
    full: bool = False   # every sub-vector of the final model as a density image


def form_inputs(form_cls, ui) -> list:
    """The components of `form_cls`, in field order (attribute names of `ui` = field names)."""
    return [getattr(ui, f.name) for f in fields(form_cls)]


def form_event(fn, form_cls, lead: int = 0):
    """Adapter for Gradio: the first `lead` values are passed as they are, the rest become one
    `form_cls`. Keeps generator functions generators (Gradio streams them) and the name (api_name)."""
    if inspect.isgeneratorfunction(fn):
        def event(*values):
            yield from fn(*values[:lead], form_cls(*values[lead:]))
    else:
        def event(*values):
            return fn(*values[:lead], form_cls(*values[lead:]))
    event.__name__ = event.__qualname__ = fn.__name__
    event.__doc__ = fn.__doc__
    return event
