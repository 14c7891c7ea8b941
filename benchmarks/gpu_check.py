"""Pieces of the device check (benchmarks/gpu_check.sh) that no other benchmark covers.

    python -m benchmarks.gpu_check digits --device cuda --out $OUT/digits_calib.csv   # W2 calibration fp32 / bf16
    python -m benchmarks.gpu_check project --scale-csv $OUT/xl_calib.csv --out $OUT/xl_projection.csv
    python -m benchmarks.gpu_check app --device cuda --out $OUT/app_cuda.csv          # app + gradio_client

digits   the default method (vq4dit-ste-aa) at W2 on the embedded digits DiT, small recipe, one run in
         fp32 and one with CalibConfig.autocast="bf16": wall seconds (k-means included) and block MSE
project  XL/2 W2 reference budget (1000 x 50 = 50,000 steps, 28 blocks) from measured calibration
         steps (scale_bench's calib stage): step seconds x 50,000 x 28 / measured blocks
app      starts `python app.py --device D` on a free loopback port, drives one calibration through
         gradio_client (/run, streamed to the end), and times the start and the run
Rows: check, what, value, unit, device, load_avg. Printed as a table, written as a CSV.
"""
from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

COLUMNS = ["check", "what", "value", "unit", "device", "load_avg"]
REFERENCE_STEPS = 1000 * 50   # reference recipe: 1000 trajectories x 50 sampler steps
XL_BLOCKS = 28


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_digits(a) -> list[dict]:
    from vq4dit.config import DEFAULT_METHOD
    from vq4dit.io import load_dit
    from vq4dit.runner import run_method
    from vq4dit.testbed import DIGITS_DIT_DIR
    teacher = load_dit(DIGITS_DIT_DIR, device=a.device).transformer
    rows = []
    # bf16 autocast on a CPU without bf16 units is emulated and very slow (a CPU smoke run of this
    # check did not finish the bf16 half in 9 minutes): on CPU only with --bf16-on-cpu
    for autocast in (None, "bf16") if torch.device(a.device).type == "cuda" or a.bf16_on_cpu else (None,):
        tag = "bf16 autocast" if autocast else "fp32"
        calib = dict(device=a.device, autocast=autocast, seed=a.seed)
        if a.iterations:
            calib.update(iterations=a.iterations)
        _sync(a.device)
        t = time.time()
        res = run_method(teacher, DEFAULT_METHOD, bits=2, calib=calib, recipe="small", progress=False,
                         vq=dict(kmeans_iters=a.kmeans_iters) if a.kmeans_iters else None)
        _sync(a.device)
        rows += [dict(check="digits", what=f"{DEFAULT_METHOD} W2 small recipe, {tag}: wall (k-means included)",
                      value=time.time() - t, unit="s"),
                 dict(check="digits", what=f"{DEFAULT_METHOD} W2 small recipe, {tag}: calibration steps",
                      value=res.trace.meta["steps_done"], unit="steps"),
                 dict(check="digits", what=f"{DEFAULT_METHOD} W2 small recipe, {tag}: block MSE", value=res.block_mse,
                      unit="mse")]
    return rows


def check_project(a) -> list[dict]:
    """Reference-budget projection from scale_bench rows 'calibration step after the first (M fp, B blocks)'."""
    rows = []
    with open(a.scale_csv) as f:
        for r in csv.DictReader(f):
            what = r["what"]
            if not what.startswith("calibration step after the first"):
                continue
            tag = what[what.index("(") + 1: what.rindex(")")]          # "vq4dit fp32, 2 blocks"
            blocks = int(tag.rsplit(",", 1)[1].split()[0])
            minutes = float(r["value"]) * REFERENCE_STEPS * XL_BLOCKS / blocks / 60
            rows.append(dict(check="project", what=f"XL/2 W2 reference budget from measured steps ({tag})",
                             value=minutes, unit="min"))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_app(a) -> list[dict]:
    from gradio_client import Client
    root = Path(__file__).resolve().parents[1]
    port = _free_port()
    runs = tempfile.mkdtemp(prefix="vq4dit-gpu-check-runs-")
    cmd = [sys.executable, str(root / "app.py"), "--device", a.device, "--port", str(port), "--runs-dir", runs,
           "--no-demo-runs", "--no-umap-warmup", "--iterations", "1", "--sampling-steps", str(a.app_steps),
           "--kmeans-iters", "5", "--eval-per-class", "1", "--eval-steps", "3", "--image-steps", "3"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        client = None
        while time.time() - t0 < a.app_timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not serving yet
                time.sleep(1)
        if client is None:
            raise RuntimeError(f"app did not serve within {a.app_timeout} s")
        rows.append(dict(check="app", what=f"start to serving (--device {a.device})", value=time.time() - t0, unit="s"))
        t = time.time()
        # the Set-up panel's inputs: method, bits, k, d, n, iterations, steps, k-means iters, lrs, lambda, seed
        job = client.submit("vq4dit", 2, 256, 4, 2, 1, a.app_steps, 5, 5e-2, 1e-4, 1.0, 0, api_name="/run")
        outs = [o for o in job]
        rows.append(dict(check="app", what=f"one calibration through gradio_client (1 x {a.app_steps} steps)",
                         value=time.time() - t, unit="s"))
        saved = [p for p in Path(runs).iterdir() if (p / "model").is_dir()]
        rows.append(dict(check="app", what="run saved with a packed model", value=float(len(saved) == 1), unit="bool"))
        rows.append(dict(check="app", what="streamed updates", value=float(len(outs)), unit="updates"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("check", choices=["digits", "project", "app"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iterations", type=int, default=None, help="digits: trajectories (default: the small recipe's)")
    p.add_argument("--kmeans-iters", type=int, default=None, help="digits: k-means iterations (default: recipe's)")
    p.add_argument("--bf16-on-cpu", action="store_true", help="digits: also time bf16 autocast on a CPU device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-csv", type=Path, help="project: the scale_bench CSV with calib rows")
    p.add_argument("--app-steps", type=int, default=3, help="app: sampler steps of the one trajectory")
    p.add_argument("--app-timeout", type=float, default=300)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    from benchmarks.bench import write_csv
    load = os.getloadavg()[0]
    rows = globals()[f"check_{a.check}"](a)
    for r in rows:
        r.update(device=a.device, load_avg=round(max(load, os.getloadavg()[0]), 2))
    write_csv(rows, a.out, COLUMNS)
    print("| check | what | value | unit |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['what']} | {r['value']:.4g} | {r['unit']} |")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
