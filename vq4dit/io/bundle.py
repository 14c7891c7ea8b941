"""What every loader returns (`DiTBundle`) and the scheduler a model directory carries."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..sampling import make_scheduler
from .validation import check_scheduler_config, read_json_file


@dataclass
class DiTBundle:
    """A transformer plus what sampling needs. `vae` is None for pixel-space models."""
    transformer: Any
    scheduler: Any
    vae: Any = None
    source: str = ""
    quantized_meta: Optional[dict] = None


def scheduler_from(folder: Path):
    from diffusers import DDIMScheduler
    f = folder / "scheduler_config.json"
    if not f.is_file():
        return make_scheduler()
    cfg = read_json_file(f, "scheduler config")
    check_scheduler_config(cfg, f)
    # Every model is sampled with DDIM (x0 clipping off) so step counts mean the same thing.
    cfg.update(clip_sample=False)
    cfg.pop("_class_name", None)
    return DDIMScheduler.from_config(cfg)
