"""Gradio explorer for VQ4DiT runs: a thin layer over vq4dit's traces and metrics.

    from app import AppConfig, create_app
    demo = create_app(AppConfig(runs_dir="runs"))
    demo.launch()

Modules: runs.py (runs dir, worker + stop flag, caches, pre-run estimate), plots.py (pure trace ->
plotly figures), views.py (what each view shows for the shared selection, read through the Trace
API), handlers.py (one named handler per event, taking a form object), layout.py (components and
the wiring of events to handlers).
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default (before gradio is imported)

from .runs import AppConfig, Engine, RunSettings, RunStore, warm_umap_async  # noqa: E402


def create_app(cfg: AppConfig):
    """Load the model once and build the page (nothing is computed at import time)."""
    from .layout import build_app
    engine = Engine(cfg)
    if cfg.warm_umap:
        warm_umap_async()
    return build_app(engine)


__all__ = ["AppConfig", "Engine", "RunSettings", "RunStore", "create_app", "warm_umap_async"]
