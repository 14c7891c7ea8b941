"""The page's state in its URL (app/url_state.py) and the handlers that read and write it: a query is
parsed leniently (anything malformed dropped), restored through the store (unknown runs and blocks out
of range fall back to the defaults), written back, and a tab drawn for the current selection is not
drawn again. Also the Runs tab's side-by-side selection and Set-up's budget on a run load."""
import json
from types import SimpleNamespace
from urllib.parse import parse_qsl

import pytest

from app.url_state import TAB_IDS, page_query, parse_query, query_string, selection_key, view_state

W2 = "demo-vq4dit-ste-W2"


def test_parse_query_reads_valid_values():
    q = parse_query({"run": W2, "block": "3", "layer": "fc1", "snap": "0", "tab": "changes"})
    assert q == dict(run=W2, block=3, layer="fc1", snap=0, tab="changes")
    # a full layer name travels as its kind; every tab id is accepted
    assert parse_query({"layer": "transformer_blocks.3.attn1.to_q"})["layer"] == "q"
    assert {parse_query({"tab": t})["tab"] for t in TAB_IDS.values()} == set(TAB_IDS.values())
    assert parse_query({}) == dict(run=None, block=None, layer=None, snap=None, tab=None)


@pytest.mark.parametrize("key,value", [
    ("run", "../etc"), ("run", "a/b"), ("run", ""), ("run", "x" * 200),
    ("block", "-1"), ("block", "3.5"), ("block", "1e9"), ("block", "99999999"), ("block", "three"),
    ("snap", "-3"), ("snap", ""), ("layer", "<script>"), ("layer", "a b"), ("layer", "x" * 300),
    ("tab", "bogus"), ("tab", "Setup")])
def test_parse_query_drops_malformed_values(key, value):
    assert parse_query({key: value})[key] is None


def test_query_round_trip():
    sel = dict(run=W2, block=4, layer="transformer_blocks.4.ff.net.2", snap=5, other=None)
    q = dict(parse_qsl(page_query(sel, "clusters")))
    assert q == dict(run=W2, block="4", layer="fc2", snap="5", tab="clusters")
    back = parse_query(q)
    assert (back["run"], back["block"], back["layer"], back["snap"], back["tab"]) == (W2, 4, "fc2", 5, "clusters")
    assert query_string(None) == "" and query_string(dict(run=None)) == ""
    assert page_query(None, "runs") == "tab=runs"


def test_selection_key_names_what_a_tab_shows():
    a = dict(run=W2, block=1, layer="x", snap=2)
    assert selection_key(a, "codeword", "PCA") == selection_key(dict(reversed(list(a.items()))), "codeword", "PCA")
    assert selection_key(a, "codeword", "PCA") != selection_key(dict(a, snap=3), "codeword", "PCA")
    assert selection_key(a, "codeword", "PCA") != selection_key(a, "top ratio", "PCA")
    assert selection_key(a, "codeword", "PCA", False) != selection_key(a, "codeword", "PCA", True)
    vs = json.loads(view_state(a, "k1", {"clusters": "k1", "changes": "k0"}))
    assert vs == dict(query=query_string(a), key="k1", drawn={"clusters": "k1", "changes": "k0"})


# ---------------------------------------------------------------------------------------------------
# The handlers, on the shipped demo runs (empty runs dir)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from app import AppConfig, create_app
    return create_app(AppConfig(runs_dir=str(tmp_path_factory.mktemp("runs")), warm_umap=False, spare_worker=False))


def _fn(demo, name):
    return next(f for f in demo.fns.values() if f.name == name).fn


def _restore(demo, **query):
    out = _fn(demo, "restore")(None, SimpleNamespace(query_params=query))
    names = ["run", "block", "layer", "snap", "sel", "live", "dl_trace", "dl_model", "tabs", "tab", "url"]
    return dict(zip(names, out))


def _value(u):
    return u.get("value") if isinstance(u, dict) else u


def test_restore_opens_the_query_state(demo):
    r = _restore(demo, run=W2, block="3", layer="fc1", snap="0", tab="changes")
    assert _value(r["run"]) == W2 and _value(r["block"]) == 3 and _value(r["snap"]) == 0
    assert _value(r["layer"]) == "transformer_blocks.3.ff.net.0.proj"
    assert r["sel"] == dict(run=W2, block=3, layer="transformer_blocks.3.ff.net.0.proj", snap=0)
    assert r["tab"] == "changes" and r["tabs"].selected == "changes"
    assert dict(parse_qsl(r["url"][1:])) == dict(run=W2, block="3", layer="fc1", snap="0", tab="changes")


def test_restore_falls_back_to_defaults(demo):
    from app.demo import FIRST_DEMO
    last = len(demo.views.steps_of(FIRST_DEMO)) - 1
    r = _restore(demo, run="no-such-run", block="99", layer="zzz", snap="-3", tab="bogus")
    assert _value(r["run"]) == FIRST_DEMO and r["sel"]["block"] == 0 and r["sel"]["snap"] == last
    assert r["tab"] == "setup" and dict(parse_qsl(r["url"][1:]))["run"] == FIRST_DEMO
    # an unknown run: its block and snapshot are not applied to the default run either
    r = _restore(demo, run="no-such-run", block="2", snap="1", tab="clusters")
    assert _value(r["run"]) == FIRST_DEMO and (r["sel"]["block"], r["sel"]["snap"]) == (0, last)
    assert r["tab"] == "clusters"
    # a known run with a block out of range and a snapshot past the end: block 0, the final snapshot
    r = _restore(demo, run=W2, block="6", snap="1000", layer="adaLN")
    assert r["sel"]["block"] == 0 and r["sel"]["snap"] == len(demo.views.steps_of(W2)) - 1
    assert r["sel"]["layer"].endswith("norm1.linear")   # the layer kind is kept in block 0
    # no query at all: the default run
    assert _value(_restore(demo)["run"]) == FIRST_DEMO


