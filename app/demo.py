"""Demo runs shipped with the app: finished runs every tab can show on first open.

    python -m app.demo build            # ~45 min on 2 busy cores: calibrate, evaluate, pack into assets/demo_runs/
    python -m app.demo check            # load every demo run with the current code (what the test does)

`build` runs each DEMO_RUNS entry through the same worker as the app's Run button (the library's
`run_method`, the app's evaluation), into a scratch runs dir, then writes a compact copy of each
run (see `vq4dit.trace.Trace.compact` and `vq4dit.io.save_quantized(fp_base=...)`)
into assets/demo_runs/<id>/. The app lists them read-only next to the runs dir (RunStore's
`demo_root`): labelled "demo", never deleted or overwritten.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import os
import shutil
from typing import Optional

from vq4dit.config import DEFAULT_METHOD, METHODS, SETTINGS, method_config, method_names, setting_kd
from vq4dit.io import PACKED_CONFIG, load_dit, save_quantized
from vq4dit.sampling import sample

from .config import ROOT, RUN_ID_RE, AppConfig, RunRequest
from .engine import Engine
from .store import DEMO_DIR, DEMO_PREFIX, DEMO_SAMPLES, RUN_FILE, RunStore, _atomic_json, _clean

# The demo runs show the default method with the paper's plain k-means init (its registry name,
# e.g. vq4dit-ste for vq4dit-ste-aa) against codebook-only at the same init: the assignment
# mechanism alone, not the init.
DEMO_METHOD = method_config(DEFAULT_METHOD, activation_aware=False).method

# (method, setting): our demo method (DEMO_METHOD) and the paper's baseline (the registry's calibrated method
# with fixed k-means assignments) at the README benchmark's three settings, plus the paper's method
# (the registry's first calibrated method) at W2. Names come from the registry, not from here.
_FIXED = next(n for n in method_names(calibrated=True) if not METHODS[n].trains_assignments)
_PAPER = method_names(calibrated=True)[0]
DEMO_RUNS = [(m, s) for s in ("W2", "W3", "XL-sharing") for m in (DEMO_METHOD, _FIXED)] + [(_PAPER, "W2")]
DEMO_TRACE_SAMPLES = 256   # sampled sub-vectors kept per layer (a run records 512)
DEMO_TRACE_RECORDS = 34    # logged steps kept per layer (a 100-step run logs every step)
DEMO_ITERATIONS = 4        # half the small recipe's 8 trajectories (100 optimizer steps): ~6 min per run on 2 busy cores


def demo_id(method: str, setting: str) -> str:
    return f"{DEMO_PREFIX}{method}-{setting}"


# Opened first (no finished run of one's own yet): the setting where reassignment shows most clearly in
# the demo pairs (XL-sharing: image MSE about half codebook-only's; at W2 the pair shows no image-space effect).
FIRST_DEMO = demo_id(DEMO_METHOD, "XL-sharing")


def demo_request(method: str, setting: str, iterations: Optional[int] = None) -> RunRequest:
    """A demo run's request. Through `build_config` with the model's recipe it is the config of
    `python -m vq4dit quantize --recipe small --method M --bits B --k K --d D --iterations 4 --seed 0`."""
    k, d = setting_kd(setting)
    return RunRequest(method=method, bits=SETTINGS[setting]["bits"], k=k, d=d, seed=0,
                      calib=dict(iterations=iterations or DEMO_ITERATIONS))


def build(out: Path = DEMO_DIR, work: Path | None = None, only: list[str] | None = None,
          iterations: int | None = None, log=print) -> list[str]:
    """Calibrate every demo run (reusing finished ones found in `work`) and write compact copies to `out`."""
    work = Path(work or tempfile.mkdtemp(prefix="vq4dit-demo-"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    engine = Engine(AppConfig(runs_dir=str(work / "raw"), warm_umap=False, demo_runs=False,
                              iterations=iterations or DEMO_ITERATIONS))
    index = work / "raw-index.json"
    done = json.loads(index.read_text()) if index.is_file() else {}
    built = []
    for method, setting in DEMO_RUNS:
        rid = demo_id(method, setting)
        if only and rid not in only:
            continue
        if rid not in done or not (work / "raw" / done[rid]).is_dir():
            s = demo_request(method, setting, iterations)
            t0 = time.time()
            c = engine.run_config(s).calib
            log(f"[{time.strftime('%H:%M:%S')}] {rid}: calibrating ({c.iterations} x {c.num_sampling_steps} "
                f"steps, recipe {c.recipe})")
            a = engine.start_run(s)
            while not a.done.wait(30):
                log(f"  {a.phase} {a.layers_done}/{a.layers_total} layers, {len(a.rows)}/{a.total_steps} steps, "
                    f"{time.time() - t0:.0f} s")
            if a.error is not None or a.run_id is None:
                raise RuntimeError(f"{rid} failed: {a.error}")
            done[rid] = a.run_id
            index.write_text(json.dumps(done, indent=1))
            log(f"  saved {a.run_id} in {time.time() - t0:.0f} s")
        dst = compact_run(engine.store, done[rid], Path(out), rid, engine.teacher, DEMO_TRACE_SAMPLES,
                          DEMO_TRACE_RECORDS)
        # the Images tab's default request (every class, seed 0, guidance 4, the app's default steps), so the
        # tab shows images on first open without sampling
        labels = list(range(min(10, engine.n_classes)))
        model = load_dit(dst / "model", fp_base=engine.teacher).transformer
        write_demo_samples(engine, dst, model, labels, 0, 4.0, AppConfig().image_steps)
        log(f"  {rid}: {sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 2**20:.2f} MiB in {dst}")
        built.append(rid)
    return built


def check(root: Path = DEMO_DIR, log=print) -> list[str]:
    """Load every demo run's run.json, trace and packed model with the current code."""
    from vq4dit.io import load_dit
    from vq4dit.testbed import DIGITS_DIT_DIR
    base = load_dit(DIGITS_DIT_DIR).transformer
    store = RunStore(tempfile.mkdtemp(prefix="vq4dit-empty-runs-"), demo_root=root, fp_base=base)
    ids = [r.id for r in store.list() if store.is_demo(r.id)]
    for rid in ids:
        r = next(x for x in store.list() if x.id == rid)
        if r.error:
            raise ValueError(f"demo run {rid}: {r.error}")
        store.trace(rid)
        store.model(rid)
        log(f"ok {rid}")
    return ids


