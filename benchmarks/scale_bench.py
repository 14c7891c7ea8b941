"""DiT-XL/2 at scale: time and peak memory per stage, on the XL-shaped test-bed pipeline.

    python -m benchmarks.scale_bench --out benchmarks/results/xl_scale/xl_scale_cpu.csv   # 28 blocks, CPU
    python -m benchmarks.scale_bench --blocks 2 --kmeans-iters 2 --out /tmp/t.csv   # tiny, a smoke test
    python -m benchmarks.scale_bench --device cuda --calib-steps 20 --out $OUT/xl_scale_gpu.csv  # benchmarks/gpu_xl.sh

Each stage runs in its own process, so its peak resident memory (ru_maxrss) is its own:
  write        write the XL-shaped pipeline (vq4dit.testbed.xl)
  load         load it (transformer + VAE)
  kmeans       W2 k-means of every block Linear (the `kmeans` method), then `save` the packed dir
  load_packed  load the packed dir; memory at rest before and after the first forward (decoded cache)
  sample       one image, FP vs packed transformer (same noise), then the VAE decode
  calib        calibration steps of `vq4dit` (soft) and `codebook-only` (hard) on --calib-blocks blocks
               of the XL-wide model, fp32 and (CUDA) bf16 autocast
  digits       embedded digits DiT: FP vs packed W2 sampling time (decoded-weight cache), load time
  quality      embedded digits DiT: k-means on a subsample vs full Lloyd (weight error, block MSE)
Rows: stage, what, value, unit. `--stages` picks some. Timings on a shared machine are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import Rows, gpu_name, load_avg, machine_name, peak_rss_gb, rss_now_gb, sync, write_csv

STAGES = ("write", "load", "kmeans", "load_packed", "sample", "calib", "digits", "quality")
COLUMNS = ["stage", "what", "value", "unit", "blocks", "device", "machine", "load_avg"]


# ----------------------------------------------------------------------------------------
# Stages (each in its own process)
# ----------------------------------------------------------------------------------------

def stage_write(a, r: Rows):
    from vq4dit.testbed.xl import write_xl_pipeline
    t = time.time()
    write_xl_pipeline(a.work / "xl", num_layers=a.blocks, overwrite=True)
    r.add(f"write {a.blocks}-block pipeline", time.time() - t, "s")
    if "calib" in a.stages and a.calib_blocks != a.blocks:
        write_xl_pipeline(a.work / "xl-calib", num_layers=a.calib_blocks, overwrite=True)
    from vq4dit.io import dir_bytes
    r.add("pipeline dir size", dir_bytes(a.work / "xl") / 2 ** 20, "MiB")
    r.memory()


def stage_load(a, r: Rows):
    from vq4dit.io import load_dit
    t = time.time()
    load_dit(a.work / "xl", device=a.device)
    sync(a.device)
    r.add("load FP pipeline", time.time() - t, "s")
    r.add("RSS after load", rss_now_gb(), "GiB")
    r.memory()


def stage_kmeans(a, r: Rows):
    from vq4dit import method_config, quantize
    from vq4dit.io import dir_bytes, load_dit, save_quantized
    bundle = load_dit(a.work / "xl", device=a.device)
    cfg = method_config("kmeans", bits=2, kmeans_iters=a.kmeans_iters)
    t = time.time()
    quantize(bundle.transformer, cfg, progress=False)
    sync(a.device)
    r.add(f"k-means W2, {a.kmeans_iters} iters, all layers", time.time() - t, "s")
    r.add("peak RSS through k-means", peak_rss_gb(), "GiB")
    t = time.time()
    out = save_quantized(bundle.transformer, a.work / "xl-w2", scheduler=bundle.scheduler, overwrite=True)
    r.add("save packed", time.time() - t, "s")
    meta = json.loads((out / "vq4dit_config.json").read_text())
    r.add("packed dir total", dir_bytes(out) / 2 ** 20, "MiB")
    r.add("packed indices", meta["size"]["index_bytes"] / 2 ** 20, "MiB")
    r.add("fp tensors stored once (aliases)", len(meta["aliases"]), "tensors")
    r.memory()


def stage_load_packed(a, r: Rows):
    from vq4dit.io import load_quantized
    t = time.time()
    bundle = load_quantized(a.work / "xl-w2", device=a.device)
    sync(a.device)
    r.add("load packed", time.time() - t, "s")
    r.add("RSS at rest after load", rss_now_gb(), "GiB")
    m = bundle.transformer
    c = m.config
    with torch.no_grad():
        m(torch.randn(2, c.in_channels, c.sample_size, c.sample_size, device=a.device),
          timestep=torch.tensor([500, 500], device=a.device), class_labels=torch.tensor([1, 1000], device=a.device))
    sync(a.device)
    r.add("RSS at rest after first forward (cache)", rss_now_gb(), "GiB")
    r.memory()


def _time_sampling(models: dict, scheduler, steps, device, repeats, labels) -> dict:
    """Best-of-`repeats` sampling time per model, the models interleaved (A B A B ...) so a
    change in machine load hits them alike. Returns {name: (seconds, latents)}."""
    from vq4dit.sampling import sample
    best = {name: (float("inf"), None) for name in models}
    for model in models.values():  # warm-up: the packed model decodes its weights once here
        sample(model, labels[:1], num_steps=1, scheduler=scheduler, seed=0, device=device)
    for _ in range(repeats):
        for name, model in models.items():
            sync(device)
            t = time.time()
            latents = sample(model, labels, num_steps=steps, scheduler=scheduler, seed=0, device=device)
            sync(device)
            best[name] = min(best[name], (time.time() - t, latents), key=lambda v: v[0])
    return best


def stage_sample(a, r: Rows):
    from vq4dit.io import load_dit, load_quantized
    fp = load_dit(a.work / "xl", device=a.device)
    vq = load_quantized(a.work / "xl-w2", device=a.device).transformer
    labels = [207] * a.sample_batch
    best = _time_sampling(dict(fp=fp.transformer, vq=vq), fp.scheduler, a.sample_steps, a.device, a.repeats, labels)
    (t_fp, _), (t_vq, lat) = best["fp"], best["vq"]
    r.add(f"FP sampling, {a.sample_batch} image(s) x {a.sample_steps} steps (CFG 4)", t_fp, "s")
    r.add(f"packed sampling, {a.sample_batch} image(s) x {a.sample_steps} steps", t_vq, "s")
    r.add("packed / FP sampling time", t_vq / t_fp, "x")
    t = time.time()
    with torch.no_grad():
        img = fp.vae.decode(lat[:1].to(a.device) / fp.vae.config.scaling_factor).sample
    sync(a.device)
    r.add("VAE decode, 1 image 256x256", time.time() - t, "s")
    r.add("image finite", float(torch.isfinite(img).all()), "bool")
    r.memory()


def stage_calib(a, r: Rows):
    import copy

    from vq4dit import method_config, quantize
    from vq4dit.calibrate import calibrate
    from vq4dit.io import load_dit
    from vq4dit.naming import default_filter
    for method in ("vq4dit", "codebook-only"):
        for dtype in (["fp32", "bf16"] if torch.device(a.device).type == "cuda" else ["fp32"]):
            src = a.work / ("xl" if a.calib_blocks == a.blocks else "xl-calib")
            model = load_dit(src, device=a.device).transformer
            teacher = copy.deepcopy(model).eval()
            originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if default_filter(m, n)}
            cfg = method_config(method, bits=2, kmeans_iters=a.kmeans_iters,
                                calib=dict(iterations=1, num_sampling_steps=a.calib_steps, teacher_sampler="ddpm",
                                           device=str(a.device)))
            t = time.time()
            quantize(model, method_config("kmeans", bits=2, kmeans_iters=a.kmeans_iters), progress=False)
            model.vq4dit_config = cfg
            t_km = time.time() - t
            ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16"
                   else torch.autocast("cpu", enabled=False))
            with ctx:
                trace = calibrate(model, teacher, cfg, originals, progress=False)
            secs = list(trace.steps["seconds"])
            steps = trace.meta["steps_done"]
            tag = f"{method} {dtype}, {a.calib_blocks} blocks"
            r.add(f"k-means W2 ({tag})", t_km, "s")
            if len(secs) > 1:
                r.add(f"calibration step after the first ({tag})", (secs[-1] - secs[0]) / (len(secs) - 1), "s")
            else:
                r.add(f"calibration, the only step (first-step overhead included) ({tag})", trace.meta["seconds"], "s")
            r.add(f"calibration, {steps} steps in all ({tag})", trace.meta["seconds"], "s")
            del model, teacher, originals, trace
            if torch.device(a.device).type == "cuda":
                torch.cuda.empty_cache()
    r.memory()


def stage_digits(a, r: Rows):
    """Item 6: sampling the packed model vs FP on the embedded model (the decoded-weight cache)."""
    from vq4dit import method_config, quantize
    from vq4dit.io import load_dit, load_quantized, save_quantized
    from vq4dit.testbed import DIGITS_DIT_DIR
    fp = load_dit(DIGITS_DIT_DIR, device=a.device)
    m = load_dit(DIGITS_DIT_DIR, device=a.device).transformer
    quantize(m, method_config("kmeans", bits=2, kmeans_iters=a.kmeans_iters), progress=False)
    save_quantized(m, a.work / "digits-w2", scheduler=fp.scheduler, overwrite=True)
    t = time.time()
    vq = load_quantized(a.work / "digits-w2", device=a.device).transformer
    r.add("load packed digits W2", time.time() - t, "s")
    labels = list(range(10)) * 2
    best = _time_sampling(dict(fp=fp.transformer, vq=vq, no_cache=_NoCache(vq)), fp.scheduler, 25, a.device,
                          a.repeats, labels)
    t_fp, t_vq, t_nc = best["fp"][0], best["vq"][0], best["no_cache"][0]
    r.add("FP sampling, 20 images x 25 steps (best of repeats)", t_fp, "s")
    r.add("packed W2 sampling, same", t_vq, "s")
    r.add("packed / FP sampling time", t_vq / t_fp, "x")
    r.add("packed W2 sampling without the decoded-weight cache", t_nc, "s")
    r.add("packed without cache / FP sampling time", t_nc / t_fp, "x")
    r.memory()


class _NoCache(torch.nn.Module):
    """Runs a quantized model with the decoded-weight cache off (weights rebuilt every forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args, **kw):
        from vq4dit.layers import VQLinear
        for m in self.model.modules():
            if isinstance(m, VQLinear):
                m._cache_key = None
        with torch.enable_grad():  # grad mode skips the cache; no parameter requires grad
            return self.model(*args, **kw)


