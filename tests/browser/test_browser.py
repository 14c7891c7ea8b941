"""The explorer in a real browser (Debian's chromium via Playwright): move the bit-width slider,
run a tiny calibration, wait for plots and images, switch the layer, save a screenshot.

Skips when /usr/bin/chromium or playwright is missing. Elements are found by their labels.
"""
import os
from pathlib import Path

import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, AppServer

ARGS = CHROMIUM_ARGS

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with AppServer(["--runs-dir", runs, "--iterations", "1", "--sampling-steps", "3", "--kmeans-iters", "5",
                    "--eval-per-class", "1", "--eval-steps", "3", "--image-steps", "3", "--no-umap-warmup",
                    "--no-demo-runs"], runs.parent / "server.log", env=dict(VQ4DIT_HOST="127.0.0.1"), timeout=120) as app:
        yield app.url, runs


def test_tiny_run_in_browser(server, tmp_path):
    url, runs = server
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        expect(page.get_by_text("VQ4DiT explorer")).to_be_visible(timeout=60_000)

        # bit-width slider -> k and d follow the paper's preset (3 bits: k=64, d=2), then back to 2
        bits = page.get_by_label("Bit-width (index bits per weight)").first
        page.get_by_text("Advanced").click()
        k_box = page.get_by_label("k (codewords, power of 2)")
        d_box = page.get_by_label("d (sub-vector length)")
        expect(k_box).to_have_value("256")
        bits.fill("3")
        bits.press("Enter")
        expect(k_box).to_have_value("64", timeout=20_000)
        expect(d_box).to_have_value("2")
        bits.fill("2")
        bits.press("Enter")
        expect(k_box).to_have_value("256", timeout=20_000)
        expect(page.get_by_label("iterations (trajectories)")).to_have_value("1")  # --iterations reached the UI

        # run: live status, then saved and loaded into every view
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.get_by_text("Loaded into every view.")).to_be_visible(timeout=240_000)
        expect(page.locator(".js-plotly-plot").first).to_be_visible()
        expect(page.get_by_text("Block-output MSE vs FP (log)")).to_be_visible()
        expect(page.get_by_role("button", name="Cancel")).to_be_disabled(timeout=20_000)   # idle again
        run_dirs = [d for d in runs.iterdir() if (d / "run.json").is_file()]
        assert len(run_dirs) == 1
        # the new run is in every run list at once, without Runs -> Refresh: Compare with, side by side
        rid = run_dirs[0].name
        compare = page.get_by_label("Compare with")
        compare.click()
        expect(page.get_by_role("option", name=rid[:15], exact=False).first).to_be_attached(timeout=20_000)
        compare.press("Escape")
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#runs-pick").get_by_text(rid[:15], exact=False).first).to_be_visible(timeout=20_000)

        # images are generated after the run (FP + the run, same noise)
        page.get_by_role("tab", name="Images").click()
        expect(page.locator("#samples img")).to_be_visible(timeout=180_000)
        expect(page.get_by_text("FP (reference)").first).to_be_visible(timeout=30_000)

        # switch the layer with the Layer dropdown; the clusters view follows
        page.get_by_role("tab", name="Codebook clusters").click()
        layer = page.get_by_label("Layer", exact=True)
        expect(layer).to_have_value("q (attn1.to_q)", timeout=30_000)
        expect(page.get_by_text("block 0 · q — step 3")).to_be_visible(timeout=30_000)  # plot title
        layer.click()
        page.get_by_role("option", name="fc1 (ff.net.0.proj)").click()
        expect(page.get_by_text("block 0 · fc1 — step 3")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Sampled 512 of")).to_be_visible()

        # per-block table: clicking a cell selects that block + layer everywhere
        page.get_by_role("tab", name="Per-block changes").click()
        table = page.get_by_label("Changed codewords (% of sub-vectors) — click a cell to select that layer")
        expect(table).to_be_visible(timeout=30_000)
        table.get_by_role("row").nth(3).get_by_role("gridcell").nth(5).click()  # block 2, fc1
        expect(page.get_by_label("Block", exact=True)).to_have_value("block 2", timeout=30_000)
        expect(layer).to_have_value("fc1 (ff.net.0.proj)")

        page.get_by_role("tab", name="Codebook clusters").click()
        expect(page.get_by_text("block 2 · fc1 — step 3")).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)  # let plotly finish drawing before the picture
        # CI writes to a temp dir; set VQ4DIT_SCREENSHOT=docs/screenshot.png to refresh the README picture
        out = Path(os.environ.get("VQ4DIT_SCREENSHOT") or tmp_path / "screenshot.png")
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    assert out.stat().st_size > 20_000


def test_views_follow_selection_in_browser(server, tmp_path):
    """After a reload: the saved run is loaded, its settings are back in the Set-up panel; typing a
    snapshot number updates the views; plots drawn in a hidden tab get the full width; no WebGL
    context leak on re-renders."""
    url, runs = server
    if not any((d / "run.json").is_file() for d in runs.iterdir()):
        pytest.skip("no saved run (the first browser test failed)")
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console = []
        page.on("console", lambda m: console.append(m.text))
        page.goto(url)
        expect(page.get_by_text("Loaded", exact=False).or_(page.get_by_text("Snapshot step")).first).to_be_visible(timeout=60_000)
        page.get_by_text("Advanced").click()
        expect(page.get_by_label("iterations (trajectories)")).to_have_value("1", timeout=30_000)
        expect(page.get_by_text("Estimate before running")).to_be_visible()

        page.get_by_role("tab", name="Codebook clusters").click()
        expect(page.get_by_text("— step 3: sub-vectors and codewords")).to_be_visible(timeout=60_000)
        snap = page.get_by_label("Snapshot", exact=False).first
        for v in ("0", "3", "0"):  # typed, not dragged; several re-renders of the cluster plot
            snap.fill(v)
            snap.press("Enter")
            expect(page.get_by_text(f"— step {v}: sub-vectors and codewords")).to_be_visible(timeout=60_000)

        page.get_by_role("tab", name="Per-block changes").click()
        page.wait_for_timeout(1500)
        widths = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].filter(e => e.offsetParent)
            .map(e => [e.getBoundingClientRect().width, e.querySelector('.main-svg').getBoundingClientRect().width])""")
        assert widths and all(svg >= 0.9 * box for box, svg in widths), widths
        out = tmp_path / "per-block.png"
        page.screenshot(path=str(out), full_page=True)

        # invalid image input: the error is shown, the images on screen stay
        page.get_by_role("tab", name="Images").click()
        labels = page.get_by_label("Class labels")
        labels.fill("1,2")
        page.get_by_role("button", name="Generate images").click()
        expect(page.locator("#samples img")).to_be_visible(timeout=180_000)
        labels.fill("0,12")
        page.get_by_role("button", name="Generate images").click()
        expect(page.get_by_text("class labels must be in [0, 9]").first).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)
        expect(page.locator("#samples img")).to_be_visible()
        page.screenshot(path=str(tmp_path / "images-invalid.png"), full_page=True)
        browser.close()
    assert not [m for m in console if "WebGL" in m], console
