"""The explorer's state in a real browser (Debian's chromium via Playwright), on the shipped demo runs
with an empty runs dir: the URL restores run / block / layer / snapshot / tab on reload, an invalid
query falls back to the defaults, switching to a tab that is up to date asks the server nothing, a
snapshot drag asks once, an all-zero heatmap is white with a note, and ticked runs show side by side.

Screenshots go to $VQ4DIT_SCREENSHOT_DIR when set (else the test's temp dir).
"""
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, AppServer

ARGS = CHROMIUM_ARGS
W2 = "demo-vq4dit-ste-W2"

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with AppServer(["--runs-dir", runs, "--no-umap-warmup"], runs.parent / "server.log") as app:
        fns = {d["api_name"]: d["id"] for d in json.loads(urllib.request.urlopen(app.url + "config").read())["dependencies"]}
        yield app.url, fns


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.calls, pg.inputs = [], []   # fn ids and first input of every server call the page makes (queue joins)

        def joined(r):
            if "/queue/join" in r.url:
                body = json.loads(r.post_data or "{}")
                pg.calls.append(body.get("fn_index"))
                pg.inputs.append((body.get("data") or [None])[0])
        pg.on("request", joined)
        yield pg
        browser.close()


def _shot(pg, tmp_path, name, locator=None):
    out = Path(os.environ.get("VQ4DIT_SCREENSHOT_DIR") or tmp_path) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    (locator or pg).screenshot(path=str(out), **({} if locator else dict(full_page=True)))
    return out


def _selected_tab(pg):
    return pg.evaluate("document.querySelector('button[role=tab][aria-selected=true]').textContent.trim()")


def _query(pg):
    from urllib.parse import parse_qsl, urlparse
    return dict(parse_qsl(urlparse(pg.url).query))


def _settle(pg, ms=2500):
    """Wait until the page made no server call for `ms` (renders and their follow-ups are done)."""
    n, t = -1, time.time()
    while time.time() - t < 60:
        if len(pg.calls) == n:
            return
        n = len(pg.calls)
        pg.wait_for_timeout(ms)


