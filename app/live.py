"""The run in progress in the analysis tabs: the worker's snapshots (run.json + partial trace, see
app/worker.py) are the run `LIVE_ID` of the store; a timer re-issues the selection when the live run
is the selected one and a new snapshot exists, so only the open tab redraws (render_layer_views)."""
from __future__ import annotations

import gradio as gr

from .store import LIVE_ID, run_label

LIVE_REFRESH_S = 5.0  # timer period; the worker writes a snapshot at most every LIVE_TRACE_EVERY_S
# the timer's tick in the page: a new value (-> live_tick on the server) only while the run in the URL
# is the live one, else the same value (no change event, no request): an idle page asks nothing
LIVE_POKE_JS = f"(v) => new URLSearchParams(location.search).get('run') === '{LIVE_ID}' ? String(Date.now()) : v"


def live_choice(store):
    """(label, LIVE_ID) for the run pickers while a run goes and has a snapshot, else None."""
    if store.live is None:
        return None
    try:
        m = store.meta(LIVE_ID)
    except ValueError:
        return None
    return (f"▶ live: {run_label(m)} {m.get('steps_done')}/{m.get('total_steps')}", LIVE_ID)


def live_tick(engine, views, sel):
    """Timer tick -> (snapshot slider, selection, run picker). Nothing unless the live run is selected:
    a new snapshot re-selects the same block and layer at the newest step; once the run is saved, the
    picker moves to the saved run (the client that pressed Run gets that from its stream too)."""
    if not sel or sel.get("run") != LIVE_ID:
        return gr.skip(), gr.skip(), gr.skip()
    store = engine.store
    if store.live is None:
        a = engine.active
        rid = a.run_id if a is not None and a.done.is_set() else None
        if rid is None:
            return gr.skip(), gr.skip(), gr.skip()
        return gr.skip(), gr.skip(), gr.update(choices=views.run_choices(), value=rid)
    if sel.get("live_version") == store.live_version:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        new = views.initial_selection(LIVE_ID, sel.get("block"), sel.get("layer"))
    except ValueError:  # the snapshot was replaced or withdrawn meanwhile: next tick
        return gr.skip(), gr.skip(), gr.skip()
    new = dict(sel, **new, live_version=store.live_version)
    n = len(views.steps_of(LIVE_ID))
    return gr.update(maximum=max(n - 1, 1), value=new["snap"]), new, gr.update(choices=views.run_choices())
