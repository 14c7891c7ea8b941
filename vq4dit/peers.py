"""Peer methods: what a practitioner would pick instead of VQ, each through its real library.

    from vq4dit import quantize
    from vq4dit.peers import peer_config
    quantize(transformer, peer_config("hqq-w2-g64"))   # same entry point as every vq4dit method

Fake quantization: each layer `default_filter` picks (the layers vq4dit quantizes) becomes a
`PeerLinear` holding the library's dequantized weight and a record of what the library stores for
it, counted with the rules of `layers.storage_bits`: codes as packed, side info (scales, zeros) at
its stored dtype, the bias at `layers.BIAS_BITS` (fp32, not quantized by any peer). Side info is
fp16 for every peer (HQQLinear's default compute dtype, GGUF's block scale, and what torchao and
quanto store for an fp16 model), so bits/weight compares with our fp16 codebooks.

Libraries are optional (`pip install -r benchmarks/requirements-peers.txt`), never vendored:
  hqq ............ `hqq.core.quantize.Quantizer.quantize(optimize=True, axis=1)`, 2/3/4 bit
  gguf ........... `gguf.quants.quantize` + `dequantize` (numpy reference of ggml's quantizers)
  torchao ........ `IntxWeightOnlyConfig` (group-wise intN); `Int4WeightOnlyConfig` needs the
                   mslk/CUDA kernels and does not run on CPU
  optimum-quanto . `quantize_weight` with quanto's `MaxOptimizer` (what its QLinear calls)
All peers are calibration-free and deterministic: the seed changes nothing.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .size import BIAS_BITS, PackedLayer

# ----------------------------------------------------------------------------------------
# Config and registry
# ----------------------------------------------------------------------------------------

LIBRARIES = {  # library -> (module to import, pip package)
    "hqq": ("hqq.core.quantize", "hqq"),
    "gguf": ("gguf.quants", "gguf"),
    "torchao": ("torchao.quantization", "torchao"),
    "quanto": ("optimum.quanto", "optimum-quanto"),
}
GGUF_SCHEMES = ("Q4_0", "Q5_0", "Q8_0", "TQ2_0", "Q4_1", "Q5_1", "TQ1_0")  # those gguf can quantize
SIDE_BITS = 16  # fp16 scale / zero (see the module docstring)


@dataclass
class PeerConfig:
    """One peer scheme. `quantize(model, PeerConfig(...))` applies it to the default_filter layers."""
    library: str                      # "hqq", "gguf", "torchao" or "quanto"
    scheme: str = "affine"            # hqq/torchao/quanto: "affine"; gguf: a ggml type ("Q4_0", ...)
    bits: Optional[int] = None        # code bits (hqq 2/3/4/8, torchao 1-8, quanto 2/4); gguf: from scheme
    group_size: Optional[int] = None  # weights per scale along the input dim; gguf: fixed by the type
    method: str = ""                  # name in reports (set by `peer_config`)

    def __post_init__(self):
        if self.library not in LIBRARIES:
            raise ValueError(f"unknown peer library {self.library!r}: choose one of {list(LIBRARIES)}")
        if self.library == "gguf":
            if self.scheme not in GGUF_SCHEMES:
                raise ValueError(f"gguf scheme {self.scheme!r} cannot be quantized by the gguf package: "
                                 f"choose one of {GGUF_SCHEMES}")
            if self.bits is not None or self.group_size is not None:
                raise ValueError("gguf types fix their own bits and block size: give only scheme")
            return
        allowed = {"hqq": (2, 3, 4, 8), "torchao": tuple(range(1, 9)), "quanto": (2, 4)}[self.library]
        if self.bits not in allowed:
            raise ValueError(f"{self.library} supports bits in {allowed}, got {self.bits}")
        if self.group_size is None or self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two >= 8, got {self.group_size}")
        if not self.method:
            self.method = f"{self.library}-w{self.bits}-g{self.group_size}"

    def to_dict(self) -> dict:
        return asdict(self)


def _peers() -> dict[str, PeerConfig]:
    out = {}
    for bits in (2, 3, 4):
        for g in (64, 128):
            out[f"hqq-w{bits}-g{g}"] = PeerConfig("hqq", bits=bits, group_size=g)
    for scheme in ("Q4_0", "Q5_0", "Q8_0", "TQ2_0"):
        out[f"gguf-{scheme.lower()}"] = PeerConfig("gguf", scheme)
    for bits in (2, 3, 4):
        out[f"torchao-int{bits}-g64"] = PeerConfig("torchao", bits=bits, group_size=64)
    for bits in (2, 4):
        out[f"quanto-qint{bits}-g128"] = PeerConfig("quanto", bits=bits, group_size=128)  # QLinear's default
    for name, cfg in out.items():
        cfg.method = name
    return out


PEERS: dict[str, PeerConfig] = _peers()  # names the bench and the app can request


def peer_config(name: str) -> PeerConfig:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: choose one of {list(PEERS)}")
    return PeerConfig(**PEERS[name].to_dict())


def require(library: str):
    """Import a peer library, or fail saying which pip package to install."""
    module, package = LIBRARIES[library]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"peer {library!r} needs the {package!r} package: pip install {package} "
                          f"(import of {module} failed: {e})") from e


def installed(library: str) -> bool:
    """Is the peer's library there? Found without importing it (the app lists its peers at start)."""
    import importlib.util
    module = LIBRARIES[library][0]
    try:
        return importlib.util.find_spec("optimum.quanto" if library == "quanto" else module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def code_bits(cfg: PeerConfig) -> int:
    """Code bits per weight the scheme is named by: `bits`, or a gguf type's number (Q4_0 -> 4, TQ2_0 -> 2)."""
    if cfg.bits is not None:
        return cfg.bits
    return int(cfg.scheme.lstrip("TQ")[0])


def describe(cfg: PeerConfig) -> str:
    """One line for menus: what the scheme is and that vq4dit's own settings do not apply to it."""
    group = f", group {cfg.group_size}" if cfg.group_size else ""
    scheme = cfg.scheme if cfg.library == "gguf" else "affine"
    return (f"peer: {LIBRARIES[cfg.library][1]}'s own {code_bits(cfg)}-bit {scheme} quantizer{group}, "
            "calibration-free (bit-width, k, d and the budget do not apply)")


def available(library: str) -> bool:
    try:
        require(library)
        return True
    except ImportError:
        return False

# ----------------------------------------------------------------------------------------
# The layer: a Linear with the peer's dequantized weight and its storage record
# ----------------------------------------------------------------------------------------


class PeerLinear(PackedLayer):
    """Linear whose weight is a peer library's dequantize(quantize(W)); `stored` counts its bits."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], code_bits: int, side_bits: int,
                 method: str, name: str = ""):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.method, self.name = method, name
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        n = weight.numel()
        bias_bits = self.out_features * BIAS_BITS if bias is not None else 0
        self.stored = dict(n_weights=n, index_bits=int(code_bits), side_bits=int(side_bits), bias_bits=bias_bits,
                           bits_per_weight=(code_bits + side_bits + bias_bits) / n)

    def storage_bits(self) -> dict:
        return dict(self.stored)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.method}, "
                f"bits/weight={self.stored['bits_per_weight']:.3f}")

# ----------------------------------------------------------------------------------------
# Adapters: W (out, in) fp32 -> (W_hat fp32, code bits, side bits), each through its library
# ----------------------------------------------------------------------------------------


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _hqq(w: torch.Tensor, cfg: PeerConfig):
    Quantizer = require("hqq").Quantizer
    w_q, meta = Quantizer.quantize(w.float(), nbits=cfg.bits, group_size=cfg.group_size, optimize=True,
                                   axis=1, bitpack=True, device=str(w.device))
    # HQQLinear keeps scale and zero at its compute dtype (fp16 by default): round them as stored
    scale, zero = meta["scale"].half(), meta["zero"].half()          # (out*in/g, 1) each
    meta.update(scale=scale.float(), zero=zero.float(), compute_dtype=torch.float32)
    w_hat = Quantizer.dequantize(w_q, meta).reshape(w.shape)
    # codes as packed by hqq (3-bit packs 10 codes per int32: 3.2 bits, plus row padding)
    return w_hat, _tensor_bits(w_q), (scale.numel() + zero.numel()) * SIDE_BITS


def _gguf(w: torch.Tensor, cfg: PeerConfig):
    gq = require("gguf")
    qtype = gq.GGMLQuantizationType[cfg.scheme]
    block, type_size = gq.GGML_QUANT_SIZES[qtype]
    if w.shape[1] % block:
        raise ValueError(f"gguf {cfg.scheme} needs in_features divisible by {block}, got {w.shape[1]}")
    raw = gq.quantize(w.detach().float().cpu().numpy(), qtype)    # (out, in/block * type_size) uint8
    w_hat = torch.from_numpy(gq.dequantize(raw, qtype).copy()).float().to(w.device)
    n_blocks = w.numel() // block
    # every block stores an fp16 scale d (Q4_1/Q5_1 also an fp16 min m); the rest are codes
    side = n_blocks * SIDE_BITS * (2 if cfg.scheme in ("Q4_1", "Q5_1") else 1)
    assert raw.nbytes == n_blocks * type_size
    return w_hat, raw.nbytes * 8 - side, side


def _torchao(w: torch.Tensor, cfg: PeerConfig):
    tq = require("torchao")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    tq.quantize_(lin, tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{cfg.bits}"),
                                              granularity=tq.granularity.PerGroup(cfg.group_size),
                                              scale_dtype=torch.float16))
    t = lin.weight
    w_hat = t.dequantize().float()
    # qdata is held unpacked in int8 by this CPU layout: codes counted at their packed width (bits)
    code = t.qdata.numel() * cfg.bits
    side = _tensor_bits(t.scale) + _tensor_bits(t.zero_point)     # fp16 scale, int8 zero per group
    return w_hat, code, side


def _quanto(w: torch.Tensor, cfg: PeerConfig):
    q = require("quanto")
    qtype = {2: q.qint2, 4: q.qint4}[cfg.bits]
    wh = w.detach().half()  # quanto keeps scale/shift at the weight dtype: fp16, as for an fp16 model
    scale, shift = q.MaxOptimizer()(wh, qtype=qtype, axis=0, group_size=cfg.group_size)
    t = q.quantize_weight(wh, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=cfg.group_size)
    w_hat = t.dequantize().float().reshape(w.shape)
    packed = t._data._data                                          # the uint8 bit-packed codes
    return w_hat, _tensor_bits(packed), _tensor_bits(t._scale) + _tensor_bits(t._shift)


ADAPTERS = {"hqq": _hqq, "gguf": _gguf, "torchao": _torchao, "quanto": _quanto}


@torch.no_grad()
def peer_linear(linear: nn.Linear, cfg: PeerConfig, name: str = "") -> PeerLinear:
    if cfg.group_size and linear.in_features % cfg.group_size:
        raise ValueError(f"layer {name}: in_features={linear.in_features} is not divisible by "
                         f"group_size={cfg.group_size}")
    w = linear.weight.detach().float()
    w_hat, code, side = ADAPTERS[cfg.library](w, cfg)
    if w_hat.shape != w.shape or not torch.isfinite(w_hat).all():
        raise RuntimeError(f"{cfg.method} on layer {name}: dequantized weight is {tuple(w_hat.shape)} "
                           f"or not finite (expected {tuple(w.shape)})")
    return PeerLinear(w_hat, linear.bias, code, side, cfg.method, name)
