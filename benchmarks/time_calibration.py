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
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from vq4dit.config import METHODS, SETTINGS
from vq4dit.runner import run_method
from vq4dit.io import load_dit
from vq4dit.metrics import block_mse
from vq4dit.testbed import DIGITS_DIT_DIR


def stage(name, fn, rows, threads):
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rows.append(dict(stage=name, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                     cpu_s_per_thread=round(cpu / threads, 2), threads=threads,
                     load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2)))
    print(f"{name:28s} wall {wall:8.1f} s   cpu {cpu:8.1f} s   load {load0:.1f}->{os.getloadavg()[0]:.1f}",
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
    vq = dict(SETTINGS[a.setting])
    bits = vq.pop("bits")
    vq["seed"] = a.seed
    kmeans_vq = dict(vq, **METHODS[a.method].vq)  # the method's own init (act-aware: + the statistics pass)
    teacher = load_dit(DIGITS_DIT_DIR, device="cpu").transformer
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VQ4DIT_CACHE"] = cache  # cold: nothing cached yet
        stage("k-means cold", lambda: run_method(teacher, "kmeans", bits, vq=kmeans_vq, recipe="small",
                                                 progress=False, measure_block_mse=False), rows, a.threads)
        stage("k-means warm", lambda: run_method(teacher, "kmeans", bits, vq=kmeans_vq, recipe="small",
                                                 progress=False, measure_block_mse=False), rows, a.threads)
        res = stage(f"k-means warm + calibrate {a.method}",
                    lambda: run_method(teacher, a.method, bits, vq=vq, calib=dict(seed=a.seed), recipe="small",
                                       progress=False, measure_block_mse=False), rows, a.threads)
    calib_wall = res.trace.meta["seconds"] if res.trace is not None else float("nan")
    rows.append(dict(stage=f"calibration loop only ({res.trace.meta.get('steps_done')} steps, wall)",
                     wall_s=round(calib_wall, 2), threads=a.threads))
    print(f"calibration loop only: wall {calib_wall:.1f} s ({res.trace.meta.get('steps_done')} steps)")
    stage("block MSE evaluation", lambda: block_mse(res.model, teacher), rows, a.threads)
    for r in rows:
        r.update(method=a.method, setting=a.setting, seed=a.seed, torch=torch.__version__.split("+")[0])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    cols = ["method", "setting", "seed", "stage", "wall_s", "cpu_s", "cpu_s_per_thread", "threads", "load_start",
            "load_end", "torch"]
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
