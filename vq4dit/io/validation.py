"""Validation of a packed model before anything is built from it: every JSON field, tensor shape,
dtype, finiteness and index range is checked against the tensors actually present, so a tampered or
truncated directory is a clear ValueError instead of a hang, a crash or NaN outputs."""
from __future__ import annotations

import json
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


MAX_JSON_BYTES = 16 << 20  # config, scheduler and index files are a few KB; a bigger one is not ours


def read_json_file(path: Path, what: str = "file", kind=dict):
    """Parse a small JSON file into `kind` (dict by default) with one clear error naming the file:
    missing, too large, not JSON, too deeply nested, or the wrong top-level type."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path} is {path.stat().st_size} bytes: too large for a {what} "
                             f"(at most {MAX_JSON_BYTES >> 20} MB); replace it with the original file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}): replace it with the original file") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be a {what}: replace it with the "
                         f"original file") from None
    if kind is not None and not isinstance(data, kind):
        raise ValueError(f"{what} {path} holds a JSON {type(data).__name__}, expected an object: "
                         f"replace it with the original file")
    return data


def _check_header(f: Path):
    with open(f, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > os.path.getsize(f):
        raise ValueError(f"{f} is not a valid safetensors file (truncated or corrupt)")


def check_weight_index(index: Path):
    """A `*.index.json` (sharded weights) may only name plain `.safetensors` files that exist in its
    own folder: diffusers would otherwise `torch.load` (unpickle) a `.bin`/`.pt` shard it names."""
    def bad(msg):
        raise ValueError(f"{index} {msg}: only .safetensors shards in the same folder are loaded; "
                         f"convert the shards to safetensors or remove the index")

    data = read_json_file(index, "weight index")
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        bad("has no weight_map object")
    odd = [v for v in wmap.values() if not isinstance(v, str)]
    if odd:
        bad(f"maps a weight to {odd[0]!r}, which is not a file name")
    for shard in sorted(set(wmap.values())):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            bad(f"names the shard {shard!r} outside its folder")
        if not shard.endswith(".safetensors"):
            bad(f"maps weights to {shard!r}, which is not a .safetensors file (pickle-based shards are never "
                f"read; only .safetensors files are)")
        f = index.parent / shard
        if not f.is_file() or f.is_symlink():
            bad(f"names the shard {shard!r}, which is missing (or a link)")
        _check_header(f)


def check_safetensors(folder: Path):
    st = list(folder.glob("*.safetensors"))
    if not st:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(other)}: pickle-based files are not loaded)" if other else ""
        raise ValueError(f"no .safetensors weights in {folder}{hint}")
    for f in st:
        _check_header(f)
    for index in folder.glob("*.index.json"):  # sharded weights (any variant): every shard is checked
        check_weight_index(index)


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
    # the module structure on the meta device (no memory): names and shapes to compare against
    from diffusers import DiTTransformer2DModel
    try:
        with torch.device("meta"):
            skeleton = DiTTransformer2DModel.from_config(tc)
    except Exception as e:
        bad(f"transformer_config cannot build a DiT: {type(e).__name__}: {e}")
    modules = dict(skeleton.named_modules())
    expected_keys = set()
    for name, lay in layers.items():
        where = f"layer {name!r}"
        lin = modules.get(name) if isinstance(name, str) else None
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
            k, d, n = lay.get("k"), lay.get("d"), lay.get("n_candidates", 2)
            if not _is_int(k) or not 2 <= k <= 65536 or k & (k - 1):
                bad(f"{where}: k must be a power of two in [2, 65536], got {k!r}")
            if not _is_int(d) or not 1 <= d <= 64 or in_f % d:
                bad(f"{where}: d must be an integer in [1, 64] dividing {in_f}, got {d!r}")
            if not _is_int(n) or not 1 <= n <= k:
                bad(f"{where}: n_candidates must be an integer in [1, k], got {n!r}")
            cb = _tensor(t, f"vq/{name}/codebook", (k, d), float, bad)
            s_count = out_f * in_f // d
            idx = _tensor(t, f"vq/{name}/indices", (math.ceil(s_count * index_bits(k) / 8),), torch.uint8, bad)
            del cb, idx
            keys = ["codebook", "indices"] + (["bias"] if has_bias else [])
            prefix = "vq"
        elif kind == "rtn":
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
            keys = ["codes", "scale", "zero"] + (["bias"] if has_bias else [])
            prefix = "rtn"
        else:
            bad(f"{where}: kind must be 'vq' or 'rtn', got {kind!r}")
        if has_bias:
            _tensor(t, f"{prefix}/{name}/bias", (out_f,), float, bad)
        expected_keys.update(f"{prefix}/{name}/{k}" for k in keys)
    qnames = tuple(n + "." for n in layers)
    for key, ref in skeleton.state_dict().items():
        if key.startswith(qnames):
            continue
        _tensor(t, f"fp/{key}", tuple(ref.shape), float, bad)
        expected_keys.add(f"fp/{key}")
    extra = sorted(set(t) - expected_keys)
    if extra:
        bad(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")


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
