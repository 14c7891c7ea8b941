"""The page's state in its URL, and the per-tab selection keys that spare redraws.

    ?run=demo-vq4dit-ste-W2&block=3&layer=fc1&snap=0&tab=changes

`parse_query` reads the query of a page load (anything malformed is dropped, never an error: the
page then opens on its defaults); `query_string` writes the selection back (the page's script
appends the visible tab and calls `history.replaceState`, so a reload restores the view). Layers
travel by kind (q, k, v, out, fc1, fc2, adaLN): the block is its own parameter.

`selection_key` names what a tab's views show; `view_state` hands the page the current key and the
key each tab was last drawn with, so switching to a tab that is up to date sends nothing to the server.
"""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional
from urllib.parse import urlencode

from vq4dit.naming import layer_kind

from .config import RUN_ID_RE

# Tab labels -> ids (as in layout.py), the tabs with layer views, and which of those views each draws.
TAB_IDS = {"Set up & calibrate": "setup", "Codebook clusters": "clusters", "Assignment evolution": "evolution",
           "Mechanism": "mechanism",
           "Gradient conflicts": "conflicts", "Per-block changes": "changes", "Images": "images", "Runs": "runs"}
TAB_VIEWS = {"clusters": ["cluster_plot", "cluster_note"], "evolution": ["evol_plot", "evol_cmp_plot"],
             "mechanism": ["mech_md", "mech_plot"],
             "conflicts": ["conflict_note", "other_btn", "conflict_plot", "worst_plot", "summary_plot", "summary_md"],
             "changes": ["heat_plot", "changes_df", "mse_plot"]}
_LAYER_KIND_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_LAYER_NAME_RE = re.compile(r"[A-Za-z0-9_.]{1,200}")
_INT_MAX = 10**6   # larger block or snapshot numbers are not a selection, just noise


def _index(v) -> Optional[int]:
    """A non-negative decimal integer, else None ('3' -> 3; '-1', '3.5', '1e9', 'x' -> None)."""
    s = str(v).strip()
    return int(s) if s.isdigit() and len(s) <= 7 and int(s) <= _INT_MAX else None


def _kind(layer) -> Optional[str]:
    """A layer kind ('fc1'), or the kind of a full layer name; None for anything else."""
    if not isinstance(layer, str) or not _LAYER_NAME_RE.fullmatch(layer):
        return None
    kind = layer_kind(layer)
    return kind if _LAYER_KIND_RE.fullmatch(kind) else None


def parse_query(params: Mapping) -> dict:
    """The page's query parameters -> {run, block, layer, snap, tab}, each None when absent or malformed
    (a run id the store could never hold, a negative block, an unknown tab...). Whether the run exists and
    the block is in range is for the caller to check (`Handlers.restore` falls back to its defaults)."""
    get = params.get
    run, layer, tab = get("run"), get("layer"), get("tab")
    return dict(
        run=run if isinstance(run, str) and RUN_ID_RE.fullmatch(run) and ".." not in run else None,
        block=_index(get("block")) if get("block") is not None else None,
        layer=_kind(layer),
        snap=_index(get("snap")) if get("snap") is not None else None,
        tab=tab if tab in TAB_IDS.values() else None)


def query_string(sel: Optional[dict]) -> str:
    """The selection as a query (no '?', no tab): run, block, layer kind, snapshot; '' with no run."""
    if not sel or not sel.get("run"):
        return ""
    q = dict(run=sel["run"], block=int(sel.get("block") or 0))
    if sel.get("layer"):
        q["layer"] = layer_kind(sel["layer"])
    q["snap"] = int(sel.get("snap") or 0)
    return urlencode(q)


def page_query(sel: Optional[dict], tab: Optional[str]) -> str:
    """The whole page's query: the selection's, then the tab (what the page's script writes too)."""
    return "&".join(p for p in (query_string(sel), urlencode(dict(tab=tab)) if tab else "") if p)


def selection_key(sel: Optional[dict], color_by=None, projection=None, full=False) -> str:
    """What a tab's views show, as one string: two equal keys draw the same figures."""
    return json.dumps([sel, color_by, projection, bool(full)], sort_keys=True, default=str)


def view_state(sel: Optional[dict], key: str, rendered: Optional[dict]) -> str:
    """JSON for the page's script: the selection's query, its key and each tab's last drawn key."""
    return json.dumps(dict(query=query_string(sel), key=key, drawn=dict(rendered or {})), default=str)


# The page's scripts (js= of events, no server call). `view_state` lives as text in #view-state.
_JS_HELPERS = "const TAB_IDS = " + json.dumps(TAB_IDS) + ";\nconst LAYER_TABS = " + json.dumps(list(TAB_VIEWS)) + """;
const parse = (vs) => { try { return JSON.parse(vs || '{}'); } catch (e) { return {}; } };
const writeUrl = (s, tab) => {
  const q = (s.query || '') + (tab ? ((s.query ? '&' : '') + 'tab=' + encodeURIComponent(tab)) : '');
  const url = window.location.pathname + (q ? '?' + q : '');
  if (url !== window.location.pathname + window.location.search) history.replaceState(null, '', url);
};
// the `stale` box's next value: 'tab:time' (ask the server to draw `tab`) or unchanged (ask nothing)
const redraw = (s, tab, stale) => LAYER_TABS.includes(tab) && (s.drawn || {})[tab] !== s.key
  ? tab + ':' + Date.now() : stale;
"""
# A page load restored a state: the address bar shows it (`Handlers.restore` wrote the query).
SET_URL_JS = "(q) => { history.replaceState(null, '', window.location.pathname + (q && q !== '?' ? q : '')); }"
# view_state changed (a render finished): the URL follows the selection, and if the visible tab is not
# the one that render drew (it was opened meanwhile, still showing the previous selection), it is drawn.
WRITE_URL_JS = "(vs, tab, stale) => {" + _JS_HELPERS + """
  const s = parse(vs); writeUrl(s, tab); return redraw(s, tab, stale);
}"""
# A tab opened: its id goes to the hidden tab box (no server call); only when that tab's views were
# drawn for another selection is the `stale` box changed, which starts the server's render. The Images
# tab asks the server only while it shows no picture (it may have shipped images to show at once).
TAB_JS = "(vs, tab, stale, shown) => {" + _JS_HELPERS + """
  const b = document.querySelector('button[role=tab][aria-selected=true]');
  const id = b ? (TAB_IDS[b.textContent.trim()] || tab) : tab;
  const s = parse(vs);
  const images = id === 'images' && !document.querySelector('#samples img');
  writeUrl(s, id);
  return [id, redraw(s, id, stale), images ? 'images:' + Date.now() : shown];
}"""
