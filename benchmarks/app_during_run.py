"""Explorer responsiveness while a calibration runs, in a real browser (Playwright + Debian's chromium).

    python -m benchmarks.app_during_run                 # table on stdout, CSV in out/benchmarks/
    python -m benchmarks.app_during_run --repeats 3 --iterations 40 --screenshot out/setup_during_run.png

`python app.py` (embedded digits DiT, empty runs dir: the demo runs are shown) is started; on the
Codebook clusters tab the block is switched `repeats` times while idle, then Run is pressed on the
Set-up tab (the recipe's run with `--iterations` trajectories) and, once calibration steps stream,
the block is switched `repeats` times again. Time: click until the cluster plot shows the new block
and no loading overlay is left (`--cap` seconds at most, recorded as not done). The Set-up tab is screenshotted
during the run, then the run is cancelled. The load average is recorded with every number.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.app_perf import ARGS, CHROMIUM, PENDING, load, pick, settled
from benchmarks.common import AppServer, write_csv


def wait_title(page, title: str, timeout_ms: float):
    page.wait_for_function("""(t) => [...document.querySelectorAll('.js-plotly-plot .gtitle')]
        .some(e => e.closest('.js-plotly-plot').offsetParent !== null && e.textContent.includes(t))""",
                           arg=title, timeout=timeout_ms, polling=20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="block switches idle and during the run")
    p.add_argument("--iterations", type=int, default=40, help="calibration trajectories of the run (long enough)")
    p.add_argument("--cap", type=float, default=180.0, help="seconds a switch may take before it counts as not done")
    p.add_argument("--out", default="out/benchmarks/app_during_run.csv")
    p.add_argument("--screenshot", default="out/setup_during_run.png")
    args = p.parse_args(argv)
    from playwright.sync_api import TimeoutError as PWTimeout
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
    runs_dir = tempfile.mkdtemp(prefix="vq4dit-during-run-")
    app = AppServer(["--runs-dir", runs_dir, "--no-umap-warmup", "--iterations", args.iterations],
                    out.with_suffix(".server.log"), timeout=300)
    url = app.url
    rows = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            app.wait()
            page.goto(url)
            page.wait_for_function("() => !(" + PENDING + ")()", timeout=120_000)
            page.get_by_role("tab", name="Codebook clusters").click()
            settled(page, title="sub-vectors and codewords")
            block = 0

            def switch(when: str):
                nonlocal block
                block = (block + 1) % 6
                t = pick(page, "Block", f"block {block}")
                try:  # during a run the picker's own overlay (the run's stream) stays up: wait for the plot only
                    wait_title(page, f"block {block} ·", args.cap * 1000) if when != "idle" else \
                        settled(page, title=f"block {block} ·", timeout=args.cap * 1000)
                    rows.append(dict(measure=f"switch block ({when})", seconds=round(time.time() - t, 3), load=load()))
                except PWTimeout:  # recorded as the cap; the next switch starts anyway
                    rows.append(dict(measure=f"switch block ({when}, not done within the cap)", seconds=args.cap,
                                     load=load()))
                print(rows[-1], flush=True)

            for _ in range(args.repeats):
                switch("idle")
            page.get_by_role("tab", name="Set up & calibrate").click()
            page.get_by_role("button", name="Run", exact=True).click()
            t_run = time.time()
            page.get_by_text("calibrating: step", exact=False).first.wait_for(timeout=600_000)
            rows.append(dict(measure="Run click -> first calibration step shown", seconds=round(time.time() - t_run, 3),
                             load=load()))
            print(rows[-1], flush=True)
            page.get_by_role("tab", name="Codebook clusters").click()
            for _ in range(args.repeats):
                switch("during calibration")
            page.get_by_role("tab", name="Set up & calibrate").click()
            time.sleep(3)  # a few status updates
            page.screenshot(path=args.screenshot, full_page=False)
            page.get_by_role("button", name="Cancel").click()
            t_c = time.time()
            try:
                page.get_by_text("image evaluation skipped", exact=False).first.wait_for(timeout=args.cap * 1000)
                rows.append(dict(measure="Cancel click -> saved", seconds=round(time.time() - t_c, 3), load=load()))
            except PWTimeout:
                rows.append(dict(measure="Cancel click -> saved (not done within the cap)", seconds=args.cap,
                                 load=load()))
            print(rows[-1], flush=True)
            browser.close()
    finally:
        app.stop()
    write_csv(rows, out, ["measure", "seconds", "load"], comment=f"{' '.join(sys.argv)}; load = 1/5/15-min averages")
    for r in rows:
        print(f"{r['measure']:<45} {r['seconds']:>8.2f} s   load {r['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
