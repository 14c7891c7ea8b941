"""What every loader returns (`DiTBundle`) and the scheduler a model directory carries."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..sampling import make_scheduler


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
    cfg = json.loads(f.read_text())
    # Every model is sampled with DDIM (x0 clipping off) so step counts mean the same thing.
    cfg.update(clip_sample=False)
    cfg.pop("_class_name", None)
    return DDIMScheduler.from_config(cfg)
