"""Benchmark on the embedded digits DiT: every method at every setting, several seeds, paired
comparisons with confidence intervals. Writes one CSV row per run (resumable) and a report.

    python -m benchmarks.bench --quick                       # CI smoke: W2 + XL-sharing, tiny budgets
    python -m benchmarks.bench --plan main --seeds 3 4 5      # the reported table (seeds 3-5)
    python -m benchmarks.bench --plan ablations --seeds 0 1 2 # tuning / ablations (seeds 0-2)
    python -m benchmarks.bench --plan main --shard 0/4        # one of 4 processes (e.g. on one GPU)
    python -m benchmarks.bench --plan peers --out benchmarks/results/digits/peers.csv   # HQQ, GGUF, torchao, quanto
    python -m benchmarks.bench --plan budget --settings XL-sharing  # a budget where every layer finishes
    python -m benchmarks.bench --plan sweep --seeds 0 --settings XL-sharing  # lr grid, block MSE only
    python -m benchmarks.bench report benchmarks/results/digits/main.csv  # paired intervals vs codebook-only
    python -m benchmarks.bench merge --out all.csv a.csv b.csv   # several CSVs in one (first row wins)

Every row of a plan is `python -m vq4dit quantize --recipe small --method M --seed S ...` with the
same settings (both build the config with `vq4dit.config.build_config`). The seed sets both k-means and the
calibration data, so methods compared at one seed share both. Rows already in the CSV are skipped.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vq4dit.config import DEFAULT_METHOD, METHODS, RECIPES, SETTINGS, build_config, method_config, method_names
from vq4dit.runner import EvalSpec, generate, run_method
from vq4dit.peers import PEERS

from .common import machine_name, read_rows, write_csv

# Settings (W2, W3, W4, W2-budget, XL-sharing) live in vq4dit.config.SETTINGS, shared with the app.
# From the registry, in row order: the uncalibrated baselines weakest first (deterministic given
# the seed: one run each), then the calibrated methods, the one that keeps its k-means assignments
# (codebook-only: every other method is paired with it) first.
BASELINES = method_names(calibrated=False)[::-1]
CALIBRATED = sorted(method_names(calibrated=True), key=lambda m: METHODS[m].trains_assignments)
PAIRED_BASELINE = CALIBRATED[0]

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

# Finished-budget plan (issue 19): one fixed step budget per setting, the same for every method, chosen
# so every layer of the soft methods switches to hard by itself with a margin (at 200 steps, most W2 /
# XL-sharing layers are still soft and `finalize` forces them). `until_hard` is on as a safety net: a row
# that needs more steps runs on (up to BUDGET_MAX_STEPS) and its `steps` then differ from its pair's,
# which the report flags. Trajectories of the small recipe (25 steps each).
BUDGET_ITERATIONS = {"W2": 18, "XL-sharing": 24, "W2-budget": 18, "W3": 18, "W4": 18}
BUDGET_MAX_STEPS = 1000
BUDGET_METHODS = ["codebook-only", "vq4dit", "vq4dit-ref", "vq4dit-ste-aa"]
# Learning-rate grid of the sweep plan (block MSE only, tuning seeds): logits x codebook lr. The small
# recipe's 2e-2 / 3e-4 and the reference code's 5e-2 / 1e-4 are both in it.
SWEEP_LR_LOGITS = (2e-2, 5e-2)
SWEEP_LR_CODEBOOK = (1e-4, 3e-4, 1e-3)
# Each method's learning rates at the finished budget, picked by `best_lr` (lowest block MSE on the
# tuning seeds) from benchmarks/results/budget/sweep.csv; the `tuned` plan runs the budget plan's rows
# with them. A (setting, method) not listed keeps the small recipe's. Seed 0, 2026-12-01.
TUNED_LR: dict[tuple[str, str], dict] = {
    ("W2", "codebook-only"): dict(lr_codebook=3e-4),
    ("W2", "vq4dit"): dict(lr_logits=2e-2, lr_codebook=3e-4),
    ("W2", "vq4dit-ref"): dict(lr_logits=5e-2, lr_codebook=3e-4),
    ("W2", "vq4dit-ste-aa"): dict(lr_logits=2e-2, lr_codebook=1e-4),
    ("XL-sharing", "codebook-only"): dict(lr_codebook=3e-4),
    ("XL-sharing", "vq4dit"): dict(lr_logits=2e-2, lr_codebook=1e-3),
    ("XL-sharing", "vq4dit-ref"): dict(lr_logits=2e-2, lr_codebook=3e-4),
    ("XL-sharing", "vq4dit-ste-aa"): dict(lr_logits=2e-2, lr_codebook=1e-3),
}

COLUMNS = ["plan", "setting", "label", "method", "seed", "k", "d", "bits_per_weight", "block_mse",
           "img_mse_cfg4", "psnr_cfg4", "acc_cfg4", "img_mse_cfg1", "psnr_cfg1", "acc_cfg1",
           "fd_cfg4", "fd_cfg1", "n_fd_images", "conflict_share", "coherence", "changed_frac",
           "calib_seconds", "stopped", "steps", "soft_steps", "last_switch_step", "forced_layers", "lr_logits",
           "lr_codebook", "machine"]
CONFLICT_COLUMNS = ["plan", "setting", "label", "seed", "layer", "block", "kind", "conflict_share", "coherence_mean",
                    "n_steps"]


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
        return PAIRED_BASELINE + _AA
    return PAIRED_BASELINE


def plan_jobs(plan: str, settings, methods, seeds, with_fd: bool = True, labels=None,
              init: str = "kmeans") -> list[Job]:
    jobs = []
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose from {list(INITS)}")
    suffix, init_vq = INITS[init]
    if init != "kmeans" and plan == "ablations":
        raise ValueError("--init applies to the main plan; ablations name their init in the label")
    if plan in ("budget", "tuned"):  # the main plan's rows and pairs, at a budget where every layer finishes
        methods = list(dict.fromkeys(["codebook-only"] + list(methods or BUDGET_METHODS)))  # always the pair
        jobs = plan_jobs("main", settings, methods, seeds, with_fd=False, init=init)
        for j in jobs:
            j.plan, j.fd = plan, False
            lr = TUNED_LR.get((j.setting, j.method), {}) if plan == "tuned" else {}
            j.calib = dict(j.calib, **lr, iterations=BUDGET_ITERATIONS[j.setting], until_hard=True,
                           max_steps=BUDGET_MAX_STEPS)
        return [j for j in jobs if METHODS[j.method].calibrated]
    if plan == "sweep":  # lr grid at the finished budget, block MSE only (pick on tuning seeds)
        jobs = []
        for s in settings:
            for seed in seeds:
                for m in methods or BUDGET_METHODS:
                    vq = dict(METHODS[m].vq)
                    for lrl in (SWEEP_LR_LOGITS if METHODS[m].trains_assignments else (None,)):
                        for lrc in SWEEP_LR_CODEBOOK:
                            lr = dict(lr_codebook=lrc, **({} if lrl is None else dict(lr_logits=lrl)))
                            label = f"{m} lr " + (f"{lrl:g}/" if lrl is not None else "") + f"{lrc:g}"
                            if labels and label not in labels:
                                continue
                            jobs.append(Job("sweep", s, label, m, seed, dict(
                                lr, iterations=BUDGET_ITERATIONS[s], until_hard=True, max_steps=BUDGET_MAX_STEPS),
                                vq, images=False))
        return jobs
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
                    if m in CALIBRATED and baseline_label(label) != PAIRED_BASELINE:
                        # a method with its own init is paired with codebook-only under that init
                        need.insert(0, (baseline_label(label), PAIRED_BASELINE, dict(init_vq or METHODS[m].vq)))
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
    elif plan == "peers":
        # Peer libraries (vq4dit.peers) are calibration-free and deterministic: one row each, at the
        # first seed, under the setting "peers" (the report places them by their bits/weight).
        for name in methods or PEERS:
            jobs.append(Job(plan, "peers", name, name, seeds[0]))
    else:
        raise ValueError(f"unknown plan {plan!r}")
    return jobs


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

class Evaluator:
    """FP references computed once: images from the same noise for every model."""

    def __init__(self, teacher, n_images: int, n_fd: int, steps: int):
        from vq4dit.testbed.classifier import DigitsEvaluator
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


def job_config(job: Job, recipe: str = "small", calib_extra: dict | None = None, device="cpu",
               vq_extra: dict | None = None):
    """The method config of one row, built by the library's one adapter (`build_config`, as the CLI
    builds it from its flags): the setting's bits / k / d, the row's seed, init and overrides."""
    if job.method in PEERS:  # a peer library's fixed scheme: nothing to set
        return build_config(job.method)
    vq = dict(SETTINGS[job.setting])
    bits = vq.pop("bits")
    vq.update(vq_extra or {}, **job.vq)
    calib = dict(calib_extra or {}, **job.calib, seed=job.seed, device=str(device))
    return build_config(job.method, bits=bits, recipe=recipe, calib=calib, seed=job.seed, **vq)


def learning_rates(config) -> dict:
    """The codebook (and, where assignments train, logits) learning rate a row calibrated with."""
    calib = getattr(config, "calib", None)
    if calib is None:
        return {}
    return dict(lr_codebook=calib.lr_codebook, **(dict(lr_logits=calib.lr_logits) if calib.train_assignments else {}))


def run_job(job: Job, teacher, evaluator: Evaluator, recipe: str, calib_extra: dict, device,
            vq_extra: dict | None = None) -> dict:
    t0 = time.time()
    config = job_config(job, recipe, calib_extra, device, vq_extra)
    res = run_method(teacher, config=config, progress=False)
    s = res.summary()
    row = dict(plan=job.plan, setting=job.setting, label=job.label, method=res.method, seed=job.seed,
               k=s["k"], d=s["d"], bits_per_weight=s["bits_per_weight"], block_mse=s["block_mse"],
               calib_seconds=s["seconds"], stopped=s["stopped"],
               **{k: s[k] for k in ("steps", "soft_steps", "last_switch_step", "forced_layers")},
               **learning_rates(config))
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


def run(plan: str = "main", out_csv="out/benchmarks/bench.csv", settings=None, methods=None, seeds=(0,), shard=(0, 1), quick=False,
        n_images=200, n_fd=1000, steps=25, device=None, log=print, labels=None, init="kmeans",
        reuse=None) -> list[dict]:
    from vq4dit.io import load_dit
    from vq4dit.checks import resolve_device
    from vq4dit.testbed import DIGITS_DIT_DIR

    settings = [] if plan == "peers" else settings or (["W2", "XL-sharing"] if quick else list(SETTINGS))
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown settings {bad}: choose from {list(SETTINGS)}")
    device = resolve_device(device)
    teacher = load_dit(DIGITS_DIT_DIR, device=device).transformer
    jobs = plan_jobs("quick" if quick else plan, settings, methods, list(seeds), with_fd=n_fd > 0, labels=labels,
                     init=init)
    i, n = shard
    jobs = jobs[i::n]
    if n_images == 0:  # block MSE and bits only (no FP images needed)
        for job in jobs:
            job.images = False
    rows = read_rows(out_csv)
    done = {(r["plan"], r["setting"], canonical_label(r["label"]), r["seed"]) for r in rows}
    todo = [j for j in jobs if j.key not in done]
    log(f"{len(jobs)} jobs in shard {i}/{n}, {len(jobs) - len(todo)} already in {out_csv}; machine: {machine_name(device)}")
    # Layer statistics (incl. gradient conflicts) every 10 steps: 20 records over the small recipe.
    # The budget plans run 2-4x the steps: every 25 steps there (one record per trajectory) to save compute.
    calib_extra = (dict(iterations=1, num_sampling_steps=5) if quick else
                   dict(trace_every=25) if plan in ("budget", "tuned", "sweep") else dict(trace_every=10))
    if quick:
        n_images, n_fd, steps = 20, 0, 10
    evaluator = Evaluator(teacher, n_images, max(n_fd, 20), steps)
    conflicts_csv = conflicts_path(out_csv)
    conflict_rows = read_rows(conflicts_csv)
    machine = machine_name(device)
    if reuse:  # rows measured with exactly this config in another plan's CSV (seeded: the same run)
        todo = _reuse_rows(todo, reuse, rows, conflict_rows, calib_extra, device, log)
        write_csv(rows, out_csv, COLUMNS)
        write_csv(conflict_rows, conflicts_csv, CONFLICT_COLUMNS)
    if ("quick" if quick else plan, "FP", "fp32", "0") not in done and i == 0 and plan not in ("ablations", "sweep") \
            and n_images:
        rows.append(dict(evaluator.fp_row("quick" if quick else plan, with_fd=plan == "main" and not quick and n_fd > 0),
                         machine=machine))
        write_csv(rows, out_csv, COLUMNS)
    for j, job in enumerate(todo):
        row = run_job(job, teacher, evaluator, "small", calib_extra, device,
                      dict(kmeans_iters=5) if quick else None)
        cs = row.pop("_conflicts")
        wall = row.pop("_wall")
        row["machine"] = machine
        rows.append(row)
        write_csv(rows, out_csv, COLUMNS)  # after every row: an interrupted run keeps what it measured
        if cs is not None and len(cs):
            for r in cs.to_dict("records"):
                conflict_rows.append(dict(plan=job.plan, setting=job.setting, label=job.label, seed=job.seed, **r))
            write_csv(conflict_rows, conflicts_csv, CONFLICT_COLUMNS)
        log(f"[{j + 1}/{len(todo)}] {job.setting:10s} {job.label:28s} seed {job.seed} "
            f"mse {row['block_mse']:.4g} img4 {row.get('img_mse_cfg4', float('nan')):.4g} "
            f"calib {row['calib_seconds']:.1f}s, {row['steps']} steps ({row['soft_steps']} soft), "
            f"last switch {row['last_switch_step']}, forced {row['forced_layers']} (row {wall:.0f}s)"
            + ("  ** FORCED LAYERS: not a finished run **" if row["forced_layers"] else ""))
    return rows


def _reuse_rows(todo, reuse_csv, rows, conflict_rows, calib_extra, device, log) -> list:
    """Copy into `rows` the rows of `reuse_csv` (same setting, label, seed, budget and learning rates as
    a job: with seeded data that is the same run) under the job's plan; returns the jobs left to run."""
    have = {(r["setting"], canonical_label(r["label"]), r["seed"]): r for r in read_rows(reuse_csv)}
    conflicts = read_rows(conflicts_path(reuse_csv))
    left = []
    for job in todo:
        r = have.get((job.setting, job.label, str(job.seed)))
        lr = learning_rates(job_config(job, "small", calib_extra, device))
        same = r is not None and r["plan"] == "budget" and all(_num(r.get(k)) == v for k, v in lr.items())
        if not same:
            left.append(job)
            continue
        rows.append(dict(r, plan=job.plan))
        conflict_rows += [dict(c, plan=job.plan) for c in conflicts
                          if (c["setting"], canonical_label(c["label"]), c["seed"]) == job.key[1:]]
        log(f"reused {job.setting} {job.label} seed {job.seed} from {reuse_csv} (same config)")
    return left


