"""Validation of a packed model before anything is built from it: every JSON field, tensor shape,
dtype, finiteness and index range is checked against the tensors actually present, so a tampered or
truncated directory is a clear ValueError instead of a hang, a crash or NaN outputs."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..config import RTN_BITS, index_bits

PACKED_CONFIG = "vq4dit_config.json"
PACKED_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: identical fp tensors stored once (`aliases`); 1 is still read
READ_VERSIONS = (1, 2)


def check_safetensors(folder: Path):
    st = list(folder.glob("*.safetensors"))
    if not st:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(other)}: pickle-based files are not loaded)" if other else ""
        raise ValueError(f"no .safetensors weights in {folder}{hint}")
    for f in st:
        with open(f, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > os.path.getsize(f):
            raise ValueError(f"{f} is not a valid safetensors file (truncated or corrupt)")



_INT_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
               "patch_size", "num_embeds_ada_norm")
_MAX_POS_ELEMENTS = 1 << 28  # positional-embedding table (positions x hidden) built at init


def restore_aliases(meta: dict, t: dict, wfile: Path):
    """Put each deduplicated copy back under its own key (the same tensor), after checking that the
    aliases name fp tensors absent from the file and point at fp tensors present in it."""
    def bad(msg):
        raise ValueError(f"{wfile.parent} is not a valid packed model: {msg}")

    if meta.get("version") not in READ_VERSIONS:
        bad(f"format version {meta.get('version')!r} is not one of {READ_VERSIONS} (written by a newer vq4dit?)")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict):
        bad("aliases is not an object")
    if meta["version"] < 2 and aliases:
        bad("aliases in a version-1 file")
    for key, target in aliases.items():
        if not (isinstance(key, str) and isinstance(target, str) and key.startswith("fp/") and target.startswith("fp/")):
            bad(f"alias {key!r} -> {target!r}: both must be fp/ tensor names")
        if key in t:
            bad(f"alias {key!r} is also stored in the file")
        if target not in t:
            bad(f"alias {key!r} points at {target!r}, which the file does not hold")
    for key, target in aliases.items():
        t[key] = t[target]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_packed(meta: dict, t: dict, wfile: Path):
    """Check every field, tensor shape, dtype, finiteness and index range against the actual tensors
    (sizes in the JSON are bounded by what the file holds), so a tampered file is a clear ValueError
    instead of a hang, a crash at the first forward, or NaN outputs."""
    def bad(msg):
        raise ValueError(f"{wfile.parent} is not a valid packed model: {msg}")

    tc, layers = meta.get("transformer_config"), meta.get("layers")
    if not isinstance(tc, dict):
        bad("transformer_config is not an object")
    if not isinstance(layers, dict) or not layers:
        bad("layers is not a non-empty object")
    skeleton = _check_transformer_config(tc, t, bad)
    modules = dict(skeleton.named_modules())
    expected_keys = set()
    for name, lay in layers.items():
        expected_keys |= _check_layer(name, lay, modules.get(name) if isinstance(name, str) else None, t, bad)
    qnames = tuple(n + "." for n in layers)
    for key, ref in skeleton.state_dict().items():
        if key.startswith(qnames):
            continue
        _tensor(t, f"fp/{key}", tuple(ref.shape), float, bad)
        expected_keys.add(f"fp/{key}")
    extra = sorted(set(t) - expected_keys)
    if extra:
        bad(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")


def _check_transformer_config(tc: dict, t: dict, bad):
    """The transformer config's fields against the tensors present; returns the DiT's module
    structure built on the meta device (no memory), to compare names and shapes against."""
    for f in _INT_FIELDS:
        if not _is_int(tc.get(f)) or not 1 <= tc[f] <= 1 << 16:
            bad(f"transformer_config.{f} must be an integer in [1, 65536], got {tc.get(f)!r}")
    if tc.get("out_channels") is not None and (not _is_int(tc["out_channels"]) or not 1 <= tc["out_channels"] <= 1 << 16):
        bad(f"transformer_config.out_channels must be an integer, got {tc.get('out_channels')!r}")
    # sizes implied by the tensors actually present
    blocks = {int(m.group(1)) for k in t for m in [re.match(r"(?:fp/|vq/|rtn/)transformer_blocks\.(\d+)\.", k)] if m}
    if blocks != set(range(len(blocks))):
        bad(f"transformer block indices in the weights are not 0..n-1: {sorted(blocks)[:8]}")
    if tc["num_layers"] != len(blocks):
        bad(f"transformer_config.num_layers={tc['num_layers']} but the weights hold {len(blocks)} blocks")
    hidden = tc["num_attention_heads"] * tc["attention_head_dim"]
    pe = t.get("fp/pos_embed.proj.weight")
    want = (hidden, tc["in_channels"], tc["patch_size"], tc["patch_size"])
    if pe is None or tuple(pe.shape) != want:
        bad(f"fp/pos_embed.proj.weight has shape {None if pe is None else tuple(pe.shape)}, config implies {want}")
    if (tc["sample_size"] // tc["patch_size"]) ** 2 * hidden > _MAX_POS_ELEMENTS:
        bad(f"sample_size={tc['sample_size']} is too large for this model")
    from diffusers import DiTTransformer2DModel
    try:
        with torch.device("meta"):
            return DiTTransformer2DModel.from_config(tc)
    except Exception as e:
        bad(f"transformer_config cannot build a DiT: {type(e).__name__}: {e}")


def _check_layer(name, lay, lin, t: dict, bad) -> set:
    """One quantized layer's layout against the DiT's Linear `lin` and its tensors; returns its keys."""
    where = f"layer {name!r}"
    if not isinstance(lin, torch.nn.Linear):
        bad(f"{where} is not a Linear layer of this DiT")
    if not isinstance(lay, dict):
        bad(f"{where}: layout is not an object")
    shape = lay.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(v) for v in shape)
            or tuple(shape) != (lin.out_features, lin.in_features)):
        bad(f"{where}: shape {shape!r} does not match the DiT's ({lin.out_features}, {lin.in_features})")
    out_f, in_f = shape
    has_bias = lay.get("bias")
    if not isinstance(has_bias, bool) or has_bias != (lin.bias is not None):
        bad(f"{where}: bias must be {lin.bias is not None}, got {has_bias!r}")
    kind = lay.get("kind")
    if kind == "vq":
        keys = _check_vq_tensors(name, lay, out_f, in_f, t, bad)
    elif kind == "rtn":
        keys = _check_rtn_tensors(name, lay, out_f, in_f, t, bad)
    else:
        bad(f"{where}: kind must be 'vq' or 'rtn', got {kind!r}")
    if has_bias:
        _tensor(t, f"{kind}/{name}/bias", (out_f,), float, bad)
        keys.append("bias")
    return {f"{kind}/{name}/{k}" for k in keys}


def _check_vq_tensors(name, lay: dict, out_f: int, in_f: int, t: dict, bad) -> list[str]:
    where = f"layer {name!r}"
    k, d, n = lay.get("k"), lay.get("d"), lay.get("n_candidates", 2)
    if not _is_int(k) or not 2 <= k <= 65536 or k & (k - 1):
        bad(f"{where}: k must be a power of two in [2, 65536], got {k!r}")
    if not _is_int(d) or not 1 <= d <= 64 or in_f % d:
        bad(f"{where}: d must be an integer in [1, 64] dividing {in_f}, got {d!r}")
    if not _is_int(n) or not 1 <= n <= k:
        bad(f"{where}: n_candidates must be an integer in [1, k], got {n!r}")
    _tensor(t, f"vq/{name}/codebook", (k, d), float, bad)
    s_count = out_f * in_f // d
    _tensor(t, f"vq/{name}/indices", (math.ceil(s_count * index_bits(k) / 8),), torch.uint8, bad)
    return ["codebook", "indices"]


def _check_rtn_tensors(name, lay: dict, out_f: int, in_f: int, t: dict, bad) -> list[str]:
    where = f"layer {name!r}"
    bits, per_channel = lay.get("bits"), lay.get("per_channel")
    if bits not in RTN_BITS or not _is_int(bits):
        bad(f"{where}: bits must be one of {RTN_BITS}, got {bits!r}")
    if not isinstance(per_channel, bool):
        bad(f"{where}: per_channel must be true or false, got {per_channel!r}")
    rows = out_f if per_channel else 1
    _tensor(t, f"rtn/{name}/codes", (math.ceil(out_f * in_f * bits / 8),), torch.uint8, bad)
    scale = _tensor(t, f"rtn/{name}/scale", (rows, 1), float, bad)
    zero = _tensor(t, f"rtn/{name}/zero", (rows, 1), torch.uint8, bad)
    if (scale <= 0).any():
        bad(f"{where}: scales must be positive")
    if zero.numel() and int(zero.max()) > 2 ** bits - 1:
        bad(f"{where}: zero points exceed {2 ** bits - 1}")
    return ["codes", "scale", "zero"]


def _tensor(t: dict, key: str, shape: tuple, dtype, bad):
    """t[key] with exactly `shape`; dtype float (any floating type, all finite) or an exact dtype."""
    v = t.get(key)
    if v is None:
        bad(f"tensor {key} is missing")
    if tuple(v.shape) != tuple(shape):
        bad(f"tensor {key} has shape {tuple(v.shape)}, expected {tuple(shape)}")
    if dtype is float:
        if not v.dtype.is_floating_point:
            bad(f"tensor {key} has dtype {v.dtype}, expected a floating-point type")
        if not torch.isfinite(v).all():
            bad(f"tensor {key} has {int((~torch.isfinite(v)).sum())} NaN/Inf values")
    elif v.dtype != dtype:
        bad(f"tensor {key} has dtype {v.dtype}, expected {dtype}")
    return v
