"""Loading DiT models (local dirs or Hub ids) and the packed quantized format.

Packed model directory (all tensors in safetensors, written atomically):
    vq4dit_config.json            format, method config, transformer config, per-layer layout, sizes
    model.safetensors             fp/<name>        full-precision parts (embedders, norms, final layer);
                                  absent when saved with `fp_base` (they equal the base model's, whose
                                  checksum the config records: load with the same `fp_base`)
                                  vq/<layer>/codebook (k, d) fp16, vq/<layer>/indices uint8 (bit-packed
                                  at log2(k) bits), vq/<layer>/bias
                                  rtn/<layer>/codes uint8 (bit-packed), scale/zero, bias
                                  identical fp tensors are stored once: `aliases` in the JSON maps
                                  each copy's key to the stored one (DiT-XL/2: 28 embedder copies)
    scheduler/scheduler_config.json
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .config import RTN_BITS, RTNConfig, VQConfig, index_bits
from .layers import RTNLinear, VQLinear, quantized_layers
from .quant_api import _replace, check_finite, size_summary
from .safety import check_replace_target, check_writable, recover_backup, replace_dir, temp_dir_for
from .sampling import make_scheduler

PACKED_CONFIG = "vq4dit_config.json"
PACKED_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: identical fp tensors stored once (`aliases`); 1 is still read
READ_VERSIONS = (1, 2)

# ----------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits into a uint8 tensor, MSB first (8 bits: plain uint8)."""
    v = values.detach().cpu().reshape(-1).numpy().astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 2 ** bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    if bits == 8:
        return torch.from_numpy(v.astype(np.uint8))
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    out = []
    chunk = 1 << 20  # multiple of 8 values -> whole bytes per chunk
    for s in range(0, v.size, chunk):
        bitarr = ((v[s:s + chunk, None] >> shifts) & 1).astype(np.uint8)  # (n, bits)
        out.append(np.packbits(bitarr.reshape(-1)))
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.uint8))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (ceil(n*bits/8),) uint8 -> (n,) int64."""
    p = packed.detach().cpu().numpy().astype(np.uint8)
    if p.size != math.ceil(n * bits / 8):
        raise ValueError(f"packed size {p.size} bytes does not match {n} values at {bits} bits")
    if bits == 8:
        return torch.from_numpy(p.astype(np.int64))
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    out = []
    chunk = 1 << 20
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        b = np.unpackbits(p[s * bits // 8: (s * bits + m * bits + 7) // 8])[: m * bits]
        out.append(b.reshape(m, bits).astype(np.int64) @ weights)
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.int64))


# ----------------------------------------------------------------------------------------
# Loading full-precision DiT models
# ----------------------------------------------------------------------------------------


@dataclass
class DiTBundle:
    """A transformer plus what sampling needs. `vae` is None for pixel-space models."""
    transformer: Any
    scheduler: Any
    vae: Any = None
    source: str = ""
    quantized_meta: Optional[dict] = None


def _check_safetensors(folder: Path):
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


def _load_transformer(folder: Path, device, dtype):
    from diffusers import DiTTransformer2DModel
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is missing or not valid JSON: {e}") from e
    if cfg.get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"{folder} holds a {cfg.get('_class_name')!r}, not a DiTTransformer2DModel")
    _check_safetensors(folder)
    try:
        model, info = DiTTransformer2DModel.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype,
                                                            output_loading_info=True)
    except Exception as e:  # diffusers raises many types for bad files; name the folder
        raise ValueError(f"could not load the DiT weights in {folder}: {e}") from e
    _check_loading_info(folder, info)
    return model.to(device).eval()


def _check_loading_info(folder, info: dict):
    """Missing weights would be randomly initialised, unexpected ones ignored: both are errors."""
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with mismatched shapes (e.g. {[m[0] for m in mismatched[:3]]})")
        raise ValueError(f"the weights in {folder} do not match its config.json: " + "; ".join(parts)
                         + " (a missing weight would be randomly initialised)")


def _scheduler_from(folder: Path):
    from diffusers import DDIMScheduler
    f = folder / "scheduler_config.json"
    if not f.is_file():
        return make_scheduler()
    cfg = json.loads(f.read_text())
    # Every model is sampled with DDIM (x0 clipping off) so step counts mean the same thing.
    cfg.update(clip_sample=False)
    cfg.pop("_class_name", None)
    return DDIMScheduler.from_config(cfg)


HUB_PREFIX = "hf:"  # `hf:facebook/DiT-XL-2-256` loads from the Hugging Face Hub; anything else is local


def load_dit(path: str | os.PathLike, device=None, dtype=torch.float32,
             fp_base: Optional[torch.nn.Module] = None) -> DiTBundle:
    """Load a DiT from a transformer dir, a pipeline dir (transformer/, scheduler/, vae/),
    a packed vq4dit dir, or, only with the explicit `hf:` prefix, a Hub id (`hf:owner/name`).

    A path that does not exist is an error: it never falls back to the Hub."""
    device = torch.device(device) if device else torch.device("cpu")
    s = str(path)
    if s.startswith(HUB_PREFIX):
        repo = s[len(HUB_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo):
            raise ValueError(f"{s!r} is not a Hub id: use hf:owner/name")
        return _load_from_hub(repo, device, dtype)
    p = Path(path)
    if not p.exists():
        hint = (f" (to load from the Hugging Face Hub, write {HUB_PREFIX}{s})"
                if s.count("/") == 1 and not s.startswith((".", "/", "~")) else "")
        raise FileNotFoundError(f"model directory {s} does not exist{hint}")
    if not p.is_dir():
        raise ValueError(f"{p} is a file: pass a model directory (diffusers format)")
    if (p / PACKED_CONFIG).is_file():
        return load_quantized(p, device=device, fp_base=fp_base)
    if (p / "config.json").is_file():
        bundle = DiTBundle(_load_transformer(p, device, dtype), _scheduler_from(p / "scheduler"), None, str(p))
    elif (p / "transformer" / "config.json").is_file():
        vae = load_vae(p, device) if (p / "vae" / "config.json").is_file() else None
        bundle = DiTBundle(_load_transformer(p / "transformer", device, dtype),
                           _scheduler_from(p / "scheduler"), vae, str(p))
    else:
        raise ValueError(f"{p} is not a DiT model directory: expected config.json of a "
                         f"DiTTransformer2DModel, a transformer/ subfolder, or a packed {PACKED_CONFIG}")
    check_finite(bundle.transformer)
    return bundle


def load_vae(path, device=None):
    """The VAE of a pipeline dir (its vae/) or a VAE dir, from safetensors. A packed model does not
    carry the VAE (it is not quantized): sample through the source pipeline's."""
    from diffusers import AutoencoderKL
    p = Path(path)
    folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
    if not (folder / "config.json").is_file():
        raise ValueError(f"no VAE in {p}: expected a pipeline dir with vae/ or a VAE dir with config.json")
    _check_safetensors(folder)
    try:
        vae, info = AutoencoderKL.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except Exception as e:
        raise ValueError(f"could not load the VAE in {folder}: {e}") from e
    _check_loading_info(folder, info)
    return vae.to(torch.device(device) if device else torch.device("cpu")).eval()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_from_hub(repo_id: str, device, dtype) -> DiTBundle:
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    offline = hub_offline()
    try:
        tr, info = DiTTransformer2DModel.from_pretrained(repo_id, subfolder="transformer", use_safetensors=True,
                                                         torch_dtype=dtype, local_files_only=offline,
                                                         output_loading_info=True)
        _check_loading_info(f"{HUB_PREFIX}{repo_id}", info)
        vae = AutoencoderKL.from_pretrained(repo_id, subfolder="vae", use_safetensors=True,
                                            local_files_only=offline)
    except Exception as e:
        if offline:
            raise ValueError(f"could not load {repo_id!r}: HF_HUB_OFFLINE is set and it is not in the local "
                             f"Hub cache ({type(e).__name__})") from None
        raise ValueError(f"could not load {repo_id!r} from the Hub (no network or no access?): {e}. "
                         f"Download it once and pass the local directory instead.") from e
    return DiTBundle(tr.to(device).eval(), make_scheduler(), vae.to(device).eval(), repo_id)


