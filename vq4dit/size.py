"""Bit accounting: the one place. What a packed layer stores (`vq_storage_bits`,
`rtn_storage_bits`, counting exactly what `io.save_quantized` writes), and per-layer / per-model
reports over the quantized layers of a model (`size_report`, `size_summary`).

    size_summary(transformer)   # bits/weight and bytes, as packed
"""
from __future__ import annotations

import math

import torch.nn as nn

from .config import index_bits
from .naming import block_index, layer_type

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



class PackedLayer(nn.Module):
    """A quantized layer (VQLinear, RTNLinear): stored packed, it reports what it stores."""
    in_features: int
    out_features: int

    def storage_bits(self) -> dict:
        raise NotImplementedError


def storage_bits(layer: nn.Module) -> dict:
    if not isinstance(layer, PackedLayer):
        raise TypeError(f"not a quantized layer: {type(layer).__name__}")
    return layer.storage_bits()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLayer)}


def size_report(model: nn.Module):
    """Per-layer storage of the quantized layers as packed (pandas DataFrame).

    bits_per_weight counts everything stored for a layer: indices + codebook at its stored dtype
    (VQ) or codes + fp16 scale and uint8 zero point (RTN), and the layer's fp32 bias.
    Non-quantized parameters are counted in `attrs["fp_params"]`.
    """
    import pandas as pd
    q = quantized_layers(model)
    rows = [dict(layer=name, block=block_index(name), type=layer_type(name),
                 shape=f"{m.out_features}x{m.in_features}", **storage_bits(m)) for name, m in q.items()]
    df = pd.DataFrame(rows)
    df.attrs["fp_params"] = sum(p.numel() for n, p in model.named_parameters()
                                if not any(n.startswith(name + ".") for name in q))
    return df


def size_summary(model: nn.Module) -> dict:
    df = size_report(model)
    tot = {c: int(df[c].sum()) if len(df) else 0 for c in ("n_weights", "index_bits", "side_bits", "bias_bits")}
    n_w = max(tot["n_weights"], 1)
    return dict(quantized_weights=tot["n_weights"], index_bytes=math.ceil(tot["index_bits"] / 8),
                side_bytes=math.ceil(tot["side_bits"] / 8), bias_bytes=math.ceil(tot["bias_bits"] / 8),
                bits_per_weight=(tot["index_bits"] + tot["side_bits"] + tot["bias_bits"]) / n_w,
                index_bits_per_weight=tot["index_bits"] / n_w, fp_params=df.attrs.get("fp_params", 0))
