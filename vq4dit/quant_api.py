"""The in-place entry point: `quantize(model, config)` swaps layers, runs k-means and, when the
config asks for it, calibration. Every method (VQ4DiT and each baseline) goes through it.

    from vq4dit import quantize, method_config
    trace = quantize(transformer, method_config("vq4dit", bits=2))
    size_summary(transformer)   # bits/weight and bytes, as packed (vq4dit.size)
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from .calibrate import calibrate, collect_input_moments
from .config import CalibConfig, RTNConfig, VQConfig
from .layers import RTNLinear, VQLinear
from .naming import default_filter
from .peers import PeerConfig, peer_linear

# ----------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------

def check_finite(model: nn.Module):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise ValueError(f"parameter {name} has {bad} NaN/Inf values: refusing to quantize")


def replace_module(model: nn.Module, fqn: str, new: nn.Module):
    """Put `new` at the dotted name `fqn` of `model` (quantize and the packed loader swap layers so)."""
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
    power = {}
    if cfg.activation_aware:  # E[x^2] of every target's input, from the (still FP) model's trajectories
        calib = cfg.calib or CalibConfig(iterations=1, num_sampling_steps=10, teacher_sampler="ddim")
        device = next(model.parameters()).device
        power = {n: h.diagonal().clone() for n, h in
                 collect_input_moments(model, [n for n, _ in targets], calib, device).items()}
    originals = {}  # FP weights for calibration (candidate sets); k-means alone lets them go
    for i, (name, lin) in enumerate(progress(targets, desc=f"k-means k={cfg.k} d={cfg.d}")):
        q = VQLinear.from_linear(lin, cfg, name=name, seed=cfg.seed + i, input_power=power.get(name))
        if cfg.calib is not None:
            originals[name] = lin.weight.detach()
        replace_module(model, name, q)
    return originals


def _quantize_rtn(model, cfg: RTNConfig, targets, progress):
    for name, lin in progress(targets, desc=f"RTN {cfg.bits}-bit"):
        replace_module(model, name, RTNLinear.from_linear(lin, cfg, name=name))
    return {}


def _quantize_peer(model, cfg: PeerConfig, targets, progress):
    for name, lin in progress(targets, desc=cfg.method):  # a peer library's fake quantization
        replace_module(model, name, peer_linear(lin, cfg, name=name))
    return {}


_QUANTIZERS = {VQConfig: _quantize_vq, RTNConfig: _quantize_rtn, PeerConfig: _quantize_peer}


def quantize(model: nn.Module, config, filter_fn=default_filter, teacher: Optional[nn.Module] = None,
             on_step=None, progress: bool = True):
    """Quantize `model` in place: swap target Linears, k-means init, then calibrate if the config asks.

    Returns the calibration `Trace` (None for methods without calibration). `teacher` defaults to
    a full-precision copy of `model` taken before quantizing. `on_step(info)` is called after each
    calibration step; returning False (or raising KeyboardInterrupt) stops calibration cleanly.
    `progress`: True = tqdm bars, False = silent, or a callable `progress(iterable, desc)` that wraps
    the per-layer quantization loop (k-means) and yields its items (the app uses it for its status).

    Sets `model.vq4dit_config = config`: the config this model was quantized with, which
    `save_quantized` records in the packed directory and `load_quantized` restores.
    """
    if type(config) not in _QUANTIZERS:
        raise TypeError(f"unsupported config type {type(config).__name__}: use method_config(...) "
                        f"or vq4dit.peers.peer_config(...)")
    check_finite(model)
    targets = _targets(model, filter_fn)
    if not targets:
        raise ValueError("no target layers found: expected nn.Linear layers under 'transformer_blocks.' "
                         "(is this a diffusers DiTTransformer2DModel?)")
    needs_teacher = isinstance(config, VQConfig) and config.calib is not None
    if needs_teacher and teacher is None:
        teacher = copy.deepcopy(model).eval()
    bar = progress if callable(progress) else _progress if progress else (lambda it, desc=None: it)
    originals = _QUANTIZERS[type(config)](model, config, targets, bar)
    model.vq4dit_config = config  # what save_quantized records (see the docstring)
    if not needs_teacher:
        return None
    return calibrate(model, teacher, config, originals, on_step=on_step, progress=progress is True)


def _progress(it, desc=None):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)