# ----------------------------------------------------------------------------------------
# Packed export / reload
# ----------------------------------------------------------------------------------------


def check_output(out, overwrite: bool, protect=()) -> Path:
    """Before any work: OUT may be written (missing, or a previous packed output with overwrite=True,
    never an input model or the working directory) and its parent is writable."""
    out = Path(os.path.abspath(out))
    recover_backup(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output directory {out} already exists (use --overwrite / overwrite=True)")
        check_replace_target(out, PACKED_CONFIG, protect, what="packed vq4dit output")
    check_writable(out.parent)
    return out


def _atomic_dir(out: Path, overwrite: bool, protect=()):
    out = check_output(out, overwrite, protect)
    return temp_dir_for(out)


def _commit_dir(tmp: Path, out: Path):
    replace_dir(tmp, out)


def save_quantized(model, out_dir, scheduler=None, overwrite: bool = False, extra: Optional[dict] = None,
                   protect=(), write_extra: Optional[Callable[[Path], None]] = None,
                   fp_base: Optional[torch.nn.Module] = None) -> Path:
    """Write the packed model. Layers must be hard (calibration's `finalize` does that).

    fp_base: the full-precision model this one was quantized from. Its full-precision parts are
    then not written (they must equal the base's exactly); the config records their names and a
    checksum, and `load_quantized(path, fp_base=...)` takes them from the same base. Saves ~4 MB
    per run of the embedded digits DiT (the app's shipped demo runs use it).

    overwrite=True replaces only a previous packed output (never a path in `protect`, the working
    directory or a parent of it). `write_extra(tmp_dir)` may add files (e.g. the trace) before the
    directory is renamed into place, so OUT appears complete or not at all."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    qlayers = quantized_layers(model)
    if not qlayers:
        raise ValueError("model has no quantized layers: run vq4dit.quantize(model, config) first")
    for name, m in qlayers.items():
        if not isinstance(m, (VQLinear, RTNLinear)):
            raise ValueError(f"layer {name} is a {type(m).__name__} (fake-quantized by a peer library): "
                             f"save it with that library; vq4dit packs only VQ and RTN layers")
        if isinstance(m, VQLinear) and not m.hard:
            raise ValueError(f"layer {name} still has soft assignments: call vq4dit.finalize(model) first")
    cfg = getattr(model, "_vq4dit_config", None)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, m in qlayers.items():
        bias = None if m.bias is None else m.bias.detach().float().cpu()
        if isinstance(m, VQLinear):
            tensors[f"vq/{name}/codebook"] = m.codebook.detach().cpu().to(getattr(torch, m.codebook_dtype))
            tensors[f"vq/{name}/indices"] = pack_bits(m.assignment, m.index_bits)
            layout[name] = dict(kind="vq", k=m.k, d=m.d, n_candidates=m.n_candidates,
                                shape=[m.out_features, m.in_features], bias=bias is not None,
                                codebook_dtype=m.codebook_dtype)
            if bias is not None:
                tensors[f"vq/{name}/bias"] = bias
        else:
            tensors[f"rtn/{name}/codes"] = pack_bits(m.qweight.reshape(-1), m.bits)
            tensors[f"rtn/{name}/scale"] = m.scale.detach().cpu().half()
            tensors[f"rtn/{name}/zero"] = m.zero.detach().cpu().to(torch.uint8)
            layout[name] = dict(kind="rtn", bits=m.bits, per_channel=m.per_channel,
                                shape=[m.out_features, m.in_features], bias=bias is not None)
            if bias is not None:
                tensors[f"rtn/{name}/bias"] = bias
    fp = {key: t.detach().cpu().contiguous() for key, t in model.state_dict().items()
          if not any(key.startswith(q + ".") for q in qlayers)}
    shared = None
    if fp_base is not None:
        base = fp_base.state_dict()
        differ = [k for k, t in fp.items() if k not in base or base[k].shape != t.shape
                  or not torch.equal(base[k].detach().cpu(), t)]
        if differ:
            raise ValueError(f"fp_base differs from the model in {len(differ)} full-precision tensors "
                             f"(e.g. {differ[:3]}): pass the model it was quantized from")
        shared = dict(keys=sorted(fp), sha256=_fp_digest(fp))
        fp = {}
    stored, aliases = dedupe_tensors({f"fp/{k}": t for k, t in fp.items()})
    tensors.update(stored)
    meta = dict(format="vq4dit-packed", version=FORMAT_VERSION,
                method=getattr(cfg, "method", None), config=cfg.to_dict() if cfg is not None else None,
                transformer_config={k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                transformer_class=type(model).__name__, layers=layout, aliases=aliases, size=size_summary(model),
                extra=extra or {})
    if shared is not None:
        meta["fp_base"] = shared
    tmp = _atomic_dir(out_dir, overwrite, protect)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / PACKED_WEIGHTS))
        (scheduler or make_scheduler()).save_pretrained(tmp / "scheduler")
        if write_extra is not None:
            write_extra(tmp)
        meta["size"]["file_bytes"] = (tmp / PACKED_WEIGHTS).stat().st_size
        _write_config_with_dir_bytes(tmp, meta)
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fp_digest(tensors: dict) -> str:
    """sha256 over the names, shapes and float32 bytes of full-precision tensors (sorted by name)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().float().contiguous()
        h.update(f"{k}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _shared_fp(meta: dict, fp_base, path: Path) -> dict:
    """The full-precision tensors a packed model saved with `fp_base` takes from its base model."""
    rec = meta.get("fp_base")
    if not isinstance(rec, dict) or not isinstance(rec.get("keys"), list) or not isinstance(rec.get("sha256"), str):
        raise ValueError(f"{path / PACKED_CONFIG}: fp_base must be an object with keys and sha256")
    if fp_base is None:
        raise ValueError(f"{path} shares its full-precision weights with the model it was quantized from: "
                         f"load it with load_dit(path, fp_base=<that model's transformer>)")
    base = fp_base.state_dict()
    missing = [k for k in rec["keys"] if not isinstance(k, str) or k not in base]
    if missing:
        raise ValueError(f"{path}: fp_base lacks {len(missing)} tensors, e.g. {missing[:3]}: wrong base model")
    fp = {k: base[k].detach().cpu() for k in rec["keys"]}
    if _fp_digest(fp) != rec["sha256"]:
        raise ValueError(f"{path}: fp_base is not the model these weights were quantized from (checksum differs)")
    return {f"fp/{k}": v.float().clone() for k, v in fp.items()}


def dedupe_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Identical tensors (same dtype, shape and bytes) stored once: (tensors to store, {copy's key:
    stored key}). DiT-XL/2's converted checkpoint holds 28 identical timestep/label embedders."""
    import hashlib
    stored, aliases, seen = {}, {}, {}
    for key, t in tensors.items():
        h = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        sig = (str(t.dtype), tuple(t.shape), h.hexdigest())
        if sig in seen and torch.equal(stored[seen[sig]], t):
            aliases[key] = seen[sig]
        else:
            seen[sig] = key
            stored[key] = t
    return stored, aliases


def dir_bytes(path) -> int:
    """Total bytes of the files under `path`: what a packed model costs on disk."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _write_config_with_dir_bytes(tmp: Path, meta: dict):
    """Write the JSON with size.dir_bytes = the whole directory, the JSON itself included."""
    meta["size"]["dir_bytes"] = 0
    for _ in range(4):  # the JSON's own length depends on the number it holds: settle it
        (tmp / PACKED_CONFIG).write_text(json.dumps(meta, indent=1, default=str))
        total = dir_bytes(tmp)
        if total == meta["size"]["dir_bytes"]:
            return
        meta["size"]["dir_bytes"] = total


def load_quantized(path, device=None, fp_base: Optional[torch.nn.Module] = None) -> DiTBundle:
    """Rebuild a packed model; its outputs equal the in-memory quantized model's. `fp_base`: the
    full-precision model, for a packed model saved with `save_quantized(..., fp_base=...)`."""
    from diffusers import DiTTransformer2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    try:
        meta = json.loads((path / PACKED_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / PACKED_CONFIG} is missing or not valid JSON: {e}") from e
    if meta.get("format") != "vq4dit-packed":
        raise ValueError(f"{path} is not a packed vq4dit model (format={meta.get('format')!r})")
    wfile = path / PACKED_WEIGHTS
    _check_safetensors(path)
    try:
        t = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wfile} is corrupt: {e}") from e
    if "fp_base" in meta:
        if any(k.startswith("fp/") for k in t):
            raise ValueError(f"{wfile} holds fp/ tensors although its config says they come from fp_base")
        t.update(_shared_fp(meta, fp_base, path))
    _restore_aliases(meta, t, wfile)
    _validate_packed(meta, t, wfile)
    model = DiTTransformer2DModel.from_config(meta["transformer_config"])
    cfg_d = meta.get("config") or {}
    if not isinstance(cfg_d, dict):
        cfg_d = {}
    for name, lay in meta["layers"].items():
        out_f, in_f = lay["shape"]
        try:
            if lay["kind"] == "vq":
                cb = t[f"vq/{name}/codebook"]
                q = VQLinear(in_f, out_f, lay["k"], lay["d"], lay.get("n_candidates", 2), lay["bias"], name,
                             codebook_dtype="float16" if cb.dtype == torch.float16 else "float32")
                q.codebook.data = cb.float()
                q.assignment.copy_(unpack_bits(t[f"vq/{name}/indices"], q.index_bits, q.num_subvectors))
                q.kmeans_assignment = q.assignment  # same tensor: a packed model has no k-means history
                if lay["bias"]:
                    q.bias.data = t[f"vq/{name}/bias"].float()
            else:
                q = RTNLinear(in_f, out_f, lay["bits"], lay["per_channel"], lay["bias"], name)
                q.qweight.copy_(unpack_bits(t[f"rtn/{name}/codes"], lay["bits"], out_f * in_f)
                                .reshape(out_f, in_f).to(torch.uint8))
                q.scale.copy_(t[f"rtn/{name}/scale"].float())
                q.zero.copy_(t[f"rtn/{name}/zero"].float())
                if lay["bias"]:
                    q.bias.data = t[f"rtn/{name}/bias"].float()
        except KeyError as e:
            raise ValueError(f"{wfile} lacks tensor {e} for layer {name}") from e
        _replace(model, name, q)
    fp = {k[3:]: v for k, v in t.items() if k.startswith("fp/")}
    missing, unexpected = model.load_state_dict(fp, strict=False)
    missing = [k for k in missing if not any(k.startswith(q + ".") for q in meta["layers"])]
    if missing or unexpected:
        raise ValueError(f"{wfile} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg_d:
        cls = VQConfig if "k" in cfg_d else RTNConfig
        try:
            model._vq4dit_config = cls(**cfg_d) if cls is RTNConfig else VQConfig(
                **{k: v for k, v in cfg_d.items() if k != "calib"})
        except (TypeError, ValueError):
            pass
    for p in model.parameters():
        p.requires_grad_(False)
    device = torch.device(device) if device else torch.device("cpu")
    return DiTBundle(model.to(device).eval(), _scheduler_from(path / "scheduler"), None, str(path), meta)


# ----------------------------------------------------------------------------------------
# Validation of a packed model before anything is built from it
# ----------------------------------------------------------------------------------------

_INT_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
               "patch_size", "num_embeds_ada_norm")
_MAX_POS_ELEMENTS = 1 << 28  # positional-embedding table (positions x hidden) built at init


def _restore_aliases(meta: dict, t: dict, wfile: Path):
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


def _validate_packed(meta: dict, t: dict, wfile: Path):
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
