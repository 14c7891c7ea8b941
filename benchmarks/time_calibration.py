"""Time a W2 calibration of one method on the embedded digits DiT, stage by stage.

    python -m benchmarks.time_calibration --method vq4dit-ste --threads 2 --out benchmarks/results/timing/time_w2_calibration_idle.csv

Stages: k-means cold (empty k-means cache), k-means warm (cache hit), calibration (small recipe,
k-means warm), block-MSE evaluation. Each stage reports wall seconds and process CPU seconds
(all threads): on a shared machine wall time depends on the load, CPU seconds much less so, and
CPU s / threads is what the stage would take on idle cores if it scaled perfectly. The load
average is recorded with every row. Prints a table and writes a CSV (atomically).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from vq4dit.config import METHODS, SETTINGS
from vq4dit.io import load_dit
from vq4dit.metrics import block_mse
from vq4dit.runner import run_method
from vq4dit.testbed import DIGITS_DIT_DIR

from benchmarks.bench import Job, job_config
from benchmarks.common import Timer, write_csv

COLUMNS = ["method", "setting", "seed", "stage", "wall_s", "cpu_s", "cpu_s_per_thread", "threads", "load_start",
           "load_end", "torch"]


def stage(name, fn, rows, threads):
    with Timer() as t:
        out = fn()
    rows.append(dict(stage=name, wall_s=round(t.wall, 2), cpu_s=round(t.cpu, 2),
                     cpu_s_per_thread=round(t.cpu / threads, 2), threads=threads,
                     load_start=round(t.load_start, 2), load_end=round(t.load_end, 2)))
    print(f"{name:28s} wall {t.wall:8.1f} s   cpu {t.cpu:8.1f} s   load {t.load_start:.1f}->{t.load_end:.1f}",
          flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vq4dit-ste")
    p.add_argument("--setting", default="W2", choices=list(SETTINGS))
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/benchmarks/time_calibration.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    # the benchmark's rows (same configs as `python -m benchmarks.bench`): k-means with the method's
    # own init (act-aware: + the statistics pass), then the method itself
    kmeans_job = Job("timing", a.setting, "kmeans", "kmeans", a.seed, vq=dict(METHODS[a.method].vq))
    method_job = Job("timing", a.setting, a.method, a.method, a.seed)
    teacher = load_dit(DIGITS_DIT_DIR, device="cpu").transformer
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VQ4DIT_CACHE"] = cache  # cold: nothing cached yet
        for name in ("k-means cold", "k-means warm"):
            stage(name, lambda: run_method(teacher, config=job_config(kmeans_job), progress=False, measure_block_mse=False), rows, a.threads)
        res = stage(f"k-means warm + calibrate {a.method}",
                    lambda: run_method(teacher, config=job_config(method_job), progress=False, measure_block_mse=False), rows, a.threads)
    calib_wall = res.trace.meta["seconds"] if res.trace is not None else float("nan")
    rows.append(dict(stage=f"calibration loop only ({res.trace.meta.get('steps_done')} steps, wall)",
                     wall_s=round(calib_wall, 2), threads=a.threads))
    print(f"calibration loop only: wall {calib_wall:.1f} s ({res.trace.meta.get('steps_done')} steps)")
    stage("block MSE evaluation", lambda: block_mse(res.model, teacher), rows, a.threads)
    for r in rows:
        r.update(method=a.method, setting=a.setting, seed=a.seed, torch=torch.__version__.split("+")[0])
    write_csv(rows, a.out, COLUMNS)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
