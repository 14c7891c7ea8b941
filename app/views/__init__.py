"""What each view shows for the shared selection: one module per tab, composed into `Views`.

    base.py       the selection (run, block, layer, snapshot, comparison) and run pairing
    changes.py    Per-block changes        clusters.py   Codebook clusters
    evolution.py  Assignment evolution     conflicts.py  Gradient conflicts
    mechanism.py  Mechanism (verdicts)     images.py     Images side by side
    runs.py       Runs compared side by side (the Runs tab's multi-select)
"""
from .base import SelectionView
from .changes import ChangesView
from .clusters import FULL_CLUSTER_MAX, ClusterView
from .conflicts import ConflictView
from .evolution import EvolutionView, switched_paths
from .images import IMAGE_METRICS_COLUMNS, ImagesView, composite
from .mechanism import MechanismView
from .runs import SIDE_BY_SIDE_COLUMNS, SIDE_BY_SIDE_MAX, RunsView


class Views(SelectionView, ChangesView, ClusterView, EvolutionView, ConflictView, MechanismView, ImagesView,
            RunsView):
    """Every view's reads, sharing the engine, the store and one projection cache (SelectionView.__init__)."""


__all__ = ["Views", "FULL_CLUSTER_MAX", "IMAGE_METRICS_COLUMNS", "SIDE_BY_SIDE_COLUMNS", "SIDE_BY_SIDE_MAX", "switched_paths", "composite"]
