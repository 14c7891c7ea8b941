"""Explorer performance in a real browser (Debian's chromium via Playwright), not a unit test.

    python -m benchmarks.app_perf                    # table on stdout, CSVs in out/benchmarks/
    python -m benchmarks.app_perf --repeats 20 --runs-dir runs

1. Start: `python app.py` is started twice (cold = first start in this script, warm = second
   start, Python and OS caches warm); time from the process start to the first plot with data
   drawn in the browser (the page opens on the default run: a demo run with an empty runs dir).
2. Selection: on the Codebook clusters tab, switch block / layer / snapshot / run; time from the
   click (or Enter) until every visible view is updated (the cluster plot's title and the
   selection line show the new selection and no loading overlay is left).
3. Tabs: time from a tab click until its plots are drawn and no loading overlay is left.
The machine's load average is recorded with the numbers, since it shares CPUs.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CHROMIUM, AppServer, write_csv
from benchmarks.common import CHROMIUM_ARGS as ARGS

PENDING = """() => [...document.querySelectorAll('[data-testid="status-tracker"]')]
                 .some(e => !e.classList.contains('hide') && e.offsetParent !== null)"""
PLOT_WITH_DATA = """() => [...document.querySelectorAll('.js-plotly-plot')].some(
                 e => e.offsetParent !== null && e.querySelector('.scatterlayer .trace, .heatmaplayer .hm, .barlayer .trace'))"""
TABS = ["Codebook clusters", "Assignment evolution", "Mechanism", "Gradient conflicts", "Per-block changes", "Images", "Runs",
        "Set up & calibrate"]


def load() -> str:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def first_plot(page, app: AppServer) -> float:
    """Seconds from the process start to the first plot with data in the page."""
    app.wait(poll_s=0.05)
    page.goto(app.url)
    page.wait_for_function(PLOT_WITH_DATA, timeout=120_000, polling=50)
    return time.time() - app.t0


def settled(page, title: str | None = None, text: str | None = None, timeout=60_000):
    """Wait until the visible cluster plot's title contains `title`, the selection line contains
    `text`, and no loading overlay is visible."""
    if title:
        page.wait_for_function("""(t) => [...document.querySelectorAll('.js-plotly-plot .gtitle')]
            .some(e => e.closest('.js-plotly-plot').offsetParent !== null && e.textContent.includes(t))""",
                               arg=title, timeout=timeout, polling=20)
    if text:
        page.get_by_text(text, exact=False).first.wait_for(timeout=timeout)
    page.wait_for_function("() => !(" + PENDING + ")()", timeout=timeout, polling=20)


def pick(page, label: str, option: str, prefix: bool = False) -> float:
    """Open dropdown `label`, click `option` (or the option starting with it); returns the click time."""
    page.get_by_label(label, exact=True).click()
    opt = (page.get_by_role("option", name=re.compile("^" + re.escape(option))) if prefix
           else page.get_by_role("option", name=option, exact=True))
    opt.wait_for()
    t0 = time.time()
    opt.click()
    return t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=None, help="runs dir (default: a new empty one, so demo runs are shown)")
    p.add_argument("--repeats", type=int, default=10, help="switches per kind")
    p.add_argument("--out", default="out/benchmarks/app_perf.csv")
    args = p.parse_args(argv)
    from playwright.sync_api import TimeoutError as PWTimeout
    from playwright.sync_api import sync_playwright

    from app.demo import DEMO_RUNS, demo_id
    from app.store import DEMO_DIR
    from vq4dit.trace import Trace

    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="vq4dit-perf-runs-")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".server.log")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # let the first start write bytecode caches, as a user's would
    rows = []   # (measure, seconds, load)
    runs = [demo_id(m, s) for m, s in DEMO_RUNS if (DEMO_DIR / demo_id(m, s)).is_dir()]
    steps = Trace.load(DEMO_DIR / runs[0] / "trace").snapshot_steps()
    import json

    from app.store import RUN_FILE, run_label
    labels = {r: f"{run_label(json.loads((DEMO_DIR / r / RUN_FILE).read_text()))} — demo" for r in runs}

    app = None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            # 1. cold, then warm start
            for kind in ("cold start", "warm start"):
                app = AppServer(["--runs-dir", runs_dir, "--no-umap-warmup"], log, timeout=300)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                dt = first_plot(page, app)
                rows.append((f"{kind}: app.py -> first plot with data", dt, load()))
                print(f"{kind}: {dt:.2f} s", flush=True)
                if kind == "cold start":
                    page.close()
                    app.stop()
            page.wait_for_function("() => !(" + PENDING + ")()", timeout=60_000)

            # 2. selection switches on the clusters tab
            page.get_by_role("tab", name="Codebook clusters").click()
            settled(page, title="sub-vectors and codewords")
            layers = ["q (attn1.to_q)", "fc1 (ff.net.0.proj)", "adaLN (norm1.linear)", "v (attn1.to_v)"]
            kinds = {"q (attn1.to_q)": "q", "fc1 (ff.net.0.proj)": "fc1", "adaLN (norm1.linear)": "adaLN",
                     "v (attn1.to_v)": "v"}
            block, layer = 0, "q (attn1.to_q)"
            snap = len(steps) - 1
            def measure(name, act, **until):
                """act() clicks and returns the click time; a view not updated within 60 s counts as 60 s
                (recorded as 'timeout') and the page is let settle before the next switch."""
                t0 = act()
                try:
                    settled(page, **until)
                    rows.append((name, time.time() - t0, load()))
                except PWTimeout:
                    rows.append((name + " (timeout)", 60.0, load()))
                    page.wait_for_function("() => !(" + PENDING + ")()", timeout=120_000)

            def type_snapshot(v):
                box = page.get_by_label("Snapshot", exact=False).first
                box.fill(str(v))
                t0 = time.time()
                box.press("Enter")
                return t0

            for i in range(args.repeats):
                block = (block + 1 + i % 3) % 6
                measure("switch block", lambda: pick(page, "Block", f"block {block}"),
                        title=f"block {block} · {kinds[layer]} — step {steps[snap]}")
                layer = layers[(layers.index(layer) + 1) % len(layers)]
                measure("switch layer", lambda: pick(page, "Layer", layer),
                        title=f"block {block} · {kinds[layer]} — step {steps[snap]}")
                snap = (snap + 3) % len(steps)
                measure("switch snapshot", lambda: type_snapshot(snap), title=f"— step {steps[snap]}: sub-vectors")
                run = runs[(i + 1) % len(runs)] if i % 2 == 0 else runs[0]
                measure("switch run", lambda: pick(page, "Run", labels[run]), text=f"Run {run}")
                snap = len(steps) - 1  # a run switch selects the final snapshot
                print(f"round {i + 1}/{args.repeats} done", flush=True)

            # 3. tab switches
            for i in range(args.repeats):
                for name in TABS:
                    t0 = time.time()
                    page.get_by_role("tab", name=name).click()
                    try:
                        page.wait_for_function("() => !(" + PENDING + ")()", timeout=60_000, polling=10)
                        rows.append(("switch tab", time.time() - t0, load()))
                    except PWTimeout:
                        rows.append(("switch tab (timeout)", 60.0, load()))
            browser.close()
    finally:
        if app is not None:
            app.stop()

    # table + CSVs
    machine = f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    raw_columns = ["measure", "seconds", "load_avg_1_5_15"]
    write_csv([dict(zip(raw_columns, r)) for r in rows], out.with_name(out.stem + "_raw.csv"), raw_columns)
    summary = []
    for m in dict.fromkeys(r[0] for r in rows):
        x = np.array([r[1] for r in rows if r[0] == m])
        loads = [float(r[2].split(",")[0]) for r in rows if r[0] == m]
        summary.append(dict(measure=m, n=len(x), p50_s=round(float(np.median(x)), 3),
                            p95_s=round(float(np.percentile(x, 95)), 3), max_s=round(float(x.max()), 3),
                            load_1min_mean=round(float(np.mean(loads)), 2), machine=machine,
                            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    write_csv(summary, out, list(summary[0]))
    print(f"\n{'measure':<42} {'n':>3} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'load':>5}")
    for s in summary:
        print(f"{s['measure']:<42} {s['n']:>3} {s['p50_s']:>7.3f} {s['p95_s']:>7.3f} {s['max_s']:>7.3f} "
              f"{s['load_1min_mean']:>5.2f}")
    print(f"\n{machine}; CSV: {out} (raw: {out.with_name(out.stem + '_raw.csv')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
