"""Benchmark on the embedded digits DiT: every method at every setting, several seeds, paired
comparisons with confidence intervals. Writes one CSV row per run (resumable) and a report.

    python -m vq4dit.bench --quick                       # CI smoke: W2 + XL-sharing, tiny budgets
    python -m vq4dit.bench --plan main --seeds 3 4 5      # the reported table (seeds 3-5)
    python -m vq4dit.bench --plan ablations --seeds 0 1 2 # tuning / ablations (seeds 0-2)
    python -m vq4dit.bench --plan main --shard 0/4        # one of 4 processes (e.g. on one GPU)
    python -m vq4dit.bench report results/bench_main.csv  # paired intervals vs codebook-only

Every row of a plan is `python -m vq4dit quantize --recipe small --method M --seed S ...` with the
same settings (the CLI and the bench share `run_method`). The seed sets both k-means and the
calibration data, so methods compared at one seed share both. Rows already in the CSV are skipped.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import METHODS, SETTINGS, build_config, method_config
from .experiment import EvalSpec, generate, run_method

# Settings (W2, W3, W4, W2-budget, XL-sharing) live in vq4dit.config.SETTINGS, shared with the app.
CALIBRATED = ["codebook-only", "vq4dit", "vq4dit-ref", "vq4dit-ste", "vq4dit-ste-aa"]
BASELINES = ["rtn-tensor", "rtn", "kmeans"]   # deterministic given the seed: one run each

# Ablations of the soft-to-hard gap (block MSE only): (label, method, calib overrides, vq overrides).
ABLATIONS = [
    ("codebook-only", "codebook-only", {}, {}),
    ("vq4dit", "vq4dit", {}, {}),
    ("vq4dit-ste", "vq4dit-ste", {}, {}),
    # learning rates: the small recipe was tuned for vq4dit-ste; give the others their own try
    ("vq4dit lr_logits 5e-2", "vq4dit", dict(lr_logits=5e-2), {}),
    ("codebook-only lr_codebook 1e-3", "codebook-only", dict(lr_codebook=1e-3), {}),
    # closing the soft-to-hard gap of the paper's soft forward
    ("vq4dit lambda_r 0.1", "vq4dit", dict(lambda_r=0.1), {}),
    ("vq4dit +anneal T->0.05", "vq4dit", dict(temperature_end=0.05), {}),
    ("vq4dit +commit by 80%", "vq4dit", dict(commit_until=0.8), {}),
    ("vq4dit +repick", "vq4dit", dict(finish_repick=True), {}),
    ("vq4dit-ste +repick", "vq4dit-ste", dict(finish_repick=True), {}),
    ("vq4dit-ste +anneal T->0.05", "vq4dit-ste", dict(temperature_end=0.05), {}),
    # init and candidates
    ("vq4dit-ste +act-aware init", "vq4dit-ste", {}, dict(activation_aware=True)),
    ("codebook-only +act-aware init", "codebook-only", {}, dict(activation_aware=True)),
    ("vq4dit-ste n=1", "vq4dit-ste", {}, dict(n_candidates=1)),
    ("vq4dit-ste n=3", "vq4dit-ste", {}, dict(n_candidates=3)),
]

COLUMNS = ["plan", "setting", "label", "method", "seed", "k", "d", "bits_per_weight", "block_mse",
           "img_mse_cfg4", "psnr_cfg4", "acc_cfg4", "img_mse_cfg1", "psnr_cfg1", "acc_cfg1",
           "fd_cfg4", "fd_cfg1", "n_fd_images", "conflict_share", "coherence", "changed_frac",
           "calib_seconds", "stopped", "machine"]


@dataclass
class Job:
    plan: str
    setting: str
    label: str
    method: str
    seed: int
    calib: dict = field(default_factory=dict)
    vq: dict = field(default_factory=dict)
    images: bool = True      # image MSE/PSNR/accuracy vs FP on `n_images` at CFG 4 (and CFG 1)
    fd: bool = False         # FD-digits on `n_fd` images at CFG 4 and 1

    @property
    def key(self) -> tuple:
        return (self.plan, self.setting, self.label, str(self.seed))


# Main-plan init variants: every k-means-based method gets the same init, so pairs stay fair.
INITS = {"kmeans": ("", {}), "act-aware": (" +act-aware init", dict(activation_aware=True))}
_AA = INITS["act-aware"][0]


def canonical_label(label: str) -> str:
    """'<method> +act-aware init' is shown under the registry name of that algorithm where there is
    one (vq4dit-ste +act-aware init = vq4dit-ste-aa); other labels are kept."""
    m = label[:-len(_AA)] if label.endswith(_AA) else None
    if m in METHODS and METHODS[m].kind == "vq":
        name = method_config(m, activation_aware=True).method
        if name in METHODS:
            return name
    return label


def baseline_label(label: str) -> str:
    """The codebook-only row a label is paired with: the one with the same init."""
    if label.endswith(_AA) or (label in METHODS and METHODS[label].vq.get("activation_aware")):
        return "codebook-only" + _AA
    return "codebook-only"


def plan_jobs(plan: str, settings, methods, seeds, with_fd: bool = True, labels=None,
              init: str = "kmeans") -> list[Job]:
    jobs = []
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose from {list(INITS)}")
    suffix, init_vq = INITS[init]
    if init != "kmeans" and plan == "ablations":
        raise ValueError("--init applies to the main plan; ablations name their init in the label")
    if plan in ("main", "quick"):
        # Seed-major: every method of one seed before the next seed, so a run stopped part-way
        # leaves complete pairs for the paired comparison (baselines run once, at the first seed).
        for s in settings:
            for seed in seeds:
                for m in methods or (BASELINES + CALIBRATED):
                    if METHODS[m].kind == "rtn" and "k" in SETTINGS[s]:
                        continue  # RTN has no k/d: its rows live under the preset settings
                    if m in BASELINES and seed != seeds[0]:
                        continue
                    if init_vq and METHODS[m].kind == "rtn":
                        continue  # RTN has no codebook to initialise
                    fd = plan == "main" and with_fd and s in ("W2", "XL-sharing") and m in CALIBRATED
                    label = canonical_label(m + suffix)
                    need = [(label, m, dict(init_vq))]
                    if m in CALIBRATED and baseline_label(label) != "codebook-only":
                        # a method with its own init is paired with codebook-only under that init
                        need.insert(0, (baseline_label(label), "codebook-only", dict(init_vq or METHODS[m].vq)))
                    for lab, meth, vq in need:
                        if not any((j.setting, j.label, j.seed) == (s, lab, seed) for j in jobs):
                            jobs.append(Job(plan, s, lab, meth, seed, vq=vq, fd=fd))
    elif plan == "ablations":
        for s in settings:
            for seed in seeds:
                for label, m, calib, vq in ABLATIONS:
                    if (methods and m not in methods) or (labels and label not in labels):
                        continue
                    jobs.append(Job(plan, s, label, m, seed, dict(calib), dict(vq), images=False))
    else:
        raise ValueError(f"unknown plan {plan!r}")
    return jobs


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

def machine_name(device=None) -> str:
    """What ran the rows: the GPU for CUDA runs, else the CPU (also on a host that has a GPU)."""
    if torch.cuda.is_available() and str(device or "cuda").startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}"


class Evaluator:
    """FP references computed once: images from the same noise for every model."""

    def __init__(self, teacher, n_images: int, n_fd: int, steps: int):
        from .testbed.classifier import DigitsEvaluator
        self.digits = DigitsEvaluator()  # loads the classifier and the real digits' features
        self.specs = {c: EvalSpec(n_per_class=n_images // 10, guidance_scale=float(c), num_steps=steps, seed=0)
                      for c in (4, 1)}
        self.fd_specs = {c: EvalSpec(n_per_class=n_fd // 10, guidance_scale=float(c), num_steps=steps, seed=10_000)
                         for c in (4, 1)}
        self._fp: dict = {}
        self.teacher = teacher

    @property
    def fp(self) -> dict:
        """FP images per CFG, generated on first use (ablation plans never need them)."""
        if not self._fp:
            self._fp = {c: generate(self.teacher, spec) for c, spec in self.specs.items()}
        return self._fp

    def images(self, model) -> dict:
        row = {}
        for c, spec in self.specs.items():
            m = self.digits.evaluate(generate(model, spec), spec.labels(), reference=self.fp[c])
            row.update({f"img_mse_cfg{c}": m["image_mse"], f"psnr_cfg{c}": m["psnr"], f"acc_cfg{c}": m["accuracy"]})
        return row

    def fd(self, model) -> dict:
        row = {}
        for c, spec in self.fd_specs.items():
            row[f"fd_cfg{c}"] = self.digits.evaluate(generate(model, spec), spec.labels(), min_fd_images=0)["fd_digits"]
        row["n_fd_images"] = len(self.fd_specs[4].labels())
        return row

    def fp_row(self, plan, with_fd: bool) -> dict:
        row = dict(plan=plan, setting="FP", label="fp32", method="fp32", seed=0, bits_per_weight=32.0, block_mse=0.0)
        for c, spec in self.specs.items():
            m = self.digits.evaluate(self.fp[c], spec.labels())
            row[f"acc_cfg{c}"] = m["accuracy"]
        if with_fd:
            row.update(self.fd(self.teacher))
        return row


def job_config(job: Job, recipe: str, calib_extra: dict, device, vq_extra: dict | None = None):
    """A job's config through the library's one adapter (`build_config`, as the CLI and the app):
    the setting's bits / k / d, the seed for k-means and calibration, the job's overrides."""
    vq = dict(SETTINGS[job.setting])
    bits = vq.pop("bits")
    vq.update(vq_extra or {}, **job.vq, seed=job.seed)
    calib = dict(calib_extra, **job.calib, seed=job.seed, device=str(device))
    return build_config(job.method, bits=bits, recipe=recipe, calib=calib, **vq)


def run_job(job: Job, teacher, evaluator: Evaluator, recipe: str, calib_extra: dict, device,
            vq_extra: dict | None = None) -> dict:
    t0 = time.time()
    res = run_method(teacher, config=job_config(job, recipe, calib_extra, device, vq_extra), progress=False)
    s = res.summary()
    row = dict(plan=job.plan, setting=job.setting, label=job.label, method=res.method, seed=job.seed,
               k=s["k"], d=s["d"], bits_per_weight=s["bits_per_weight"], block_mse=s["block_mse"],
               calib_seconds=s["seconds"], stopped=s["stopped"])
    if res.trace is not None:
        cs = res.trace.conflict_summary()
        row.update(conflict_share=float(cs["conflict_share"].mean()) if len(cs) else None,
                   coherence=float(cs["coherence_mean"].mean()) if len(cs) else None)
        last = res.trace.layer_stats()
        if len(last):
            last = last[last["step"] == last["step"].max()]
            row["changed_frac"] = float(last["changed_frac"].mean())
    if job.images:
        row.update(evaluator.images(res.model))
    if job.fd:
        row.update(evaluator.fd(res.model))
    row["_conflicts"] = res.trace.conflict_summary() if res.trace is not None else None
    row["_wall"] = time.time() - t0
    return row


def read_rows(path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_csv(rows, path, columns=COLUMNS):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run(plan: str = "main", out_csv="bench.csv", settings=None, methods=None, seeds=(0,), shard=(0, 1), quick=False,
        n_images=200, n_fd=1000, steps=25, device=None, log=print, labels=None, init="kmeans") -> list[dict]:
    from .io import load_dit
    from .sampling import pick_device
    from .testbed import DIGITS_DIT_DIR

    settings = settings or (["W2", "XL-sharing"] if quick else list(SETTINGS))
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown settings {bad}: choose from {list(SETTINGS)}")
    device = pick_device(device)
    teacher = load_dit(DIGITS_DIT_DIR, device=device).transformer
    jobs = plan_jobs("quick" if quick else plan, settings, methods, list(seeds), with_fd=n_fd > 0, labels=labels,
                     init=init)
    i, n = shard
    jobs = jobs[i::n]
    rows = read_rows(out_csv)
    done = {(r["plan"], r["setting"], canonical_label(r["label"]), r["seed"]) for r in rows}
    todo = [j for j in jobs if j.key not in done]
    log(f"{len(jobs)} jobs in shard {i}/{n}, {len(jobs) - len(todo)} already in {out_csv}; machine: {machine_name(device)}")
    # Layer statistics (incl. gradient conflicts) every 10 steps: 20 records over the small recipe.
    calib_extra = dict(iterations=1, num_sampling_steps=5) if quick else dict(trace_every=10)
    if quick:
        n_images, n_fd, steps = 20, 0, 10
    evaluator = Evaluator(teacher, n_images, max(n_fd, 20), steps)
    conflicts_csv = Path(out_csv).with_name(Path(out_csv).stem + "_conflicts.csv")
    conflict_rows = read_rows(conflicts_csv)
    machine = machine_name(device)
    if ("quick" if quick else plan, "FP", "fp32", "0") not in done and i == 0 and plan != "ablations":
        rows.append(dict(evaluator.fp_row("quick" if quick else plan, with_fd=plan == "main" and not quick and n_fd > 0),
                         machine=machine))
        write_csv(rows, out_csv)
    for j, job in enumerate(todo):
        row = run_job(job, teacher, evaluator, "small", calib_extra, device,
                      dict(kmeans_iters=5) if quick else None)
        cs = row.pop("_conflicts")
        wall = row.pop("_wall")
        row["machine"] = machine
        rows.append(row)
        write_csv(rows, out_csv)  # after every row: an interrupted run keeps what it measured
        if cs is not None and len(cs):
            for r in cs.to_dict("records"):
                conflict_rows.append(dict(plan=job.plan, setting=job.setting, label=job.label, seed=job.seed, **r))
            write_csv(conflict_rows, conflicts_csv, ["plan", "setting", "label", "seed", "layer", "block", "kind",
                                                    "conflict_share", "coherence_mean", "n_steps"])
        log(f"[{j + 1}/{len(todo)}] {job.setting:10s} {job.label:28s} seed {job.seed} "
            f"mse {row['block_mse']:.4g} img4 {row.get('img_mse_cfg4', float('nan')):.4g} "
            f"calib {row['calib_seconds']:.1f}s (row {wall:.0f}s)")
    return rows


# ----------------------------------------------------------------------------------------
# Report: paired per-seed differences vs codebook-only with 95% t-intervals
# ----------------------------------------------------------------------------------------

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def paired(rows, metric, label, base=None):
    """Relative paired difference (label - base) / base per seed: (mean, lo, hi, n) in %.
    The base defaults to the codebook-only row with the same init."""
    base = base or baseline_label(label)
    by = {(r["label"], r["seed"]): _num(r.get(metric)) for r in rows}
    diffs = [100 * (by[(label, s)] - by[(base, s)]) / by[(base, s)]
             for (lab, s) in by if lab == label and by.get((base, s)) and by[(label, s)] is not None]
    if len(diffs) < 2:
        return None
    m, sd, n = float(np.mean(diffs)), float(np.std(diffs, ddof=1)), len(diffs)
    h = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m, m - h, m + h, n


def mean_sd(rows, metric, label):
    v = [_num(r.get(metric)) for r in rows if r["label"] == label]
    v = [x for x in v if x is not None]
    if not v:
        return None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


def _row_order(label: str):
    """Baselines, then each codebook-only baseline followed by the methods paired with it."""
    fixed = BASELINES + [m for m in CALIBRATED if baseline_label(m) == "codebook-only"] + \
        [b + _AA for b in BASELINES if METHODS[b].kind == "vq"] + \
        ["codebook-only" + _AA] + [m for m in CALIBRATED if baseline_label(m) != "codebook-only"]
    return (fixed.index(label), "") if label in fixed else (len(fixed), label)


def report(*csv_paths) -> str:
    """Markdown tables from one or more bench CSVs (rows of the same setting/label/seed: first wins)."""
    rows, seen = [], set()
    for path in csv_paths:
        for r in read_rows(path):
            r["label"] = canonical_label(r["label"])
            key = (r["setting"], r["label"], r["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    out = [f"Sources: {', '.join(f'`{p}`' for p in csv_paths)} ({len(rows)} rows; machines: {'; '.join(machines)})", ""]
    metrics = [("block_mse", "block MSE"), ("img_mse_cfg4", "image MSE CFG4"), ("img_mse_cfg1", "image MSE CFG1")]
    for setting in [s for s in SETTINGS if any(r["setting"] == s for r in rows)]:
        rs = [r for r in rows if r["setting"] == setting]
        labels = sorted(dict.fromkeys(r["label"] for r in rs), key=_row_order)
        out.append(f"### {setting} ({rs[0]['k']} codewords, d={rs[0]['d']})" if rs[0].get("k") else f"### {setting}")
        out.append("")
        head = "| method | seeds | bits/w | " + " | ".join(
            f"{name} mean ± sd | vs codebook-only (95% CI)" for _, name in metrics) + \
            " | conflict share | vs codebook-only (95% CI) | calib s |"
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for lab in labels:
            cells = [lab]
            ms = mean_sd(rs, "block_mse", lab)
            cells.append(str(ms[2]) if ms else "-")
            b = mean_sd(rs, "bits_per_weight", lab)
            cells.append(f"{b[0]:.3f}" if b else "-")
            for key, _ in metrics:
                v = mean_sd(rs, key, lab)
                cells.append(f"{v[0]:.4g} ± {v[1]:.2g}" if v else "-")
                if lab == baseline_label(lab):
                    cells.append("(baseline)")
                    continue
                p = paired(rs, key, lab)
                if p is None:
                    cells.append("-")
                else:
                    verdict = " **beats**" if p[2] < 0 else (" loses" if p[1] > 0 else "")
                    cells.append(f"{p[0]:+.1f}% [{p[1]:+.1f}, {p[2]:+.1f}]{verdict}")
            c = mean_sd(rs, "conflict_share", lab)
            cells.append(f"{c[0]:.3f} ± {c[1]:.3f}" if c else "-")
            pc = paired(rs, "conflict_share", lab) if lab != baseline_label(lab) else None
            cells.append(f"{pc[0]:+.1f}% [{pc[1]:+.1f}, {pc[2]:+.1f}]" if pc else "-")
            t = mean_sd(rs, "calib_seconds", lab)
            cells.append(f"{t[0]:.0f}" if t else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    fd = [r for r in rows if _num(r.get("fd_cfg4")) is not None]
    if fd:
        out += ["### FD-digits (classifier features)", "",
                "| setting | method | seeds | images | FD CFG4 mean ± sd | FD CFG1 mean ± sd |", "|---|---|---|---|---|---|"]
        for setting in dict.fromkeys(r["setting"] for r in fd):
            rs = [r for r in fd if r["setting"] == setting]
            for lab in sorted(dict.fromkeys(r["label"] for r in rs), key=_row_order):
                a, b = mean_sd(rs, "fd_cfg4", lab), mean_sd(rs, "fd_cfg1", lab)
                out.append(f"| {setting} | {lab} | {a[2]} | {rs[0]['n_fd_images']} | {a[0]:.1f} ± {a[1]:.1f} | "
                           f"{b[0]:.1f} ± {b[1]:.1f} |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="python -m vq4dit.bench report")
        p.add_argument("csv", nargs="+")
        p.add_argument("--out", help="markdown file (default: print)")
        a = p.parse_args(argv[1:])
        text = report(*a.csv)
        if a.out:
            Path(a.out).write_text(text + "\n")
        print(text)
        return 0
    p = argparse.ArgumentParser(prog="python -m vq4dit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny budgets, W2 + XL-sharing, 1 seed")
    p.add_argument("--plan", default="main", choices=["main", "ablations"])
    p.add_argument("--out", default="bench.csv", help="CSV path; existing rows are kept and skipped")
    p.add_argument("--settings", nargs="*", help=f"subset of {list(SETTINGS)}")
    p.add_argument("--methods", nargs="*", help=f"subset of {list(METHODS)}")
    p.add_argument("--seeds", nargs="*", type=int, default=[3, 4, 5], help="seeds (k-means + calibration data)")
    p.add_argument("--labels", nargs="*", help="ablations: only these row labels (see ABLATIONS)")
    p.add_argument("--init", default="kmeans", choices=list(INITS),
                   help="main plan: codebook init for every k-means-based method (act-aware: weight k-means by "
                        "the layer input's E[x^2]; rows are labelled '<method> +act-aware init')")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    p.add_argument("--images", type=int, default=200, help="images for image MSE / PSNR vs FP per CFG")
    p.add_argument("--fd-images", type=int, default=1000, help="images for FD-digits (main plan, W2 + XL-sharing)")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for generated images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    bad = set(a.methods or []) - set(METHODS)
    if bad:
        print(f"error: unknown methods {sorted(bad)}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    try:
        i, n = (int(x) for x in a.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        print(f"error: --shard must be i/n with 0 <= i < n, got {a.shard!r}", file=sys.stderr)
        return 2
    seeds = a.seeds[:1] if a.quick else a.seeds
    run(a.plan, a.out, a.settings, a.methods, seeds, (i, n), a.quick, a.images, a.fd_images, a.eval_steps,
        a.device, log=lambda s: print(s, file=sys.stderr, flush=True), labels=a.labels, init=a.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
