"""Runtime memory and latency of a packed model: compact (indices at packed width, each layer's
weight decoded per forward) vs cached (decoded weights kept) vs the FP transformer, on the
XL-shaped W2 test bed (`vq4dit.testbed.xl`, N blocks of DiT-XL/2 width).

    python -m benchmarks.runtime_memory --blocks 3 --out benchmarks/results/speed/runtime_memory_cpu.csv
    python -m benchmarks.runtime_memory --blocks 1 --steps 1 --repeats 1 --out /tmp/rt.csv   # smoke
    python -m benchmarks.runtime_memory --device cuda --blocks 28 --out $OUT/runtime_memory_gpu.csv

Each mode runs in its own process. Per mode: RSS after imports (the process baseline), RSS at rest
after loading the transformer, peak RSS while sampling one image (latents, CFG 4, `--steps` DDIM
steps; the peak is reset after loading through /proc/self/clear_refs), and the best-of-`--repeats`
sampling time (after a 1-step warm-up, which also fills the cache of the cached mode). The VAE is
not loaded: the issue's target is the transformer's memory "beyond the VAE".
Rows: mode, what, value, unit. Timings on a shared machine are upper bounds; modes run one after the
other, so compare them with the load average of each row.
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

MODES = ("fp", "compact", "cached")
COLUMNS = ["mode", "what", "value", "unit", "blocks", "steps", "device", "machine", "load_avg"]


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets VmHWM (the peak resident set) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_mode(a) -> list[dict]:
    from diffusers import DiTTransformer2DModel  # noqa: F401  (in the baseline: every mode imports it)

    from vq4dit.io import load_dit
    from vq4dit.sampling import sample
    rows = []

    def add(what, value, unit):
        rows.append(dict(mode=a.mode, what=what, value=value, unit=unit))
        print(f"  {a.mode:8s} {what:44s} {value:12.4g} {unit}", file=sys.stderr, flush=True)

    cuda = torch.device(a.device).type == "cuda"
    add("RSS after imports (baseline)", _status_gib("VmRSS"), "GiB")
    t = time.time()
    src = a.work / "xl" / "transformer" if a.mode == "fp" else a.work / "xl-w2"
    bundle = load_dit(src, device=a.device, cache=a.mode == "cached")
    _sync(a.device)
    add("load", time.time() - t, "s")
    add("RSS at rest after load", _status_gib("VmRSS"), "GiB")
    model, labels = bundle.transformer, [207]
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        add("GPU memory at rest after load", torch.cuda.memory_allocated() / 2 ** 30, "GiB")
    sample(model, labels, num_steps=1, scheduler=bundle.scheduler, seed=0, device=a.device)  # warm-up
    best, latents = float("inf"), None
    for _ in range(a.repeats):
        _sync(a.device)
        t = time.time()
        latents = sample(model, labels, num_steps=a.steps, scheduler=bundle.scheduler, seed=0, device=a.device)
        _sync(a.device)
        best = min(best, time.time() - t)
    add(f"sampling 1 image x {a.steps} steps (best of {a.repeats})", best, "s")
    add("sampling time per step", best / a.steps, "s")
    add("RSS at rest after sampling", _status_gib("VmRSS"), "GiB")
    if reset:
        add("peak RSS while sampling", _status_gib("VmHWM"), "GiB")
    add("peak RSS of the process", _status_gib("VmHWM") if not reset else float("nan"), "GiB")
    if cuda:
        add("peak GPU memory while sampling", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB")
    add("latents finite", float(torch.isfinite(latents).all()), "bool")
    torch.save(latents.cpu(), a.work / f"latents-{a.mode}.pt")  # the parent checks compact == cached
    return rows


def setup(a):
    """The XL-shaped pipeline and its W2 packed transformer (k-means only: memory and speed do not
    depend on how good the codebooks are, so a few Lloyd iterations do)."""
    from vq4dit import method_config, quantize
    from vq4dit.io import dir_bytes, load_dit, save_quantized
    from vq4dit.testbed.xl import write_xl_pipeline
    write_xl_pipeline(a.work / "xl", num_layers=a.blocks, overwrite=True)
    bundle = load_dit(a.work / "xl", device=a.device)  # k-means where the check runs (fast on a GPU)
    quantize(bundle.transformer, method_config("kmeans", bits=2, kmeans_iters=a.kmeans_iters), progress=False)
    out = save_quantized(bundle.transformer, a.work / "xl-w2", scheduler=bundle.scheduler, overwrite=True)
    meta = json.loads((out / "vq4dit_config.json").read_text())
    fp_bytes = sum(f.stat().st_size for f in (a.work / "xl" / "transformer").glob("*.safetensors"))
    return [dict(mode="files", what="FP transformer safetensors", value=fp_bytes / 2 ** 20, unit="MiB"),
            dict(mode="files", what="packed dir (transformer)", value=dir_bytes(out) / 2 ** 20, unit="MiB"),
            dict(mode="files", what="packed indices", value=meta["size"]["index_bytes"] / 2 ** 20, unit="MiB")]


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.runtime_memory", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--blocks", type=int, default=3, help="blocks of the XL-shaped model (28 = DiT-XL/2)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the timed sample")
    p.add_argument("--repeats", type=int, default=2, help="sampling timings: best of this many")
    p.add_argument("--kmeans-iters", type=int, default=2, help="Lloyd iterations of the packed model's k-means")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--work", type=Path, default=Path("out/runtime-memory"), help="where the models are written")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks/runtime_memory.csv"))
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--skip-setup", action="store_true", help="reuse the models already in --work")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    if a.mode:  # child process: one mode
        print("ROWS " + json.dumps(run_mode(a)), flush=True)
        return 0
    from benchmarks.bench import machine_name, write_csv
    a.work.mkdir(parents=True, exist_ok=True)
    machine = machine_name(a.device)
    rows = []

    def stamp(new, load_before):
        for row in new:
            row.update(load_avg=round(max(load_before, os.getloadavg()[0]), 2), blocks=a.blocks, steps=a.steps,
                       device=a.device, machine=machine)
        rows.extend(new)
        write_csv(rows, a.out, COLUMNS)

    if not a.skip_setup:
        load = os.getloadavg()[0]
        stamp(setup(a), load)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for mode in a.modes:
        load = os.getloadavg()[0]
        print(f"[{mode}]", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime_memory", *argv, "--mode", mode],
                              env=env, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        stamp(json.loads(lines[-1][5:]) if proc.returncode == 0 and lines else
              [dict(mode=mode, what="FAILED", value=proc.returncode, unit="exit code")], load)
    lat = {m: a.work / f"latents-{m}.pt" for m in ("compact", "cached")}
    if all(p.is_file() for p in lat.values()):
        same = torch.equal(torch.load(lat["compact"]), torch.load(lat["cached"]))
        stamp([dict(mode="compare", what="compact latents == cached latents", value=float(same), unit="bool")],
              os.getloadavg()[0])
    get = {(r["mode"], r["what"]): r["value"] for r in rows}
    t = {m: get.get((m, "sampling time per step")) for m in MODES}
    peak = {m: get.get((m, "peak RSS while sampling")) for m in MODES}
    base = {m: get.get((m, "RSS after imports (baseline)")) for m in MODES}
    derived = []
    if t["compact"] and t["cached"]:
        derived.append(dict(mode="compare", what="compact / cached sampling time", value=t["compact"] / t["cached"],
                            unit="x"))
    if t["compact"] and t["fp"]:
        derived.append(dict(mode="compare", what="compact / FP sampling time", value=t["compact"] / t["fp"], unit="x"))
    for m in MODES:
        if peak[m] and base[m]:
            derived.append(dict(mode=m, what="peak RSS while sampling - baseline", value=peak[m] - base[m], unit="GiB"))
    stamp(derived, os.getloadavg()[0])
    print("\n| mode | what | value | unit | load |\n|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        v = r["value"]
        print(f"| {r['mode']} | {r['what']} | {v:.4g} | {r['unit']} | {r['load_avg']} |", file=sys.stderr)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0 if all(r["what"] != "FAILED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