def stage_quality(a, r: Rows):
    """Item 2: the subsample (256 points per codeword) vs full Lloyd on the embedded model. At W2
    (k=256) only the adaLN layers (98,304 sub-vectors) exceed 256 * 256 and are subsampled; at W3
    and XL-sharing every layer is. Weight error = mean squared error of W_hat vs W over all
    quantized weights."""
    from vq4dit import method_config, quantize
    from vq4dit.config import setting_kd
    from vq4dit.io import load_dit
    from vq4dit.naming import default_filter
    from vq4dit.size import quantized_layers
    from vq4dit.metrics import block_mse
    from vq4dit.testbed import DIGITS_DIT_DIR
    teacher = load_dit(DIGITS_DIT_DIR, device=a.device).transformer
    ws = {n: m.weight.detach() for n, m in teacher.named_modules() if default_filter(m, n)}
    for setting in ("W2", "W3", "XL-sharing"):
        k, d = setting_kd(setting)
        for ppc, label in ((256, "subsample 256/codeword"), (None, "full Lloyd")):
            m = load_dit(DIGITS_DIT_DIR, device=a.device).transformer
            cfg = method_config("kmeans", bits=2, k=k, d=d, kmeans_iters=50, kmeans_points_per_codeword=ppc)
            t = time.time()
            quantize(m, cfg, progress=False)
            secs = time.time() - t
            err = sum((q.weight - ws[n]).pow(2).sum().item() for n, q in quantized_layers(m).items())
            err /= sum(w.numel() for w in ws.values())
            r.add(f"{setting} {label}: weight MSE", err, "")
            r.add(f"{setting} {label}: block MSE", block_mse(m, teacher)["mean"], "")
            r.add(f"{setting} {label}: k-means time", secs, "s")
    r.memory()


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