def test_reload_restores_the_url_state_and_empty_heatmap_is_white(server, page, tmp_path):
    url, _ = server
    from playwright.sync_api import expect
    page.goto(url + f"?run={W2}&block=3&layer=fc1&snap=0&tab=changes")
    block, layer = page.get_by_label("Block", exact=True), page.get_by_label("Layer", exact=True)
    expect(block).to_have_value("block 3", timeout=90_000)
    expect(layer).to_have_value("fc1 (ff.net.0.proj)", timeout=30_000)
    expect(page.get_by_text(f"Run {W2}", exact=False).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("step 0 of", exact=False).first).to_be_visible(timeout=30_000)
    assert _selected_tab(page) == "Per-block changes"

    # snapshot 0: no sub-vector has changed codeword -> the heatmap is white and says so
    expect(page.get_by_text("no sub-vector changed codeword (0% everywhere)")).to_be_visible(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#heat-plot .js-plotly-plot .hm') !== null", timeout=60_000)
    page.locator("#heat-plot").scroll_into_view_if_needed()
    page.wait_for_timeout(800)
    cells = page.evaluate("""() => { const gd = document.querySelector('#heat-plot .js-plotly-plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
        const pts = []; for (const [x, y] of [[0, 0], [3, 2], [6, 5], [4, 1]])   // off the cell's centre text
          pts.push([r.left + xa._offset + xa.l2p(x + 0.35), r.top + ya._offset + ya.l2p(y + 0.3)]);
        return pts; }""")
    shot = _shot(page, tmp_path, "restored-url-empty-heatmap.png")
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    scroll = page.evaluate("window.scrollY")
    for x, y in cells:
        assert min(img.getpixel((int(x), int(y + scroll)))) >= 245, (x, y, img.getpixel((int(x), int(y + scroll))))

    # a selection change is written to the URL; a reload restores it (run, block, layer, snapshot, tab)
    layer.click()
    page.get_by_role("option", name="adaLN (norm1.linear)").click()
    page.wait_for_function("() => new URLSearchParams(location.search).get('layer') === 'adaLN'", timeout=60_000)
    page.get_by_role("tab", name="Codebook clusters").click()
    page.wait_for_function("() => new URLSearchParams(location.search).get('tab') === 'clusters'", timeout=30_000)
    assert _query(page) == dict(run=W2, block="3", layer="adaLN", snap="0", tab="clusters")
    page.reload()
    expect(layer).to_have_value("adaLN (norm1.linear)", timeout=90_000)
    expect(block).to_have_value("block 3")
    expect(page.get_by_text("block 3 · adaLN — step 0").first).to_be_visible(timeout=60_000)  # cluster plot title
    assert _selected_tab(page) == "Codebook clusters"
    assert page.get_by_label("Method").input_value() == "vq4dit-ste"   # Set-up follows the run on screen
    _shot(page, tmp_path, "restored-url-clusters.png")


def test_invalid_query_falls_back_to_the_defaults(server, page):
    url, _ = server
    from playwright.sync_api import expect

    from app.demo import FIRST_DEMO
    page.goto(url + "?run=no-such-run&block=99&layer=%3Cscript%3E&snap=-3&tab=bogus")
    expect(page.get_by_text(f"Calibration of {FIRST_DEMO}")).to_be_visible(timeout=90_000)
    expect(page.get_by_label("Block", exact=True)).to_have_value("block 0", timeout=30_000)
    _settle(page)
    assert _selected_tab(page) == "Set up & calibrate"
    assert page.locator(".toast-body").count() == 0   # no error shown
    q = _query(page)
    assert q["run"] == FIRST_DEMO and q["block"] == "0" and q["tab"] == "setup"   # the address bar is cleaned
    # idle: Cancel is not active; Set-up's method is the run's on screen
    assert page.get_by_role("button", name="Cancel").is_disabled()
    assert page.get_by_label("Method").input_value() == "vq4dit-ste"


def test_tab_switch_without_change_asks_nothing_and_a_drag_asks_once(server, page):
    url, fns = server
    from playwright.sync_api import expect
    page.goto(url + f"?run={W2}&block=2&tab=changes")
    expect(page.get_by_label("Block", exact=True)).to_have_value("block 2", timeout=90_000)
    expect(page.get_by_text("Codeword differs from the run's start").first).to_be_visible(timeout=60_000)
    _settle(page)
    page.calls.clear()
    page.get_by_role("tab", name="Codebook clusters").click()     # drawn for another selection: one call
    expect(page.get_by_text("block 2 · q — step").first).to_be_visible(timeout=60_000)
    _settle(page)
    assert len(page.calls) == 1, page.calls
    page.calls.clear()
    for name in ("Per-block changes", "Codebook clusters", "Per-block changes", "Set up & calibrate",
                 "Codebook clusters"):                          # all up to date: nothing asked
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(600)
    _settle(page, 1500)
    assert page.calls == [], page.calls
    assert _query(page)["tab"] == "clusters"

    # dragging the snapshot slider across several positions: one update, on release
    rng = page.locator("#snap-slider input[type=range]")
    box = rng.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    for f in (0.2, 0.4, 0.6, 0.8):
        page.mouse.move(box["x"] + f * box["width"], y, steps=3)
        page.wait_for_timeout(300)
    page.mouse.up()
    _settle(page)
    assert page.calls.count(fns["on_snap"]) == 1, page.calls
    snap = int(page.locator("#snap-slider input[type=number]").input_value())
    assert snap > 0 and _query(page)["snap"] == str(snap)


def test_ticked_runs_show_side_by_side(server, page, tmp_path):
    url, _ = server
    from playwright.sync_api import expect
    page.goto(url + "?tab=runs")
    expect(page.locator("#runs-pick")).to_be_visible(timeout=90_000)
    pick = page.locator("#runs-pick")
    names = ["vq4dit-ste 16×4, 1.11 b/w", "codebook-only 16×4, 1.11 b/w", "vq4dit-ste 256×4, 2.20 b/w"]
    for name in names:
        pick.get_by_label(name, exact=False).first.check()
        page.wait_for_timeout(700)
    expect(page.get_by_text("3 runs side by side").first).to_be_visible(timeout=60_000)
    expect(page.locator("#side-images img")).to_be_visible(timeout=60_000)   # shipped images: at once
    n_bars = page.evaluate("""() => [...document.querySelector('#side-plot .js-plotly-plot').data]
        .map(t => t.y.length)""")
    assert n_bars == [3, 3, 3]
    table = page.locator("#side-table")
    for rid in ("demo-vq4dit-ste-XL-sharing", "demo-codebook-only-XL-sharing", W2):   # one row per ticked run
        assert table.get_by_text(rid, exact=True).count() >= 1, rid
    expect(table.get_by_text("demo-codebook-only-W2", exact=True)).to_have_count(0)
    labels = page.evaluate("document.querySelector('#side-plot .js-plotly-plot').data[0].y")
    assert [lab.split(" · ")[0] for lab in labels] == [n.replace(" — demo", "") for n in names]
    h = page.evaluate("document.querySelector('#side-images img').naturalHeight")
    assert h > 6 * 64   # FP + 3 runs with their difference rows
    page.locator("#side-by-side").first.scroll_into_view_if_needed()
    page.wait_for_timeout(800)
    _shot(page, tmp_path, "runs-side-by-side.png", page.locator("#side-by-side").first)


def test_method_change_loads_its_run_keeps_the_budget_and_replaces_the_status(server, page):
    """Set-up's Method does the bit slider's run lookup: the newest finished run of that method at the
    setting's k x d is loaded; the status line then names it (the previous message is gone); Set-up's
    budget stays its own (the demo run's 4 x 25 steps are not copied)."""
    url, _ = server
    from playwright.sync_api import expect
    page.goto(url)
    expect(page.get_by_text("Calibration of demo-vq4dit-ste-XL-sharing")).to_be_visible(timeout=90_000)
    _settle(page)
    page.get_by_text("Advanced").click()
    iters, steps = page.get_by_label("iterations (trajectories)"), page.get_by_label("sampling steps per trajectory")
    budget = (iters.input_value(), steps.input_value())
    assert budget != ("4", "25")   # the server's recipe, not the demo runs' budget
    method = page.get_by_label("Method")
    method.click()
    page.get_by_role("option", name="codebook-only", exact=True).click()
    expect(page.get_by_text("Loaded `demo-codebook-only-XL-sharing`", exact=False).or_(
        page.get_by_text("Loaded demo-codebook-only-XL-sharing", exact=False)).first).to_be_visible(timeout=60_000)
    expect(page.get_by_label("Run", exact=True)).to_have_value("codebook-only 16×4, 1.11 b/w — demo")
    expect(page.get_by_text("Idle. Press")).to_have_count(0)
    expect(page.get_by_text("not copied", exact=False).first).to_be_visible()
    _settle(page)
    assert (iters.input_value(), steps.input_value()) == budget
    assert method.input_value() == "codebook-only"
    page.wait_for_function("() => new URLSearchParams(location.search).get('run') === 'demo-codebook-only-XL-sharing'",
                           timeout=30_000)


def test_a_tab_opened_while_its_render_runs_shows_the_new_selection(server, page):
    """Block changed on one tab and another tab opened while that tab's render runs (the opened tab's
    views were drawn for the previous block; the render under way draws only the first tab): the
    opened tab is drawn after it. (The Gradient conflicts tab: its render takes long enough to open
    another tab meanwhile.)"""
    url, _ = server
    from playwright.sync_api import expect
    page.goto(url + f"?run={W2}&block=1&tab=changes")
    heat_block = """(b) => { const gd = document.querySelector('#heat-plot .js-plotly-plot');
        return gd && gd.layout.shapes && gd.layout.shapes.length && gd.layout.shapes[0].y0 === b - 0.5; }"""
    page.wait_for_function(heat_block, arg=1, timeout=90_000)      # drawn for block 1
    page.get_by_role("tab", name="Gradient conflicts").click()
    expect(page.get_by_text("Model-wide conflict summary").first).to_be_visible(timeout=60_000)
    _settle(page, 1500)
    page.get_by_label("Block", exact=True).click()
    page.inputs.clear()
    page.get_by_role("option", name="block 4", exact=True).click()
    t = time.time()
    while "conflicts" not in page.inputs and time.time() - t < 30:   # the conflicts tab's render was sent
        page.wait_for_timeout(5)
    assert "conflicts" in page.inputs, page.inputs
    page.evaluate("""() => [...document.querySelectorAll('button[role=tab]')]   // at once, while it runs
        .find(b => b.textContent.trim() === 'Per-block changes').click()""")
    page.wait_for_function(heat_block, arg=4, timeout=60_000)
    _settle(page, 1500)
    assert _query(page)["block"] == "4" and _query(page)["tab"] == "changes"