def conflicts_path(path) -> Path:
    """The per-layer gradient-conflict CSV written beside a bench CSV."""
    return Path(path).with_name(Path(path).stem + "_conflicts.csv")


def merge(csv_paths, out=None, by_plan=None) -> dict:
    """Rows of several bench CSVs in one CSV (`out`) or one `bench_<plan>.csv` per plan (folder
    `by_plan`), each with its `_conflicts.csv`. The first row of a (setting, label, seed) wins, as
    in `report`; labels are canonical. Returns {written CSV: rows}."""
    groups: dict = {}  # destination -> (rows, conflict rows, keys taken)
    for path in csv_paths:
        if str(path).endswith("_conflicts.csv"):
            continue  # read with its bench CSV
        taken = set()  # (destination, key) of the rows this file contributed
        for r in read_rows(path):
            r["label"] = canonical_label(r["label"])
            dest = Path(by_plan) / f"bench_{r['plan']}.csv" if by_plan else Path(out)
            rows, _, seen = groups.setdefault(dest, ([], [], set()))
            key = (r["setting"], r["label"], r["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
                taken.add((dest, key))
        for r in read_rows(conflicts_path(path)):
            r["label"] = canonical_label(r["label"])
            dest = Path(by_plan) / f"bench_{r['plan']}.csv" if by_plan else Path(out)
            if (dest, (r["setting"], r["label"], r["seed"])) in taken:
                groups[dest][1].append(r)
    for dest, (rows, conflicts, _) in groups.items():
        write_csv(rows, dest, COLUMNS)
        if conflicts:
            write_csv(conflicts, conflicts_path(dest), CONFLICT_COLUMNS)
    return {str(dest): len(rows) for dest, (rows, _, _) in groups.items()}


# ----------------------------------------------------------------------------------------
# Report: paired per-seed differences vs codebook-only with 95% t-intervals
# ----------------------------------------------------------------------------------------

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# The three quality metrics every report table shows, in this order.
METRICS = [("block_mse", "block MSE"), ("img_mse_cfg4", "image MSE CFG4"), ("img_mse_cfg1", "image MSE CFG1")]


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def paired(rows, metric, label, base=None, log_ratio=False):
    """Relative paired difference (label - base) / base per seed: (mean, lo, hi, n) in %.
    The base defaults to the codebook-only row with the same init. `log_ratio`: the t-interval is
    taken over log(label / base) and mapped back to % (symmetric: swapping label and base mirrors
    it, which the plain relative difference does not guarantee with few seeds)."""
    base = base or baseline_label(label)
    by = {(r["label"], r["seed"]): _num(r.get(metric)) for r in rows}
    pairs = [(by[(label, s)], by[(base, s)]) for (lab, s) in by
             if lab == label and by.get((base, s)) and by[(label, s)] is not None]
    if log_ratio:
        pairs = [(a, b) for a, b in pairs if a > 0]
    if len(pairs) < 2:
        return None
    diffs = [math.log(a / b) if log_ratio else 100 * (a - b) / b for a, b in pairs]
    m, sd, n = float(np.mean(diffs)), float(np.std(diffs, ddof=1)), len(diffs)
    h = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    if log_ratio:
        return tuple(100 * math.expm1(v) for v in (m, m - h, m + h)) + (n,)
    return m, m - h, m + h, n


def mean_sd(rows, metric, label):
    v = [_num(r.get(metric)) for r in rows if r["label"] == label]
    v = [x for x in v if x is not None]
    if not v:
        return None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


def forced_rows(rows, label) -> int:
    """Rows of `label` where `finalize` forced still-soft layers to argmax (issue 19): such a model's
    codebooks were trained for soft mixtures, so it is not ranked. Older CSVs without the column: 0."""
    return sum(1 for r in rows if r["label"] == label and (_num(r.get("forced_layers")) or 0) > 0)


def unequal_steps(rows, label, base=None) -> int:
    """Seeds where `label` ran a different number of steps than its codebook-only pair."""
    base = base or baseline_label(label)
    steps = {(r["label"], r["seed"]): _num(r.get("steps")) for r in rows}
    return sum(1 for (lab, s), v in steps.items() if lab == label and v is not None
               and steps.get((base, s)) is not None and steps[(base, s)] != v)


def _row_order(label: str):
    """Baselines, then each codebook-only baseline followed by the methods paired with it."""
    fixed = BASELINES + [m for m in CALIBRATED if baseline_label(m) == PAIRED_BASELINE] + \
        [b + _AA for b in BASELINES if METHODS[b].kind == "vq"] + \
        [PAIRED_BASELINE + _AA] + [m for m in CALIBRATED if baseline_label(m) != PAIRED_BASELINE]
    return (fixed.index(label), "") if label in fixed else (len(fixed), label)


def report(*csv_paths, log_ratio=False) -> str:
    """Markdown tables from one or more bench CSVs (rows of the same setting/label/seed: first wins);
    `log_ratio`: paired intervals over log ratios (see `paired`)."""
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
    sweep, rows = [r for r in rows if r["plan"] == "sweep"], [r for r in rows if r["plan"] != "sweep"]
    for setting in [s for s in SETTINGS if any(r["setting"] == s for r in rows)]:
        rs = [r for r in rows if r["setting"] == setting]
        labels = sorted(dict.fromkeys(r["label"] for r in rs), key=_row_order)
        out.append(f"### {setting} ({rs[0]['k']} codewords, d={rs[0]['d']})" if rs[0].get("k") else f"### {setting}")
        out.append("")
        head = "| method | seeds | bits/w | " + " | ".join(
            f"{name} mean ± sd | vs codebook-only (95% CI)" for _, name in METRICS) + \
            " | conflict share | vs codebook-only (95% CI) | calib s | steps (soft) | last switch | forced layers |"
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for lab in labels:
            n_forced = forced_rows(rs, lab)
            n_uneq = unequal_steps(rs, lab) if lab != baseline_label(lab) else 0
            flag = (f" ⚠ forced layers in {n_forced} run(s): not ranked" if n_forced else "") + \
                (f" ⚠ steps differ from its pair at {n_uneq} seed(s): not ranked" if n_uneq else "")
            cells = [lab + flag]
            ms = mean_sd(rs, "block_mse", lab)
            cells.append(str(ms[2]) if ms else "-")
            b = mean_sd(rs, "bits_per_weight", lab)
            cells.append(f"{b[0]:.3f}" if b else "-")
            for key, _ in METRICS:
                v = mean_sd(rs, key, lab)
                cells.append(f"{v[0]:.4g} ± {v[1]:.2g}" if v else "-")
                if lab == baseline_label(lab):
                    cells.append("(baseline)")
                    continue
                # a forced or unequal-budget row gets its interval but no verdict
                cells.append(_interval_cell(paired(rs, key, lab, log_ratio=log_ratio), ranked=not flag))
            c = mean_sd(rs, "conflict_share", lab)
            cells.append(f"{c[0]:.3f} ± {c[1]:.3f}" if c else "-")
            pc = paired(rs, "conflict_share", lab, log_ratio=log_ratio) if lab != baseline_label(lab) else None
            cells.append(f"{pc[0]:+.1f}% [{pc[1]:+.1f}, {pc[2]:+.1f}]" if pc else "-")
            t = mean_sd(rs, "calib_seconds", lab)
            cells.append(f"{t[0]:.0f}" if t else "-")
            st, ss = mean_sd(rs, "steps", lab), mean_sd(rs, "soft_steps", lab)
            cells.append(f"{st[0]:.0f} ({ss[0]:.0f})" if st and ss else "-")
            sw = [v for v in (_num(r.get("last_switch_step")) for r in rs if r["label"] == lab) if v is not None]
            cells.append(f"{np.mean(sw):.0f} (max {max(sw):.0f})" if sw else "-")
            fl = [_num(r.get("forced_layers")) for r in rs if r["label"] == lab]
            cells.append(f"{sum(v for v in fl if v is not None):.0f}" if any(v is not None for v in fl) else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += paper_report(rows, log_ratio) + peer_report(rows) + sweep_report(sweep)
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


def _interval_cell(p, ranked: bool = True) -> str:
    """A paired interval (mean, lo, hi, n) in %, with its verdict where it excludes 0 (unranked rows:
    the interval and "(unranked)")."""
    if p is None:
        return "-"
    verdict = (" **beats**" if p[2] < 0 else " loses" if p[1] > 0 else "") if ranked else " (unranked)"
    return f"{p[0]:+.1f}% [{p[1]:+.1f}, {p[2]:+.1f}]{verdict}"


PAPER = "vq4dit"  # the paper's algorithm: every calibrated row is also compared with it where it finished


def paper_report(rows, log_ratio=False) -> list[str]:
    """Per setting where every run of the paper's `vq4dit` records 0 forced layers, every other label
    against it per seed (paired 95% t-intervals): the ranking the issue asks for, at a fair budget."""
    out = []
    for setting in SETTINGS:
        rs = [r for r in rows if r["setting"] == setting]
        paper = [_num(r.get("forced_layers")) for r in rs if r["label"] == PAPER]
        if not paper or any(v is None or v > 0 for v in paper):  # older rows without the record: soft at the end
            continue
        labels = [lab for lab in sorted(dict.fromkeys(r["label"] for r in rs), key=_row_order)
                  if lab != PAPER and not forced_rows(rs, lab) and not unequal_steps(rs, lab, base=PAPER)]
        if not out:
            out = [f"### Against the paper's `{PAPER}` (no forced layers, same steps; below 0: lower than it)", "",
                   "| setting | method | " + " | ".join(n for _, n in METRICS) + " |", "|---|---|---|---|---|"]
        for lab in labels:
            cells = [_interval_cell(paired(rs, key, lab, base=PAPER, log_ratio=log_ratio)) for key, _ in METRICS]
            out.append(f"| {setting} | {lab} | " + " | ".join(cells) + " |")
    return out + [""] if out else []


def sweep_lr(label: str) -> tuple[str, dict]:
    """'vq4dit lr 0.05/0.0003' -> ('vq4dit', {lr_logits: 0.05, lr_codebook: 0.0003}) (sweep labels)."""
    method, lr = label.split(" lr ")
    *logits, codebook = (float(v) for v in lr.split("/"))
    return method, dict(lr_codebook=codebook, **(dict(lr_logits=logits[0]) if logits else {}))


def _sweep_cells(rows):
    """{(setting, method): {lr label: (block MSEs over tuning seeds, forced layers)}} of sweep rows."""
    cells: dict = {}
    for r in rows:
        method, _ = sweep_lr(r["label"])
        mse, forced = cells.setdefault((r["setting"], method), {}).setdefault(r["label"], ([], []))
        mse.append(_num(r.get("block_mse")))
        forced.append(_num(r.get("forced_layers")) or 0)
    return cells


def best_lr(rows) -> dict:
    """{(setting, method): learning rates} with the lowest mean block MSE over the tuning seeds among
    the sweep's combinations where no run had forced layers (the TUNED_LR table is this, written out)."""
    best = {}
    for key, by_lr in _sweep_cells([r for r in rows if r["plan"] == "sweep"]).items():
        ok = {lab: float(np.mean(m)) for lab, (m, f) in by_lr.items() if None not in m and not any(f)}
        if ok:
            best[key] = sweep_lr(min(ok, key=ok.get))[1]
    return best


def sweep_report(rows) -> list[str]:
    """The lr grid per setting and method: block MSE on the tuning seeds, relative to the small
    recipe's learning rates, the pick marked."""
    if not rows:
        return []
    recipe = RECIPES["small"]
    picks = best_lr(rows)
    out = ["### Learning-rate sweep at the finished budget (block MSE, tuning seeds)", "",
           "| setting | method | lr logits / codebook | seeds | block MSE mean | vs the recipe's lr | "
           "steps (soft) | forced layers |", "|---|---|---|---|---|---|---|---|"]
    for (setting, method), by_lr in _sweep_cells(rows).items():
        rs = [r for r in rows if r["setting"] == setting]
        base = next((lab for lab in by_lr if sweep_lr(lab)[1] == {
            k: recipe[k] for k in sweep_lr(lab)[1]}), None)
        base_mse = float(np.mean(by_lr[base][0])) if base and None not in by_lr[base][0] else None
        for lab, (mse, forced) in sorted(by_lr.items(), key=lambda kv: tuple(sorted(sweep_lr(kv[0])[1].items()))):
            lr = sweep_lr(lab)[1]
            m = float(np.mean(mse)) if None not in mse else None
            st, ss = mean_sd(rs, "steps", lab), mean_sd(rs, "soft_steps", lab)
            rel = "(recipe)" if lab == base else "-" if m is None or base_mse is None else \
                f"{100 * (m - base_mse) / base_mse:+.1f}%"
            logits = f"{lr['lr_logits']:g}" if "lr_logits" in lr else "-"
            out.append(f"| {setting} | {method} | {logits} / {lr['lr_codebook']:g} | {len(mse)} | "
                       f"{'-' if m is None else f'{m:.4g}'}{' **best**' if picks.get((setting, method)) == lr else ''} | "
                       f"{rel} | {f'{st[0]:.0f} ({ss[0]:.0f})' if st and ss else '-'} | {sum(forced):.0f} |")
    return out + [""]


def ratio_interval(ours: list, peer: float):
    """ours / peer per seed (the peer is deterministic): (mean, lo, hi, n) with a 95% t-interval."""
    r = [v / peer for v in ours if v is not None]
    if not r:
        return None
    m = float(np.mean(r))
    h = T975.get(len(r) - 1, 1.96) * float(np.std(r, ddof=1)) / math.sqrt(len(r)) if len(r) > 1 else float("nan")
    return m, m - h, m + h, len(r)


# Peer windows of the comparison: at or below our bits/weight (the claim), and up to 0.5 bits above
# (context: real packing puts HQQ/quanto/torchao 2-bit at 2.35-2.6 bits/w, just above our W2).
PEER_WINDOWS = [("<= ours", 0.0), ("<= ours + 0.5", 0.5)]


def peer_report(rows, ours: str = DEFAULT_METHOD) -> list[str]:
    """Peer rows (setting "peers") in one table, then per setting and bits window the best peer
    (lowest image MSE CFG4 among rows with images; lowest block MSE among all rows, `--images 0`
    included) and ours / it per seed, with 95% intervals over our seeds."""
    table = sorted((r for r in rows if r["setting"] == "peers"), key=lambda r: float(r["bits_per_weight"]))
    if not table:
        return []
    out = ["### Peers (calibration-free, deterministic: one run each)", "",
           "| peer | bits/w | " + " | ".join(n for _, n in METRICS) + " | acc CFG4 |", "|---|---|---|---|---|---|"]
    for r in table:
        out.append(f"| {r['label']} | {float(r['bits_per_weight']):.3f} | " + " | ".join(
            "-" if _num(r.get(k)) is None else f"{float(r[k]):.4g}" for k, _ in METRICS + [("acc_cfg4", "")]) + " |")
    out += ["", f"### `{ours}` vs the best peer in a bits/weight window (ratio < 1: ours closer to FP)", "",
            f"| setting | {ours} bits/w | seeds | peers at | best by | best peer | peer bits/w | " +
            " | ".join(f"{ours} / peer {n} (95% CI)" for _, n in METRICS) + " |", "|" + "---|" * 10]
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting and r["label"] == ours]
        if not mine:
            continue
        bw = float(np.mean([float(r["bits_per_weight"]) for r in mine]))
        for window, extra in PEER_WINDOWS:
            for crit, crit_name in (("img_mse_cfg4", "image MSE CFG4"), ("block_mse", "block MSE")):
                fits = [r for r in table if float(r["bits_per_weight"]) <= bw + extra + 1e-9
                        and _num(r.get(crit)) is not None]
                head = f"| {setting} | {bw:.3f} | {len(mine)} | {window} | {crit_name} | "
                if not fits:
                    out.append(head + f"none at <= {bw + extra:.3f} bits/w | - | - | - | - |")
                    continue
                best = min(fits, key=lambda r: float(r[crit]))
                cells = []
                for key, _ in METRICS:
                    ri = None if _num(best.get(key)) is None else ratio_interval([_num(r.get(key)) for r in mine],
                                                                               float(best[key]))
                    cells.append("-" if ri is None else f"{ri[0]:.3g} [{ri[1]:.3g}, {ri[2]:.3g}]" +
                                 (" **ours lower**" if ri[2] < 1 else " peer lower" if ri[1] > 1 else ""))
                out.append(head + f"{best['label']} | {float(best['bits_per_weight']):.3f} | " + " | ".join(cells) + " |")
    out.append("")
    return out


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.bench report")
        p.add_argument("csv", nargs="+")
        p.add_argument("--out", help="markdown file (default: print)")
        p.add_argument("--log-ratio", action="store_true", help="paired intervals over log(method / base) "
                       "per seed, mapped back to %%: symmetric in the two methods (default: (method - base) / base)")
        a = p.parse_args(argv[1:])
        text = report(*a.csv, log_ratio=a.log_ratio)
        if a.out:
            Path(a.out).write_text(text + "\n")
        print(text)
        return 0
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.bench merge",
                                    description="merge bench CSVs (and their _conflicts.csv); first row wins")
        p.add_argument("csv", nargs="+")
        dest = p.add_mutually_exclusive_group(required=True)
        dest.add_argument("--out", help="one merged CSV")
        dest.add_argument("--by-plan", metavar="DIR", help="one bench_<plan>.csv per plan in DIR")
        a = p.parse_args(argv[1:])
        for path, n in merge(a.csv, out=a.out, by_plan=a.by_plan).items():
            print(f"{path}: {n} rows")
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny budgets, W2 + XL-sharing, 1 seed")
    p.add_argument("--plan", default="main", choices=["main", "ablations", "peers", "budget", "sweep", "tuned"],
                   help="peers: HQQ / GGUF / torchao / quanto rows (vq4dit.peers.PEERS; --methods picks some); "
                        "budget: every layer finishes (BUDGET_ITERATIONS, until_hard); sweep: lr grid, block MSE; "
                        "tuned: the budget rows at each method's TUNED_LR")
    p.add_argument("--reuse", metavar="CSV", help="copy rows of this budget-plan CSV that ran the same config "
                   "(same setting, label, seed and learning rates) instead of running them again")
    p.add_argument("--out", default="out/benchmarks/bench.csv", help="CSV path; existing rows are kept and skipped")
    p.add_argument("--settings", nargs="*", help=f"subset of {list(SETTINGS)}")
    p.add_argument("--methods", nargs="*", help=f"subset of {list(METHODS)} (plan peers: of {list(PEERS)})")
    p.add_argument("--seeds", nargs="*", type=int, default=[3, 4, 5], help="seeds (k-means + calibration data)")
    p.add_argument("--labels", nargs="*", help="ablations, sweep: only these row labels (ABLATIONS; sweep: e.g. 'vq4dit lr 0.02/0.001')")
    p.add_argument("--init", default="kmeans", choices=list(INITS),
                   help="main plan: codebook init for every k-means-based method (act-aware: weight k-means by "
                        "the layer input's E[x^2]; rows are labelled '<method> +act-aware init')")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    p.add_argument("--images", type=int, default=200, help="images for image MSE / PSNR vs FP per CFG "
                   "(0: block MSE and bits only)")
    p.add_argument("--fd-images", type=int, default=1000, help="images for FD-digits (main plan, W2 + XL-sharing)")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for generated images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    known = PEERS if a.plan == "peers" else METHODS
    bad = set(a.methods or []) - set(known)
    if bad:
        print(f"error: unknown methods {sorted(bad)}; choose from {list(known)}", file=sys.stderr)
        return 2
    try:
        i, n = (int(x) for x in a.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        print(f"error: --shard must be i/n with 0 <= i < n, got {a.shard!r}", file=sys.stderr)
        return 2
    seeds = a.seeds[:1] if a.quick else a.seeds
    run(a.plan, a.out, a.settings, a.methods, seeds, (i, n), a.quick, a.images, a.fd_images, a.eval_steps,
        a.device, log=lambda s: print(s, file=sys.stderr, flush=True), labels=a.labels, init=a.init, reuse=a.reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
