"""Rate-distortion chart from bench CSVs: bits/weight vs image MSE at CFG 4 and vs block MSE.

    python -m benchmarks.rate_distortion                                  # docs/rate_distortion.png
    python -m benchmarks.rate_distortion benchmarks/results/digits/main.csv benchmarks/results/digits/peers.csv --out rd.png

Every method of the main plan (one point per setting: mean over seeds, a 95% t-interval over seeds
where there are several, i.e. the calibrated methods) and every peer (vq4dit.peers: one
deterministic run each, points of one family joined). Log axes. Needs matplotlib
(benchmarks/requirements-peers.txt). Rows of the same (setting, label, seed): the first CSV wins,
as in `python -m benchmarks.bench report`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from vq4dit.config import METHODS

from .bench import T975, canonical_label
from .common import read_rows

ROOT = Path(__file__).resolve().parent.parent

# The main table's source, then the peer rows (with images first; block-only rows where images are not
# done), then the finished-budget rows: at each method's tuned learning rates where those ran (first wins).
DEFAULT_CSVS = ["benchmarks/results/digits/main.csv", "benchmarks/results/digits/peers.csv",
                "benchmarks/results/digits/peers_block.csv", "benchmarks/results/budget/tuned.csv",
                "benchmarks/results/budget/budget.csv"]
BUDGET = " (finished budget)"  # budget / tuned plan rows (every layer switched by itself): their own points
METRICS = [("img_mse_cfg4", "image MSE vs FP, CFG 4"), ("block_mse", "block MSE (held-out trajectories)")]
OURS = {"vq4dit-ste-aa": "tab:red", "vq4dit-ste": "tab:orange", "vq4dit": "tab:purple", "vq4dit-ref": "tab:pink",
        "codebook-only": "tab:blue", "codebook-only +act-aware init": "tab:cyan", "kmeans": "tab:olive",
        "rtn": "tab:gray", "rtn-tensor": "lightgray", "vq4dit" + BUDGET: "indigo",
        "codebook-only" + BUDGET: "navy", "vq4dit-ref" + BUDGET: "deeppink", "vq4dit-ste-aa" + BUDGET: "darkred",
        "codebook-only +act-aware init" + BUDGET: "darkcyan", "vq4dit-ste" + BUDGET: "chocolate"}
PEER_STYLE = {"hqq-g64": ("tab:green", "s"), "hqq-g128": ("darkgreen", "D"), "gguf": ("black", "^"),
              "torchao": ("saddlebrown", "v"), "quanto": ("goldenrod", "P")}


def family(label: str) -> str:
    lib = label.split("-")[0]
    return f"hqq-{label.rsplit('-', 1)[-1]}" if lib == "hqq" else lib


def load(paths):
    rows, seen = [], set()
    for p in paths:
        for r in read_rows(p):
            r["label"] = canonical_label(r["label"]) + (BUDGET if r.get("plan") in ("budget", "tuned") else "")
            key = (r["setting"], r["label"], r["seed"])
            if key not in seen and r["setting"] != "FP":
                seen.add(key)
                rows.append(r)
    return rows


def unranked(rs) -> bool:
    """A point not to rank (drawn hollow): `finalize` forced still-soft layers in one of its runs, or
    the run predates that record and its method forwards the soft mix (the paper's `vq4dit` and
    `vq4dit-ref`: at the 200-step recipe most of their layers are still soft at the end, issue 19)."""
    for r in rs:
        forced = r.get("forced_layers")
        if forced not in (None, ""):
            if float(forced) > 0:
                return True
            continue
        spec = METHODS.get(r.get("method") or "")
        if spec is not None and spec.trains_assignments and not spec.calib.get("hard_forward", False):
            return True
    return False


def points(rows, metric):
    """(setting, label) -> (bits/weight, mean, half-width of the 95% interval or 0, n)."""
    out = {}
    for key in dict.fromkeys((r["setting"], r["label"]) for r in rows):
        rs = [r for r in rows if (r["setting"], r["label"]) == key]
        v = [float(r[metric]) for r in rs if r.get(metric) not in (None, "")]
        v = [x for x in v if math.isfinite(x)]
        if not v:
            continue
        h = T975.get(len(v) - 1, 1.96) * float(np.std(v, ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
        out[key] = (float(np.mean([float(r["bits_per_weight"]) for r in rs])), float(np.mean(v)), h, len(v),
                    unranked(rs))
    return out


def draw(rows, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 8.5))
    for ax, (metric, title) in zip(axes, METRICS):
        pts = points(rows, metric)
        for lab, color in OURS.items():  # our methods: one point per setting, joined by bits/weight
            p = sorted((v for (s, lb), v in pts.items() if lb == lab and s != "peers"), key=lambda v: v[0])
            if not p:
                continue
            x, y, h = (np.array(c) for c in zip(*[v[:3] for v in p]))
            hollow = any(v[4] for v in p)
            lo = np.minimum(h, y * 0.999)  # a log axis cannot show an interval reaching 0
            note = " (ours, default)" if lab == "vq4dit-ste-aa" else ""
            if hollow:
                note = " (hollow: layers forced hard at the end, not ranked)"
            ax.errorbar(x, y, yerr=[lo, h], color=color, marker="o", ms=5, lw=1.2 if lab != "vq4dit-ste-aa" else 2.2,
                        capsize=3, label=lab + note, mfc="white" if hollow else color, ls=":" if hollow else "-")
        for fam, (color, marker) in PEER_STYLE.items():  # peers: one deterministic run per scheme
            p = sorted(((v, lb) for (s, lb), v in pts.items() if s == "peers" and family(lb) == fam), key=lambda t: t[0][0])
            if not p:
                continue
            ax.plot([v[0] for v, _ in p], [v[1] for v, _ in p], color=color, marker=marker, ms=7, ls="--", lw=1,
                    label=f"peer: {fam}")
            for v, lb in p:
                ax.annotate(lb.split("-", 1)[1], (v[0], v[1]), textcoords="offset points", xytext=(5, 3),
                            fontsize=7, color=color)
        n_peers = len({lb for (st, lb) in points(rows, "block_mse") if st == "peers"})
        n_here = len({lb for (st, lb) in pts if st == "peers"})
        if n_here < n_peers:  # say what is missing rather than let an absent peer read as "not run"
            ax.text(0.02, 0.02, f"peers with this metric: {n_here} of {n_peers} (the other image rows are not run yet)",
                    transform=ax.transAxes, fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [1, 1.5, 2, 3, 4, 5, 6, 8, 10]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("bits per quantized weight (codes + scales/zeros/codebooks + fp32 bias)")
        ax.set_ylabel(title)
        ax.set_title(f"{title}: lower left is better")
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # both panels' entries (a peer without image rows is only in the block panel)
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    order = [lab for lab in legend if not lab.startswith("peer:")] + [lab for lab in legend if lab.startswith("peer:")]
    fig.legend([legend[lab] for lab in order], order, loc="lower center", ncol=4, fontsize=8, frameon=False)
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    fig.suptitle("Embedded digits DiT: rate-distortion of vq4dit methods and peer libraries "
                 "(error bars: 95% t-interval over seeds)", fontsize=11)
    fig.text(0.01, 0.005, "machines: " + "; ".join(machines), fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.17, 1, 0.96))  # the legend's rows below the panels
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out_path)  # never a half-written image
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", default=None, help="bench CSVs (default: the main table's and the peers')")
    p.add_argument("--out", default="docs/rate_distortion.png")
    a = p.parse_args(argv)
    paths = a.csv or [str(ROOT / c) for c in DEFAULT_CSVS]
    missing = [c for c in paths if not Path(c).is_file()]
    if missing:
        print(f"error: CSV not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = load(paths)
    print(f"{len(rows)} rows from {len(paths)} CSVs -> {draw(rows, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
