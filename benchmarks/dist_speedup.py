"""Data-parallel calibration speed-up: 2 processes x 1 thread vs 1 process x 2 threads (same total
threads) on the embedded digits DiT, CPU, gloo. Prints a table, writes a CSV (--csv).

    python -m benchmarks.dist_speedup                      # default: small recipe, 4 x 25 steps
    python -m benchmarks.dist_speedup --iterations 8 --labels 4 16

Each run is a fresh process group started by torchrun (plain python for one process). The worker
times where a calibration step goes, by wrapping (not changing) the library's functions:
teacher trajectory (teacher forward + sampler step), collectives (gradient and statistics
all-reduce, stop flag), trace statistics (conflict stats and layer records), and the rest
(student forward + backward, weight rebuild from codebooks, optimizer, freezing). It also keeps
the calibrated model (fp32 codebooks) so 1-vs-2-process results can be compared on this model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Timer, load_avg, write_csv

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Worker: one calibration run (under torchrun when several processes)
# ----------------------------------------------------------------------------------------

TRACE_EVERY = 10  # layer statistics every 10 steps (the default, total/100, is every step on a
                  # 50-step run; a reference run records every 500)


KMEANS_ITERS = 5  # k-means is not what is measured here (it is not data parallel): keep it short


def bench_config(method: str, iterations: int, labels: int, method_config):
    return method_config(method, bits=2, recipe="small", codebook_dtype="float32", kmeans_iters=KMEANS_ITERS,
                         calib=dict(iterations=iterations, labels_per_iteration=labels, seed=0,
                                    trace_every=TRACE_EVERY))


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    import importlib
    from vq4dit import distributed, method_config, quantize
    calibrate_mod = importlib.import_module("vq4dit.calibrate")  # (the package attribute is the function)
    quant_api = importlib.import_module("vq4dit.quant_api")
    from vq4dit.io import load_dit
    from vq4dit.layers import VQLinear
    from vq4dit.size import quantized_layers
    from vq4dit.testbed import DIGITS_DIT_DIR
    from vq4dit.trace import Recorder

    distributed.init_from_env(torch.device("cpu"))
    spent = dict(teacher=0.0, comm=0.0, stats=0.0, calibrate=0.0)

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    def timed_trajectory(*a, **kw):
        gen = teacher_trajectory(*a, **kw)
        while True:
            t = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                spent["teacher"] += time.perf_counter() - t
                return
            spent["teacher"] += time.perf_counter() - t
            yield item

    teacher_trajectory = calibrate_mod.teacher_trajectory
    calibrate_mod.teacher_trajectory = timed_trajectory
    for name in ("all_reduce_mean_grads", "all_reduce_mean", "any_rank", "broadcast_module_",
                 "check_same_on_all_ranks"):
        setattr(distributed, name, timed(getattr(distributed, name), "comm"))
    calibrate_mod.gradient_conflict = timed(calibrate_mod.gradient_conflict, "stats")
    Recorder.record_layers = timed(Recorder.record_layers, "stats")
    quant_api.calibrate = timed(quant_api.calibrate, "calibrate")

    model = load_dit(DIGITS_DIT_DIR, device="cpu").transformer
    teacher = load_dit(DIGITS_DIT_DIR, device="cpu").transformer
    config = bench_config(args.method, args.iterations, args.labels, method_config)
    distributed.barrier()
    t0 = time.perf_counter()
    trace = quantize(model, config, teacher=teacher, progress=False)
    total = time.perf_counter() - t0
    if distributed.is_main():
        layers = {n: m for n, m in quantized_layers(model).items() if isinstance(m, VQLinear)}
        torch.save(dict(codebook={n: m.codebook.detach() for n, m in layers.items()},
                        assignment={n: m.assignment for n, m in layers.items()}), args.out + ".pt")
        steps = trace.meta["steps_done"]
        Path(args.out + ".json").write_text(json.dumps(dict(
            total_s=total, kmeans_s=total - spent["calibrate"], calib_s=spent["calibrate"], steps=steps,
            teacher_s=spent["teacher"], comm_s=spent["comm"], stats_s=spent["stats"],
            final_loss=float(trace.steps["block_loss"].iloc[-1]))))
    distributed.shutdown()


# ----------------------------------------------------------------------------------------
# Driver: the runs, the comparison, the table
# ----------------------------------------------------------------------------------------

def run(procs: int, threads: int, labels: int, args, tmp: Path, cache: str) -> dict:
    out = tmp / f"p{procs}t{threads}n{labels}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VQ4DIT_CACHE=cache, PYTHONPATH=str(ROOT))
    worker_args = ["-m", "benchmarks.dist_speedup", "--worker", "--threads", str(threads), "--labels", str(labels),
                   "--iterations", str(args.iterations), "--method", args.method, "--out", str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
           if procs > 1 else [sys.executable]) + worker_args  # torchrun takes -m MODULE too
    with Timer() as t:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    row = json.loads(Path(str(out) + ".json").read_text())
    row.update(procs=procs, threads=threads, labels=labels, wall_s=t.wall, load_before=t.load_start,
               load_after=t.load_end, model=str(out) + ".pt")
    row["rest_s"] = row["calib_s"] - row["teacher_s"] - row["comm_s"] - row["stats_s"]
    row["ms_per_step"] = 1000 * row["calib_s"] / row["steps"]
    return row


def compare(a: str, b: str) -> tuple[float, float]:
    """(max relative codebook difference, share of assignments that differ) of two runs' models."""
    import torch
    ma, mb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    rel = max(((ma["codebook"][n] - mb["codebook"][n]).norm() / ma["codebook"][n].norm()).item()
              for n in ma["codebook"])
    diff = sum(int((ma["assignment"][n] != mb["assignment"][n]).sum()) for n in ma["assignment"])
    total = sum(t.numel() for t in ma["assignment"].values())
    return rel, diff / total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--labels", type=int, nargs="+", default=[4], help="labels per iteration (total batch), one run each")
    p.add_argument("--iterations", type=int, default=2, help="teacher trajectories (25 steps each, small recipe)")
    p.add_argument("--method", default="vq4dit-ste")
    p.add_argument("--baseline-threads", type=int, default=2, choices=[1, 2],
                   help="baseline: 1 process with this many threads (2 = the same total as 2 x 1)")
    p.add_argument("--csv", default="out/benchmarks/dist_speedup.csv")
    p.add_argument("--kmeans-cache", help="k-means cache dir to reuse between invocations (default: a temp dir)")
    args = p.parse_args()
    if args.worker:
        args.labels = args.labels[0]
        return worker(args)

    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="dist_speedup_"))
    # k-means is not data parallel (every rank computes the same codebooks, then rank 0's are
    # broadcast): time it once here, cold, and let the runs read it from a cache
    import torch
    from vq4dit import method_config, quantize
    from vq4dit.io import load_dit
    from vq4dit.testbed import DIGITS_DIT_DIR
    os.environ["VQ4DIT_CACHE"] = args.kmeans_cache or str(tmp / "cache")
    torch.set_num_threads(2)
    t = time.perf_counter()
    cfg = bench_config(args.method, args.iterations, 4, method_config)
    quantize(load_dit(DIGITS_DIT_DIR, device="cpu").transformer,
             method_config("kmeans", bits=2, recipe="small", codebook_dtype="float32", kmeans_iters=KMEANS_ITERS),
             progress=False)
    kmeans_cold = time.perf_counter() - t
    print(f"k-means ({cfg.kmeans_iters} iterations) before the runs, 1 process x 2 threads: {kmeans_cold:.1f} s "
          f"(load {load_avg():.1f}; cold unless --kmeans-cache was filled before)", flush=True)
    rows = []
    for labels in args.labels:
        # 1 x 2 threads (baseline), 2 x 1 thread (data parallel); 1 x 1 thread at the full and half
        # batch: what one rank would do alone, to split a step into batch-bound and fixed parts
        bt = args.baseline_threads
        runs = [(1, bt, labels), (2, 1, labels)] + ([(1, 1, labels)] if bt != 1 else []) + [(1, 1, labels // 2)]
        for procs, threads, n in runs:
            if n < 1:
                continue
            r = run(procs, threads, n, args, tmp, os.environ["VQ4DIT_CACHE"])
            r["batch"] = labels
            rows.append(r)
            print(f"procs={procs} threads={threads} labels={n}: {r['ms_per_step']:.0f} ms/step, "
                  f"calib {r['calib_s']:.1f} s, load {r['load_before']:.1f}", flush=True)
        base = next(r for r in rows if (r["procs"], r["threads"], r["labels"]) == (1, bt, labels))
        dp = next(r for r in rows if (r["procs"], r["threads"], r["labels"]) == (2, 1, labels))
        rel, share = compare(base["model"], dp["model"])
        for r in rows[-len(runs):]:
            r["baseline"] = f"1x{bt}"
            r["speedup_calib_vs_baseline"] = base["calib_s"] / r["calib_s"]
            r["speedup_total_vs_baseline"] = base["total_s"] / r["total_s"]
        dp["codebook_max_rel_diff_vs_baseline"], dp["assign_diff_share_vs_baseline"] = rel, share

    cols = ["batch", "procs", "threads", "labels", "steps", "ms_per_step", "calib_s", "kmeans_s", "total_s",
            "teacher_s", "comm_s", "stats_s", "rest_s", "baseline", "speedup_calib_vs_baseline",
            "speedup_total_vs_baseline", "codebook_max_rel_diff_vs_baseline", "assign_diff_share_vs_baseline", "final_loss", "load_before",
            "load_after", "wall_s"]
    comment = (f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}; method {args.method}, "
               f"recipe small, {args.iterations} iterations x 25 steps, W2 (k=256, d=4), gloo; "
               f"load = 1-min load average before/after each run (shared machine); k-means ({KMEANS_ITERS} iterations) "
               f"before the runs (1 x 2 threads; cold unless --kmeans-cache was filled) "
               f"{kmeans_cold:.1f} s, cached in every run (kmeans_s = cache read + layer swap)")
    write_csv([{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              args.csv, cols, comment=comment)
    print("\nms per step; teacher, comm (collectives), stats (trace) and rest are its parts")
    print(f"{'batch':>5} {'procs x thr':>11} {'labels':>6} {'ms/step':>8} {'teacher':>8} {'comm':>6} {'stats':>6} "
          f"{'rest':>6} {'kmeans':>7} {'speedup':>7} {'load':>9}")
    for r in rows:
        s = r["steps"]
        print(f"{r['batch']:>5} {r['procs']:>5} x {r['threads']:<3} {r['labels']:>6} {r['ms_per_step']:>8.0f} "
              f"{1000 * r['teacher_s'] / s:>8.0f} {1000 * r['comm_s'] / s:>6.0f} {1000 * r['stats_s'] / s:>6.0f} "
              f"{1000 * r['rest_s'] / s:>6.0f} {r['kmeans_s']:>6.1f}s {r['speedup_calib_vs_baseline']:>6.2f}x "
              f"{r['load_before']:>4.1f}/{r['load_after']:<4.1f}")
    for r in rows:
        if "codebook_max_rel_diff_vs_baseline" in r:
            print(f"batch {r['batch']}: 2x1 vs {r['baseline']} model: max codebook rel diff "
                  f"{r['codebook_max_rel_diff_vs_baseline']:.2e}, "
                  f"assignments differing {100 * r['assign_diff_share_vs_baseline']:.4f}%")
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
