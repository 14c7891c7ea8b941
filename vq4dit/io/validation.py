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
_ALIAS_FLOOR_BYTES, _ALIAS_FACTOR = 256 << 20, 64  # DiT-XL/2: 28 embedder copies, far below 64x the file


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
    copied = sum(t[target].numel() * t[target].element_size() for target in aliases.values())
    on_disk = wfile.stat().st_size if wfile.is_file() else 0
    if copied > max(_ALIAS_FLOOR_BYTES, _ALIAS_FACTOR * on_disk):  # each alias becomes its own copy when loaded
        bad(f"aliases would expand a {on_disk >> 10} KB file by {copied >> 20} MB of copies: not a packed model")
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
    skeleton = _check_transformer_config(tc, t, bad, wfile)
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


def _check_transformer_config(tc: dict, t: dict, bad, wfile: Path):
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
    on_disk = wfile.stat().st_size if wfile.is_file() else 0
    if pos_table_bytes(tc) > max(_POS_FLOOR_BYTES, on_disk):  # memory bounded by the bytes on disk
        bad(f"sample_size={tc['sample_size']} would build a {pos_table_bytes(tc) >> 20} MB positional table "
            f"for a {on_disk >> 10} KB file: too large for this model")
    # the module structure on the meta device (no memory): names and shapes to compare against
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


# ----------------------------------------------------------------------------------------
# Full-precision configs and schedulers: checked against the weights (headers only) before anything
# is allocated, every float finite, sizes bounded by the bytes actually on disk.
# ----------------------------------------------------------------------------------------

_POS_FLOOR_BYTES = 64 << 20  # a positional table this small is always allowed (DiT-XL/2 512px: 4.7 MB)
_FLOAT_WEIGHT_DTYPES = {"F16", "BF16", "F32", "F64"}


def weight_headers(folder: Path) -> tuple[dict, int]:
    """{tensor name: (shape, dtype string)} from the safetensors headers (no tensor data is read) and
    the total bytes of those files."""
    from safetensors import safe_open
    out, total = {}, 0
    for f in sorted(folder.glob("*.safetensors")):
        total += f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    s = fh.get_slice(k)
                    out[k] = (tuple(s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{f} is not a valid safetensors file ({type(e).__name__}): "
                             f"replace it with the original file") from None
    return out, total


def pos_table_bytes(tc: dict) -> int:
    """Bytes of the float32 positional-embedding table a DiT builds at init (before any weight loads)."""
    return (tc["sample_size"] // tc["patch_size"]) ** 2 * tc["num_attention_heads"] * tc["attention_head_dim"] * 4


def check_finite_floats(cfg: dict, where) -> None:
    for k, v in cfg.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: {k} is {v}: every number in it must be finite; "
                             f"replace it with the original file")


def check_transformer_config(cfg: dict, folder: Path) -> None:
    """config.json of an FP DiT against its safetensors headers, before the model is built: integer
    sizes in range and equal to what the weights hold, finite floats, floating-point weights only,
    and a positional table bounded by the bytes on disk."""
    where = folder / "config.json"

    def bad(msg):
        raise ValueError(f"{where}: {msg}")

    check_finite_floats(cfg, where)
    for f in _INT_FIELDS:
        if f == "num_embeds_ada_norm" and cfg.get(f) is None:
            continue
        if f in cfg and (not _is_int(cfg[f]) or not 1 <= cfg[f] <= 1 << 16):
            bad(f"{f} must be an integer in [1, 65536], got {cfg.get(f)!r}")
    eps = cfg.get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        bad(f"norm_eps must be a number in (0, 1), got {eps!r}")
    heads = {}
    headers, total = weight_headers(folder)
    for k, (shape, dtype) in headers.items():
        if dtype not in _FLOAT_WEIGHT_DTYPES:
            bad(f"weight {k} has dtype {dtype}: a DiT's weights are floating point (F16/BF16/F32); "
                f"the file is not a DiT checkpoint")
        m = re.match(r"transformer_blocks\.(\d+)\.", k)
        if m:
            heads[int(m.group(1))] = True
    n_blocks = len(heads)
    if "num_layers" in cfg and cfg["num_layers"] != n_blocks:
        bad(f"num_layers={cfg['num_layers']} but the weights hold {n_blocks} transformer blocks")
    need = ("num_attention_heads", "attention_head_dim", "in_channels", "patch_size", "sample_size")
    if all(_is_int(cfg.get(f)) for f in need):
        pe = headers.get("pos_embed.proj.weight")
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        want = (hidden, cfg["in_channels"], cfg["patch_size"], cfg["patch_size"])
        if pe is not None and pe[0] != want:
            bad(f"pos_embed.proj.weight has shape {pe[0]}, the config implies {want}")
        if pos_table_bytes(cfg) > max(_POS_FLOOR_BYTES, total):
            bad(f"sample_size={cfg['sample_size']} would build a {pos_table_bytes(cfg) >> 20} MB positional table "
                f"for {total >> 10} KB of weights: not this model's size")


SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MAX_TRAIN_TIMESTEPS = 100_000


def check_scheduler_config(cfg, where) -> None:
    """A scheduler config as strictly as weights: the right types, finite betas in (0, 1), a known
    schedule, bounded timesteps, and epsilon prediction (the sampler treats the output as noise)."""
    def bad(msg):
        raise ValueError(f"{where}: {msg}; replace it with the original file or remove it "
                         f"(the default DDIM scheduler is used then)")

    if not isinstance(cfg, dict):
        bad(f"holds a JSON {type(cfg).__name__}, expected an object")
    check_finite_floats(cfg, where)
    n = cfg.get("num_train_timesteps", 1000)
    if not _is_int(n) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        bad(f"num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS}], got {n!r}")
    b0, b1 = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    for name, b in (("beta_start", b0), ("beta_end", b1)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
            bad(f"{name} must be a number in (0, 1), got {b!r}")
    if b0 > b1:
        bad(f"beta_start={b0} is larger than beta_end={b1}")
    sched = cfg.get("beta_schedule", "linear")
    if sched not in SCHEDULES:
        bad(f"beta_schedule {sched!r} is not one of {SCHEDULES}")
    if cfg.get("trained_betas") is not None:
        bad("trained_betas is not supported (use beta_start / beta_end / beta_schedule)")
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        bad(f"prediction_type {pred!r}: vq4dit samples DiTs that predict the noise (epsilon)")
    for key in ("set_alpha_to_one", "rescale_betas_zero_snr", "thresholding", "clip_sample"):
        if key in cfg and not isinstance(cfg[key], bool):
            bad(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg.get("thresholding"):
        bad("thresholding is on: vq4dit samples with x0 clipping and thresholding off")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        bad(f"timestep_spacing {spacing!r} is not one of leading / trailing / linspace")
    off = cfg.get("steps_offset", 0)
    if not _is_int(off) or not 0 <= off < n:
        bad(f"steps_offset must be an integer in [0, num_train_timesteps), got {off!r}")
