"""Loading full-precision DiT models: local transformer or pipeline dirs, Hub ids (only with the
explicit `hf:` prefix), VAEs and schedulers, from safetensors only, with the checks that make a
bad directory a clear error (missing / unexpected weights, pickle files, truncated files)."""
from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path
from typing import Optional

import torch

from ..quant_api import check_finite
from ..sampling import make_scheduler
from .packed import load_quantized
from .bundle import DiTBundle, scheduler_from
from .validation import (PACKED_CONFIG, check_safetensors, check_transformer_config,
                         check_finite_floats, read_json_file)


_NO_PICKLE_LOCK = threading.Lock()


@contextlib.contextmanager
def no_pickle():
    """While diffusers loads weights, `torch.load` (unpickling) raises: a route the file checks missed
    (a variant, an index, a Hub subfolder) still never reads a pickle. vq4dit itself never calls it.
    diffusers wraps the refusal in its own error, so the refusal is re-raised as it was."""
    refused = []

    def refuse(f, *a, **k):
        refused.append(f)
        raise ValueError(f"refusing to unpickle {f}: vq4dit loads weights only from .safetensors files")
    with _NO_PICKLE_LOCK:
        real = torch.load
        torch.load = refuse
        try:
            yield
        except Exception:
            if refused:
                raise ValueError(f"refusing to unpickle {refused[0]}: vq4dit loads weights only from "
                                 f".safetensors files (convert it, or remove it and any index naming it)") from None
            raise
        finally:
            torch.load = real


def _load_transformer(folder: Path, device, dtype):
    from diffusers import DiTTransformer2DModel
    cfg = read_json_file(folder / "config.json", "model config")
    if cfg.get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"{folder} holds a {cfg.get('_class_name')!r}, not a DiTTransformer2DModel")
    check_safetensors(folder)
    check_transformer_config(cfg, folder)  # sizes against the weights' headers, before anything is built
    try:
        with no_pickle():
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


HUB_PREFIX = "hf:"  # `hf:facebook/DiT-XL-2-256` loads from the Hugging Face Hub; anything else is local


def load_dit(path: str | os.PathLike, device=None, dtype=torch.float32,
             fp_base: Optional[torch.nn.Module] = None, cache: bool = False) -> DiTBundle:
    """Load a DiT from a transformer dir, a pipeline dir (transformer/, scheduler/, vae/),
    a packed vq4dit dir, or, only with the explicit `hf:` prefix, a Hub id (`hf:owner/name`).
    `cache`: runtime mode of a packed model (`load_quantized`): False decodes each layer's weight
    per forward (smallest memory), True keeps the decoded weights (fastest).

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
        return load_quantized(p, device=device, fp_base=fp_base, cache=cache)
    if (p / "config.json").is_file():
        bundle = DiTBundle(_load_transformer(p, device, dtype), scheduler_from(p / "scheduler"), None, str(p))
    elif (p / "transformer" / "config.json").is_file():
        vae = load_vae(p, device) if (p / "vae" / "config.json").is_file() else None
        bundle = DiTBundle(_load_transformer(p / "transformer", device, dtype),
                           scheduler_from(p / "scheduler"), vae, str(p))
    else:
        raise ValueError(f"{p} is not a DiT model directory: expected config.json of a "
                         f"DiTTransformer2DModel, a transformer/ subfolder, or a packed {PACKED_CONFIG}")
    check_finite(bundle.transformer)
    return bundle


def load_vae(path, device=None):
    """The VAE of a pipeline dir (its vae/), a packed dir saved with its VAE, or a VAE dir, from
    safetensors."""
    from diffusers import AutoencoderKL
    p = Path(path)
    folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
    if not (folder / "config.json").is_file():
        raise ValueError(f"no VAE in {p}: expected a pipeline dir with vae/ or a VAE dir with config.json")
    check_safetensors(folder)
    check_finite_floats(read_json_file(folder / "config.json", "VAE config"), folder / "config.json")
    try:
        with no_pickle():
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
        with no_pickle():
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
