"""The packed quantized format: bit packing, `save_quantized` and `load_quantized`.

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
    vae/                          a latent-space pipeline's VAE (config.json + safetensors), not quantized:
                                  kept so the directory samples as saved; its bytes are `size.vae_bytes`,
                                  not part of `size.dir_bytes` (the quantized transformer's cost)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import config_from_dict
from ..layers import RTNLinear, VQLinear
from ..quant_api import replace_module
from ..sampling import make_scheduler
from ..fs import check_replace_target, check_writable, recover_backup, replace_dir, temp_dir_for
from ..size import quantized_layers, size_summary
from .bundle import DiTBundle, scheduler_from
from .validation import (FORMAT_VERSION, PACKED_CONFIG, PACKED_WEIGHTS, restore_aliases, validate_packed,
                         check_safetensors)

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


def save_quantized(model, out_dir, scheduler=None, overwrite: bool = False, extra: Optional[dict] = None,
                   protect=(), write_extra: Optional[Callable[[Path], None]] = None,
                   fp_base: Optional[torch.nn.Module] = None, config=None,
                   vae: Optional[torch.nn.Module] = None) -> Path:
    """Write the packed model. Layers must be hard (calibration's `finalize` does that).

    config: the method config recorded in the JSON; default `model.vq4dit_config`, which
    `vq4dit.quantize` sets (None: no config recorded).

    fp_base: the full-precision model this one was quantized from. Its full-precision parts are
    then not written (they must equal the base's exactly); the config records their names and a
    checksum, and `load_quantized(path, fp_base=...)` takes them from the same base. Saves ~4 MB
    per run of the embedded digits DiT (the app's shipped demo runs use it).

    overwrite=True replaces only a previous packed output (never a path in `protect`, the working
    directory or a parent of it). `write_extra(tmp_dir)` may add files (e.g. the trace) before the
    directory is renamed into place, so OUT appears complete or not at all.

    vae: the pipeline's VAE (latent-space DiTs such as DiT-XL/2), written to vae/ in safetensors so
    `load_quantized` / `sample --model OUT` decode images without the source pipeline."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    qlayers = quantized_layers(model)
    if not qlayers:
        raise ValueError("model has no quantized layers: run vq4dit.quantize(model, config) first")
    for name, m in qlayers.items():
        if isinstance(m, VQLinear) and not m.hard:
            raise ValueError(f"layer {name} still has soft assignments: call vq4dit.finalize(model) first")
    cfg = config if config is not None else getattr(model, "vq4dit_config", None)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, m in qlayers.items():
        layout[name] = _pack_layer(name, m, tensors)
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
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
            meta["vae"] = dict(dir="vae", class_name=type(vae).__name__)
            meta["size"]["vae_bytes"] = dir_bytes(tmp / "vae")
        if write_extra is not None:
            write_extra(tmp)
        meta["size"]["file_bytes"] = (tmp / PACKED_WEIGHTS).stat().st_size
        _write_config_with_dir_bytes(tmp, meta)
        replace_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, quota, I/O error
            raise ValueError(f"could not write {out_dir} ({type(e).__name__}: {e}): disk full? free space or "
                             f"pick another output; nothing was written, an older output there is kept") from None
        raise
    return out_dir


def _pack_layer(name: str, m, tensors: dict) -> dict:
    """Add layer `name`'s packed tensors to `tensors`; returns its layout entry for the JSON."""
    bias = None if m.bias is None else m.bias.detach().float().cpu()
    shape = [m.out_features, m.in_features]
    if isinstance(m, VQLinear):
        tensors[f"vq/{name}/codebook"] = m.codebook.detach().cpu().to(getattr(torch, m.codebook_dtype))
        tensors[f"vq/{name}/indices"] = pack_bits(m.indices(), m.index_bits)
        lay = dict(kind="vq", k=m.k, d=m.d, n_candidates=m.n_candidates, shape=shape, bias=bias is not None,
                   codebook_dtype=m.codebook_dtype)
    elif isinstance(m, RTNLinear):
        tensors[f"rtn/{name}/codes"] = pack_bits(m.qweight.reshape(-1), m.bits)
        tensors[f"rtn/{name}/scale"] = m.scale.detach().cpu().half()
        tensors[f"rtn/{name}/zero"] = m.zero.detach().cpu().to(torch.uint8)
        lay = dict(kind="rtn", bits=m.bits, per_channel=m.per_channel, shape=shape, bias=bias is not None)
    else:
        raise TypeError(f"layer {name} is a {type(m).__name__}: the packed format stores VQLinear and RTNLinear "
                        f"only (a layer fake-quantized by a peer library is saved with that library)")
    if bias is not None:
        tensors[f"{lay['kind']}/{name}/bias"] = bias
    return lay


def _unpack_layer(name: str, lay: dict, t: dict, cache: bool = False):
    """The VQLinear / RTNLinear of layer `name` from its (validated) layout and tensors. VQ layers
    hold their indices at packed width (compact runtime); cache=True keeps decoded weights."""
    out_f, in_f = lay["shape"]
    if lay["kind"] == "vq":
        cb = t[f"vq/{name}/codebook"]
        q = VQLinear(in_f, out_f, lay["k"], lay["d"], lay.get("n_candidates", 2), lay["bias"], name,
                     codebook_dtype="float16" if cb.dtype == torch.float16 else "float32", compact=True)
        q.codebook.data = cb.float()
        packed = t[f"vq/{name}/indices"]
        # <= 8 bits the file's bytes are the compact buffer; wider ids are unpacked once
        q.assignment = (packed if q.index_bits <= 8 else
                        q.encode_indices(unpack_bits(packed, q.index_bits, q.num_subvectors)))
        q.set_weight_cache(cache)
        q.kmeans_assignment = q.assignment  # same tensor: a packed model has no k-means history
    else:
        q = RTNLinear(in_f, out_f, lay["bits"], lay["per_channel"], lay["bias"], name)
        q.qweight.copy_(unpack_bits(t[f"rtn/{name}/codes"], lay["bits"], out_f * in_f)
                        .reshape(out_f, in_f).to(torch.uint8))
        q.scale.copy_(t[f"rtn/{name}/scale"].float())
        q.zero.copy_(t[f"rtn/{name}/zero"].float())
    if lay["bias"]:
        q.bias.data = t[f"{lay['kind']}/{name}/bias"].float()
    return q


def _fp_digest(tensors: dict) -> str:
    """sha256 over the names, shapes and float32 bytes of full-precision tensors (sorted by name)."""
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


def dir_bytes(path, vae: bool = True) -> int:
    """Total bytes of the files under `path`. vae=False leaves out a packed model's vae/ (not
    quantized): what the quantized transformer costs on disk."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and (vae or f.relative_to(path).parts[0] != "vae"))


def _write_config_with_dir_bytes(tmp: Path, meta: dict):
    """Write the JSON with size.dir_bytes = the whole directory but vae/, the JSON itself included."""
    meta["size"]["dir_bytes"] = 0
    for _ in range(4):  # the JSON's own length depends on the number it holds: settle it
        (tmp / PACKED_CONFIG).write_text(json.dumps(meta, indent=1, default=str))
        total = dir_bytes(tmp, vae=False)
        if total == meta["size"]["dir_bytes"]:
            return
        meta["size"]["dir_bytes"] = total


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside hold their parameters on the meta device (no memory): each one is
    created, then swapped for a meta tensor at once, so building a DiT never holds its FP weights
    (which the allocator would keep as resident memory). Buffers stay real. Like accelerate's
    init_empty_weights, without the dependency."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_quantized(path, device=None, fp_base: Optional[torch.nn.Module] = None, cache: bool = False) -> DiTBundle:
    """Rebuild a packed model; its outputs equal the in-memory quantized model's. `fp_base`: the
    full-precision model, for a packed model saved with `save_quantized(..., fp_base=...)`.

    The VQ layers hold their indices at packed width (`VQLinear.compact_`). cache=False (default,
    compact runtime): each forward decodes its layer's weight from the codebook, so the resident
    model is about the packed size plus one decoded layer. cache=True: decoded weights are kept
    after the first forward (faster sampling, +4 bytes per weight, more than the FP model).
    The model is built without FP weights (parameters on the meta device, then the file's tensors
    assigned): identical FP copies the file stores once (aliases) share one tensor in memory."""
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
    check_safetensors(path)
    try:
        t = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wfile} is corrupt: {e}") from e
    if "fp_base" in meta:
        if any(k.startswith("fp/") for k in t):
            raise ValueError(f"{wfile} holds fp/ tensors although its config says they come from fp_base")
        t.update(_shared_fp(meta, fp_base, path))
    restore_aliases(meta, t, wfile)
    validate_packed(meta, t, wfile)
    with _parameters_on_meta():  # the FP parts are assigned below, the quantized layers replaced
        model = DiTTransformer2DModel.from_config(meta["transformer_config"])
    for name, lay in meta["layers"].items():
        try:
            replace_module(model, name, _unpack_layer(name, lay, t, cache))
        except KeyError as e:
            raise ValueError(f"{wfile} lacks tensor {e} for layer {name}") from e
    fp = {k[3:]: v for k, v in t.items() if k.startswith("fp/")}
    missing, unexpected = model.load_state_dict(fp, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(q + ".") for q in meta["layers"])]
    if missing or unexpected:
        raise ValueError(f"{wfile} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{wfile} does not match its config: no weights for {left[:5]}")
    model.vq4dit_config = _saved_config(meta.get("config"), path / PACKED_CONFIG)
    for p in model.parameters():
        p.requires_grad_(False)
    device = torch.device(device) if device else torch.device("cpu")
    from .loading import load_vae  # loading imports this module
    vae = load_vae(path, device) if (path / "vae" / "config.json").is_file() else None
    return DiTBundle(model.to(device).eval(), scheduler_from(path / "scheduler"), vae, str(path), meta)


def _saved_config(cfg_d, where: Path):
    """The method config a packed model recorded, or None. A config this version cannot rebuild
    (written by another version, or edited) is a warning naming the file: the weights still load."""
    if cfg_d is None:
        return None
    try:
        if not isinstance(cfg_d, dict):
            raise TypeError(f"expected an object, got {type(cfg_d).__name__}")
        return config_from_dict(cfg_d)
    except (TypeError, ValueError) as e:
        warnings.warn(f"{where}: its method config could not be rebuilt ({e}); the model loads with "
                      f"vq4dit_config=None", stacklevel=3)
        return None
