"""Benchmark: every method at every bit-width on the embedded digits DiT.

    python -m vq4dit.bench                 # full run (what the README quotes), ~45 min on 2 cores
    python -m vq4dit.bench --quick         # CI smoke: every method at W2 and W2-budget, tiny budgets

Prints a markdown table and writes a CSV. Every row uses the same seeds, labels and sampler.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import RECIPES, SMALL_MODEL_KMEANS_ITERS, VQ_PRESETS
from .experiment import EvalSpec, generate, run_method

METHOD_ORDER = ["rtn-tensor", "rtn", "kmeans", "codebook-only", "vq4dit-ref", "vq4dit", "vq4dit-ste"]

# Budget-matched 2-bit setting for the small model: with hidden 256 the paper's W2 preset
# (k=256, d=4) spends 0.25-0.4 extra bits/weight on fp16 codebooks (2.25-2.4 total). k=64, d=4
# keeps each codeword shared by >= 256 sub-vectors and totals ~1.6 bits/weight, under the
# 2 + 0.125 bits of per-channel RTN W2 -- so every method is compared at <= 2 total bits.
BUDGET_W2 = dict(k=64, d=4)

COLUMNS = ["setting", "method", "bits", "k", "d", "bits_per_weight", "acc_cfg1", "fd_cfg1", "acc_cfg4",
           "fd_cfg4", "psnr_cfg1", "psnr_cfg4", "block_mse", "calib_seconds", "packed_bytes", "stopped", "machine"]


def machine_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]}"


def settings(quick: bool) -> list[tuple[str, int, dict]]:
    """(name, bits, vq overrides). Quick mode keeps the two d=4 settings: d=2 presets have twice
    the sub-vectors, and their k-means alone takes minutes on 2 cores."""
    out = [(f"W{b}", b, {}) for b in sorted(VQ_PRESETS)]
    out.append(("W2-budget", 2, dict(BUDGET_W2)))
    return [s for s in out if s[2].get("d", VQ_PRESETS[s[1]][1]) == 4] if quick else out


def packed_bytes(model) -> int:
    from .io import save_quantized
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, Path(d) / "m")
        return (Path(d) / "m" / "model.safetensors").stat().st_size


def evaluate_model(model, evaluator, specs, fp_images) -> dict:
    row = {}
    for cfg, spec in specs.items():
        imgs = generate(model, spec)
        m = evaluator.evaluate(imgs, spec.labels(), reference=fp_images.get(cfg))
        row[f"acc_cfg{cfg}"] = m["accuracy"]
        row[f"fd_cfg{cfg}"] = m["fd_digits"]
        if "psnr" in m:
            row[f"psnr_cfg{cfg}"] = m["psnr"]
    return row


def run(quick: bool = False, out_csv: str = "bench.csv", model_dir=None, methods=None, only=None,
        calib_overrides=None, log=print, per_class: int = 5, eval_steps: int = 25) -> list[dict]:
    from .io import load_dit
    from .testbed import DIGITS_DIT_DIR
    from .testbed.classifier import DigitsEvaluator

    bundle = load_dit(model_dir or DIGITS_DIT_DIR)
    teacher = bundle.transformer
    evaluator = DigitsEvaluator()
    # Sampling dominates CPU time (a 7M-parameter DiT on 64 tokens): 5 images per class and 25
    # DDIM steps per CFG keep a row near a minute on 2 cores.
    n_per_class, steps = (2, 10) if quick else (per_class, eval_steps)
    specs = {c: EvalSpec(n_per_class=n_per_class, guidance_scale=float(c), num_steps=steps, seed=0) for c in (1, 4)}
    calib = dict(RECIPES["small"])
    if quick:
        calib.update(iterations=1, num_sampling_steps=5)
    calib.update(calib_overrides or {})
    kmeans_iters = 5 if quick else SMALL_MODEL_KMEANS_ITERS
    machine = machine_name()
    rows = []

    t0 = time.time()
    fp_images = {c: generate(teacher, spec) for c, spec in specs.items()}
    fp = dict(setting="FP", method="fp32", bits=32, k=None, d=None, bits_per_weight=32.0, block_mse=0.0,
              calib_seconds=0.0, packed_bytes=None, stopped=None, machine=machine)
    fp.update(evaluate_model(teacher, evaluator, specs, {}))
    fp.update(psnr_cfg1=math.inf, psnr_cfg4=math.inf)
    rows.append(fp)
    log(f"FP: acc cfg1 {fp['acc_cfg1']:.3f} cfg4 {fp['acc_cfg4']:.3f}, FD cfg1 {fp['fd_cfg1']:.2f} ({time.time() - t0:.0f}s)")
    for name, bits, vq in settings(quick):
        if only and name not in only:
            continue
        for method in methods or METHOD_ORDER:
            if method.startswith("rtn") and vq:
                continue  # RTN has no k/d: its rows live under the preset settings
            t1 = time.time()
            res = run_method(teacher, method, bits=bits, calib=calib,
                             vq=None if method.startswith("rtn") else dict(vq, kmeans_iters=kmeans_iters),
                             progress=False)
            s = res.summary()
            row = dict(setting=name, method=method, bits=bits, k=s["k"], d=s["d"],
                       bits_per_weight=s["bits_per_weight"], block_mse=s["block_mse"],
                       calib_seconds=s["seconds"], packed_bytes=packed_bytes(res.model), stopped=s["stopped"],
                       machine=machine)
            row.update(evaluate_model(res.model, evaluator, specs, fp_images))
            rows.append(row)
            write_csv(rows, out_csv)  # after every row: an interrupted run keeps what it measured
            log(f"{name:9s} {method:13s} bpw {row['bits_per_weight']:.3f} acc1 {row['acc_cfg1']:.3f} "
                f"fd1 {row['fd_cfg1']:.2f} acc4 {row['acc_cfg4']:.3f} fd4 {row['fd_cfg4']:.2f} "
                f"psnr1 {row['psnr_cfg1']:.2f} mse {row['block_mse']:.3g} calib {row['calib_seconds']:.0f}s "
                f"(row {time.time() - t1:.0f}s)")
    write_csv(rows, out_csv)
    print(markdown_table(rows))
    log(f"wrote {out_csv} ({time.time() - t0:.0f}s total, machine: {machine})")
    return rows


def write_csv(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def markdown_table(rows) -> str:
    head = ("| setting | method | k | d | bits/weight | acc CFG1 | FD CFG1 | acc CFG4 | FD CFG4 | PSNR CFG1 dB "
            "| PSNR CFG4 dB | block MSE | calib s | packed bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["setting"], r["method"], _fmt(r.get("k"), "d"), _fmt(r.get("d"), "d"),
            _fmt(r["bits_per_weight"], ".3f"), _fmt(r.get("acc_cfg1"), ".1%"), _fmt(r.get("fd_cfg1"), ".2f"),
            _fmt(r.get("acc_cfg4"), ".1%"), _fmt(r.get("fd_cfg4"), ".2f"), _fmt(r.get("psnr_cfg1"), ".2f"),
            _fmt(r.get("psnr_cfg4"), ".2f"), _fmt(r.get("block_mse"), ".3g"), _fmt(r.get("calib_seconds"), ".0f"),
            _fmt(r.get("packed_bytes"), ",d")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vq4dit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke test): every method at W2 and W2-budget, few images")
    p.add_argument("--out", default="bench.csv", help="CSV path (default bench.csv)")
    p.add_argument("--model", help="DiT dir (default: the embedded digits DiT)")
    p.add_argument("--methods", nargs="*", help=f"subset of {METHOD_ORDER}")
    p.add_argument("--settings", nargs="*", help="subset of W2 W3 W4 W2-budget")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--per-class", type=int, default=5, help="generated images per class and CFG (full mode)")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for generated images (full mode)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = set(args.methods or []) - set(METHOD_ORDER)
    if bad:
        print(f"error: unknown methods {sorted(bad)}; choose from {METHOD_ORDER}", file=sys.stderr)
        return 2
    run(quick=args.quick, out_csv=args.out, model_dir=args.model, methods=args.methods, only=args.settings,
        log=lambda s: print(s, file=sys.stderr, flush=True), per_class=args.per_class, eval_steps=args.eval_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def read_csv(path) -> list[dict]:
    """Rows of a bench CSV with numbers parsed back (for README tables from saved runs)."""
    def num(v):
        if v in ("", "None"):
            return None
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and abs(f) < 1e15 and "." not in v and "e" not in v else f
    with open(path) as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]