def test_restore_sends_nothing_the_first_paint_already_shows(demo):
    sel = demo.ui.sel.value   # the page's first paint (the default run)
    skip = {"__type__": "update"}
    for query in ({}, dict(tab="changes"), dict(run="no-such-run"),
                  dict(run=sel["run"], block=str(sel["block"]), snap=str(sel["snap"]), tab="mechanism")):
        out = _fn(demo, "restore")(sel, SimpleNamespace(query_params=query))
        assert all(o == skip for o in out[:8]), query
        assert dict(parse_qsl(out[-1][1:]))["run"] == sel["run"]
    out = _fn(demo, "restore")(sel, SimpleNamespace(query_params=dict(run=sel["run"], block="4")))
    assert out[4]["block"] == 4 and out[4]["snap"] == sel["snap"]   # asked for another block: loaded


def test_a_tab_drawn_for_this_selection_is_not_drawn_again(demo):
    from app.handlers import LAYER_VIEWS
    render, open_tab = _fn(demo, "render_page"), _fn(demo, "open_tab")
    sel = demo.views.initial_selection(W2, 2)
    skipped = lambda v: isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1
    out = render("changes", {}, sel, "codeword", "PCA", False)
    views, rendered, vs = dict(zip(LAYER_VIEWS, out[:-2])), out[-2], json.loads(out[-1])
    assert not skipped(views["heat_plot"]) and skipped(views["cluster_plot"])
    assert vs["drawn"] == {"changes": vs["key"]} and vs["key"] == selection_key(sel, "codeword", "PCA", False)
    # the page's script asks the server only for a stale tab; if it did ask for a fresh one, nothing is drawn
    again = open_tab("changes:1", rendered, sel, "codeword", "PCA", False)
    assert all(skipped(v) for n, v in zip(LAYER_VIEWS, again) if n != "sel_md")
    fresh = open_tab("clusters:2", rendered, sel, "codeword", "PCA", False)
    assert not skipped(dict(zip(LAYER_VIEWS, fresh))["cluster_plot"])
    assert set(json.loads(fresh[-1])["drawn"]) == {"changes", "clusters"}
    assert all(skipped(v) for v in open_tab("", rendered, sel, "codeword", "PCA", False))


def test_runs_side_by_side(demo):
    from app.demo import FIRST_DEMO
    views = demo.views
    picked = [FIRST_DEMO, "demo-codebook-only-XL-sharing", W2, "no-such-run"]
    note, fig, table = views.side_by_side(picked)
    assert list(table["run"]) == picked[:3] and "1 picked run(s) left out" in note
    assert list(table["k x d"]) == ["16x4", "16x4", "256x4"]
    assert [t.type for t in fig.data] == ["bar"] * 3 and all(len(t.y) == 3 for t in fig.data)
    store = demo.engine.store
    bpw = [round(store.meta(r)["bits_per_weight"], 3) for r in picked[:3]]
    assert list(fig.data[0].x) == bpw and list(fig.data[1].x) == [round(store.meta(r)["block_mse"], 5)
                                                                   for r in picked[:3]]
    assert all(r.split(" · ")[0] in views.run_choices()[[c[1] for c in views.run_choices()].index(i)][0]
               for r, i in zip(fig.data[0].y, picked[:3]))   # bars labelled like the pickers: k x d, b/w
    # the shipped images at the Images tab's defaults: shown at once, one row per picked run after FP
    compare = _fn(demo, "compare_runs")
    note, fig, table, img, itable = compare(picked[:3], None, "0-9", 0, 4.0, demo.engine.cfg.image_steps, "")
    assert img is not None and list(itable["run"]) == ["-"] + picked[:3]
    assert "16×4, 1.11 b/w" in itable["model"].iloc[1]
    # images that need sampling wait for the button
    out = compare(picked[:2], None, "0-9", 7, 4.0, demo.engine.cfg.image_steps, "")
    assert out[3] is None and "Images side by side" in out[0]
    assert views.side_by_side([])[2].empty


def test_empty_tables_show_their_column_names(demo):
    """Before anything is picked, the side-by-side and image-metric tables name their columns
    (a bare gr.Dataframe shows the placeholder headers 1, 2, 3)."""
    from app.views import IMAGE_METRICS_COLUMNS, SIDE_BY_SIDE_COLUMNS
    labels = {"Picked runs": SIDE_BY_SIDE_COLUMNS, "Image metrics": IMAGE_METRICS_COLUMNS,
              "Image metrics of the picked runs": IMAGE_METRICS_COLUMNS}
    seen = {}
    for c in demo.config["components"]:
        p = c.get("props", {})
        if c.get("type") == "dataframe" and p.get("label") in labels:
            seen[p["label"]] = p["value"]["headers"]
    assert seen == labels


def test_loading_a_run_keeps_set_ups_budget(demo):
    from dataclasses import fields

    from app.forms import SetupForm
    out = _fn(demo, "run_context")(W2)
    setup = dict(zip([f.name for f in fields(SetupForm)], out[4:4 + len(fields(SetupForm))]))
    meta = demo.engine.store.meta(W2)
    assert _value(setup["method"]) == meta["settings"]["method"] and _value(setup["k"]) == meta["k"]
    assert setup["iterations"] == {"__type__": "update"} and setup["sampling_steps"] == {"__type__": "update"}
    assert "not** copied" in out[-1] and "Loaded" in out[-1]
