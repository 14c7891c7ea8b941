"""Gradio explorer for VQ4DiT runs: a thin layer over vq4dit's traces and metrics.

    from app import AppConfig, create_app
    demo = create_app(AppConfig(runs_dir="runs"))
    demo.launch()

Modules: config.py (AppConfig, RunRequest -> the library's build_config, limits), store.py (the runs
dir and its cached reads), engine.py (FP teacher, the calibration worker, images), cache.py (the one
LRU), plots.py (pure trace -> plotly figures), views/ (one module per tab, read through the Trace
API), forms.py + text.py (form dataclasses, status lines), handlers.py (one named handler per event),
layout.py (components and the wiring of events to handlers), demo.py (the shipped demo runs).
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default (before gradio is imported)

from .config import AppConfig, RunRequest  # noqa: E402
from .engine import Engine, warm_umap_async  # noqa: E402
from .store import RunStore  # noqa: E402


def create_app(cfg: AppConfig):
    """Load the model once and build the page (nothing is computed at import time)."""
    from .layout import build_app
    engine = Engine(cfg)
    if cfg.warm_umap:
        warm_umap_async()
    demo = build_app(engine)
    engine.start_spare()  # the first Run's worker imports while the page opens
    return demo


__all__ = ["AppConfig", "Engine", "RunRequest", "RunStore", "create_app", "warm_umap_async"]