def flop_estimate(n_weights: int = 668_860_416, tokens: int = 256, hidden: int = 1152, blocks: int = 28,
                  images_per_step: int = 8, steps: int = 50_000) -> dict:
    """FLOPs of XL/2 calibration with the reference budget (1000 x 50 steps, 4 labels x CFG = 8
    images per step): teacher forward + student forward + student backward (2x forward)."""
    fwd = 2 * n_weights * tokens + blocks * 4 * tokens ** 2 * hidden   # per image: linears + attention
    per_step = 4 * fwd * images_per_step
    return dict(forward_per_image=fwd, per_step=per_step, total=per_step * steps)


def _stage_main(argv) -> int:
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    r = Rows(a.stage, a.device)
    globals()[f"stage_{a.stage}"](a, r)
    print("ROWS " + json.dumps(r.rows), flush=True)
    return 0


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--blocks", type=int, default=28, help="blocks of the XL-shaped model (28 = DiT-XL/2)")
    p.add_argument("--calib-blocks", type=int, default=2, help="blocks of the XL-wide model calibrated in `calib`")
    p.add_argument("--calib-steps", type=int, default=2, help="optimizer steps per calibration measurement")
    p.add_argument("--kmeans-iters", type=int, default=100, help="Lloyd iterations (default: the reference recipe's)")
    p.add_argument("--sample-steps", type=int, default=4, help="sampler steps for the XL image")
    p.add_argument("--sample-batch", type=int, default=1, help="images per sampling measurement")
    p.add_argument("--repeats", type=int, default=2, help="sampling timings: best of this many")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a busy 2-core box more threads wait on each other)")
    p.add_argument("--work", type=Path, default=Path("out/scale-bench"), help="where the pipelines are written")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--out", type=Path, default=Path("out/benchmarks/xl_scale.csv"))
    p.add_argument("--stage", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--stage" in argv:
        return _stage_main(argv)
    a = _parse(argv)
    torch.set_num_threads(a.threads)  # as in the stages, so machine_name reports their threads
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    root = str(Path(__file__).resolve().parents[1])  # so `-m benchmarks.scale_bench` resolves from any cwd
    env = dict(os.environ, VQ4DIT_CACHE="off", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    machine = machine_name("cpu") if a.device == "cpu" else None
    for stage in a.stages:
        load_before = load_avg()
        print(f"[{stage}]", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_bench", *argv, "--stage", stage],
                              env=env, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode != 0 or not lines:
            rows.append(dict(stage=stage, what="FAILED", value=proc.returncode, unit="exit code"))
        else:
            rows += json.loads(lines[-1][5:])
        for row in rows:
            row.setdefault("load_avg", round(max(load_before, load_avg()), 2))
        write_csv([dict(row, blocks=a.blocks, device=a.device, machine=machine or gpu_name()) for row in rows],
                  a.out, COLUMNS)
    est = flop_estimate()
    print(f"\nXL/2 W2 calibration, reference budget (NOT MEASURED, arithmetic): {est['per_step'] / 1e12:.1f} TFLOP "
          f"per step, {est['total'] / 1e15:.0f} PFLOP for 50,000 steps", file=sys.stderr)
    print("\n| stage | what | value | unit |\n|---|---|---|---|", file=sys.stderr)
    for row in rows:
        v = row["value"]
        print(f"| {row['stage']} | {row['what']} | {v:.4g} | {row['unit']} |" if isinstance(v, float)
              else f"| {row['stage']} | {row['what']} | {v} | {row['unit']} |", file=sys.stderr)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0 if all(r["what"] != "FAILED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
