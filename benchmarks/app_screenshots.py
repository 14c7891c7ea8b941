"""Screenshot every tab of the explorer on first open (empty runs dir: the demo runs), headless
Chromium at 1400x900, full page.

    python -m benchmarks.app_screenshots --out /tmp/shots     # then look at /tmp/shots/*.png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.app_perf import ARGS, CHROMIUM, PENDING, TABS
from benchmarks.common import AppServer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "vq4dit-shots"))
    p.add_argument("--runs-dir", default=None, help="default: a new empty one (the demo runs are shown)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = args.runs_dir or tempfile.mkdtemp(prefix="vq4dit-shots-runs-")
    with AppServer(["--runs-dir", runs, "--no-umap-warmup"], out / "server.log") as app:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(app.url)
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
            for i, name in enumerate(TABS[-1:] + TABS[:-1]):
                page.get_by_role("tab", name=name).click()
                page.wait_for_timeout(500)
                page.wait_for_function("() => !(" + PENDING + ")()", timeout=180_000)
                page.wait_for_timeout(1500)   # plotly draws after the data arrives
                f = out / f"{i}-{name.split()[0].lower().replace('&', '')}.png"
                page.screenshot(path=str(f), full_page=True)
                print(f)
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
