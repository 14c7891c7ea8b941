"""Loading DiT models (local dirs or Hub ids) and the packed quantized format.

Packed model directory (all tensors in safetensors, written atomically):
    vq4dit_config.json            format, method config, transformer config, per-layer layout, sizes
    model.safetensors             fp/<name>        full-precision parts (embedders, norms, final layer)
                                  vq/<layer>/codebook (k, d) fp16, vq/<layer>/indices uint8 (bit-packed
                                  at log2(k) bits), vq/<layer>/bias
                                  rtn/<layer>/codes uint8 (bit-packed), scale/zero, bias
    scheduler/scheduler_config.json
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import RTNConfig, VQConfig
from .layers import RTNLinear, VQLinear, quantized_layers
from .quant_api import _replace, check_finite, size_summary
from .sampling import make_scheduler

PACKED_CONFIG = "vq4dit_config.json"
PACKED_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1

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
        model = DiTTransformer2DModel.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype)
    except Exception as e:  # diffusers raises many types for bad files; name the folder
        raise ValueError(f"could not load the DiT weights in {folder}: {e}") from e
    return model.to(device).eval()


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


def load_dit(path: str | os.PathLike, device=None, dtype=torch.float32) -> DiTBundle:
    """Load a DiT from a transformer dir, a pipeline dir (transformer/, scheduler/, vae/),
    a packed vq4dit dir, or a Hub id (passed through to diffusers)."""
    device = torch.device(device) if device else torch.device("cpu")
    p = Path(path)
    if not p.exists():
        s = str(path)
        looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~")) and "\\" not in s
        if not looks_like_hub_id:
            raise FileNotFoundError(f"model directory {s} does not exist")
        return _load_from_hub(s, device, dtype)
    if not p.is_dir():
        raise ValueError(f"{p} is a file: pass a model directory (diffusers format)")
    if (p / PACKED_CONFIG).is_file():
        return load_quantized(p, device=device)
    if (p / "config.json").is_file():
        bundle = DiTBundle(_load_transformer(p, device, dtype), _scheduler_from(p / "scheduler"), None, str(p))
    elif (p / "transformer" / "config.json").is_file():
        vae = None
        if (p / "vae" / "config.json").is_file():
            from diffusers import AutoencoderKL
            _check_safetensors(p / "vae")
            vae = AutoencoderKL.from_pretrained(p / "vae", use_safetensors=True).to(device).eval()
        bundle = DiTBundle(_load_transformer(p / "transformer", device, dtype),
                           _scheduler_from(p / "scheduler"), vae, str(p))
    else:
        raise ValueError(f"{p} is not a DiT model directory: expected config.json of a "
                         f"DiTTransformer2DModel, a transformer/ subfolder, or a packed {PACKED_CONFIG}")
    check_finite(bundle.transformer)
    return bundle


def _load_from_hub(repo_id: str, device, dtype) -> DiTBundle:
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    try:
        tr = DiTTransformer2DModel.from_pretrained(repo_id, subfolder="transformer", use_safetensors=True,
                                                   torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(repo_id, subfolder="vae", use_safetensors=True)
    except Exception as e:
        raise ValueError(f"could not load {repo_id!r} from the Hub (no network or no access?): {e}. "
                         f"Download it once and pass the local directory instead.") from e
    return DiTBundle(tr.to(device).eval(), make_scheduler(), vae.to(device).eval(), repo_id)


# ----------------------------------------------------------------------------------------
# Packed export / reload
# ----------------------------------------------------------------------------------------


def _atomic_dir(out: Path, overwrite: bool):
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists (use --overwrite / overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def _commit_dir(tmp: Path, out: Path):
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_quantized(model, out_dir, scheduler=None, overwrite: bool = False, extra: Optional[dict] = None) -> Path:
    """Write the packed model. Layers must be hard (calibration's `finalize` does that)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    qlayers = quantized_layers(model)
    if not qlayers:
        raise ValueError("model has no quantized layers: run vq4dit.quantize(model, config) first")
    for name, m in qlayers.items():
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
    for key, t in model.state_dict().items():
        if not any(key.startswith(q + ".") for q in qlayers):
            tensors[f"fp/{key}"] = t.detach().cpu().contiguous()
    meta = dict(format="vq4dit-packed", version=FORMAT_VERSION,
                method=getattr(cfg, "method", None), config=cfg.to_dict() if cfg is not None else None,
                transformer_config={k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                transformer_class=type(model).__name__, layers=layout, size=size_summary(model),
                extra=extra or {})
    tmp = _atomic_dir(out_dir, overwrite)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / PACKED_WEIGHTS))
        (tmp / PACKED_CONFIG).write_text(json.dumps(meta, indent=1, default=str))
        (scheduler or make_scheduler()).save_pretrained(tmp / "scheduler")
        meta["size"]["file_bytes"] = (tmp / PACKED_WEIGHTS).stat().st_size
        (tmp / PACKED_CONFIG).write_text(json.dumps(meta, indent=1, default=str))
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_quantized(path, device=None) -> DiTBundle:
    """Rebuild a packed model; its outputs equal the in-memory quantized model's."""
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
    model = DiTTransformer2DModel.from_config(meta["transformer_config"])
    cfg_d = meta.get("config") or {}
    for name, lay in meta["layers"].items():
        out_f, in_f = lay["shape"]
        try:
            if lay["kind"] == "vq":
                cb = t[f"vq/{name}/codebook"]
                q = VQLinear(in_f, out_f, lay["k"], lay["d"], lay.get("n_candidates", 2), lay["bias"], name,
                             codebook_dtype="float16" if cb.dtype == torch.float16 else "float32")
                q.codebook.data = cb.float()
                q.assignment.copy_(unpack_bits(t[f"vq/{name}/indices"], q.index_bits, q.num_subvectors))
                q.kmeans_assignment.copy_(q.assignment)
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