def compact_run(store: RunStore, run_id: str, out_root: Path, new_id: str, fp_base, n_samples: int,
                max_records: Optional[int] = None) -> Path:
    """A compact, self-contained copy of a saved run at out_root/new_id (replacing an older copy):
    the trace via `Trace.compact(n_samples, max_records)`, the packed model without the FP parts it shares with
    `fp_base`, run.json with the new id. Written to a temp dir and renamed into place."""
    if not RUN_ID_RE.fullmatch(new_id) or not new_id.startswith(DEMO_PREFIX):
        raise ValueError(f"demo run ids start with {DEMO_PREFIX!r}, got {new_id!r}")
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    src = store.run_dir(run_id)
    meta = dict(store.meta(run_id), id=new_id, demo=True, built_from=run_id)
    src_model = Path(str(meta.get("model_source") or "")).resolve()
    if ROOT in src_model.parents:   # no absolute paths of the build machine in shipped files
        meta["model_source"] = str(src_model.relative_to(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix=f".{new_id}-tmp{os.getpid()}-", dir=out_root))
    try:
        tr = store.trace(run_id)
        if tr is not None:
            tr.compact(n_samples, max_records).save(tmp / "trace")
        packed = json.loads((src / "model" / PACKED_CONFIG).read_text())
        b = load_dit(src / "model")   # restores the run's full method config (calib included)
        save_quantized(b.transformer, tmp / "model", scheduler=b.scheduler, fp_base=fp_base,
                       extra=dict(packed.get("extra") or {}, run=new_id))
        written = json.loads((tmp / "model" / PACKED_CONFIG).read_text())
        if written.get("config") != packed.get("config"):
            raise ValueError(f"{run_id}: the compact copy's method config differs from the run's")
        _atomic_json(tmp / RUN_FILE, _clean(meta))
        dst = out_root / new_id
        if dst.exists():
            old = out_root / f".{new_id}.old{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_demo_samples(engine: Engine, run_dir: Path, model, labels: list, seed: int, guidance: float, steps: int):
    """Sample the run's and FP's images at the Images tab's defaults into run_dir/DEMO_SAMPLES (atomic)."""
    from safetensors.torch import save_file
    with engine.model_lock:
        kw = dict(num_steps=int(steps), guidance_scale=float(guidance), seed=int(seed), scheduler=engine.bundle.scheduler,
                  vae=engine.bundle.vae)
        run = sample(model, list(labels), **kw)
        fp = sample(engine.teacher, list(labels), **kw)
    meta = dict(labels=",".join(map(str, labels)), seed=str(seed), guidance=str(float(guidance)), steps=str(steps))
    tmp = Path(run_dir) / f".{DEMO_SAMPLES}.tmp{os.getpid()}"
    try:
        save_file({"run": run.half().contiguous(), "fp": fp.half().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, Path(run_dir) / DEMO_SAMPLES)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="calibrate the demo runs and write them to assets/demo_runs/")
    b.add_argument("--out", default=str(DEMO_DIR))
    b.add_argument("--work", default=None, help="scratch runs dir (finished runs in it are reused)")
    b.add_argument("--only", nargs="*", default=None, help="demo run ids to (re)build")
    b.add_argument("--iterations", type=int, default=None, help=f"calibration trajectories (default: {DEMO_ITERATIONS})")
    sub.add_parser("check", help="load every demo run")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.cmd == "build":
        out = Path(args.out)
        built = build(out, Path(args.work) if args.work else None, args.only, args.iterations,
                      log=lambda s: print(s, flush=True))
        print(f"built {len(built)} demo runs in {out}")
        return 0
    print(f"{len(check())} demo runs load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
