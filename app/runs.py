"""Run management for the explorer: the runs directory, the calibration worker, and caches.

A saved run is one directory under the runs dir, written atomically (temp dir, then rename):
    runs/<id>/run.json         settings, size, block MSE, image metrics (what the Runs table shows)
    runs/<id>/trace/           vq4dit.trace.Trace.save (absent for rtn / kmeans: no calibration)
    runs/<id>/model/           vq4dit.io.save_quantized (packed model, reloadable with load_dit)
Everything here is a thin layer over the library: quantizing, calibrating, sampling and metrics
all come from `vq4dit`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from vq4dit.config import DEFAULT_METHOD, CalibConfig, METHODS, method_config
from vq4dit.config import RECIPES, SMALL_MODEL_KMEANS_ITERS
from vq4dit.runner import EvalSpec, generate, run_method
from vq4dit.io import PACKED_CONFIG, load_dit, save_quantized
from vq4dit.sampling import pick_device, sample
from vq4dit.testbed import DIGITS_DIT_DIR
from vq4dit.trace import Trace

ROOT = Path(__file__).resolve().parent.parent
RUN_FILE = "run.json"
DEMO_DIR = ROOT / "assets" / "demo_runs"   # finished runs shipped with the app (python -m app.demo build)
DEMO_PREFIX = "demo-"                       # ids of demo runs; never used for runs the app saves
# The demo runs show the default method with the paper's plain k-means init (its registry name,
# e.g. vq4dit-ste for vq4dit-ste-aa) against codebook-only at the same init: the assignment
# mechanism alone, not the init.
DEMO_METHOD = method_config(DEFAULT_METHOD, activation_aware=False).method
DEMO_SAMPLES = "samples.safetensors"        # a demo run's images (and FP's) at the Images tab's defaults

# Documented limits of what the app accepts (README "Safety"); checked before any work is done.
APP_LIMITS = dict(iterations=10_000, sampling_steps=1000, total_steps=500_000, kmeans_iters=1000, k=65536,
                  d=64, n_candidates=16, seed=2 ** 32 - 1, image_labels=32, image_steps=1000, guidance=100.0)
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The only files an export may contain: what the app itself wrote (relative to the run dir).
EXPORT_FILES = {
    "model": ("model/vq4dit_config.json", "model/model.safetensors", "model/scheduler/scheduler_config.json"),
    "trace": ("trace/meta.json", "trace/steps.csv", "trace/layers.csv", "trace/ratios.csv", "trace/events.csv",
              RUN_FILE),
}


def _whole(v, name: str, lo: int, hi: int) -> int:
    """An integer setting in [lo, hi] (bools, NaN, inf and fractions refused)."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    if not lo <= int(f) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {int(f)}")
    return int(f)


def image_params(seed, guidance, steps) -> tuple[int, float, int]:
    """Validated (seed, guidance, steps) of an Images request, before anything is sampled."""
    seed = _whole(0 if seed is None or seed == "" else seed, "image seed", 0, APP_LIMITS["seed"])
    steps = _whole(1 if steps is None or steps == "" else steps, "sampler steps", 1, APP_LIMITS["image_steps"])
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number, got {guidance!r}") from None
    if not (math.isfinite(g) and 0 <= g <= APP_LIMITS["guidance"]):
        raise ValueError(f"guidance scale must be in [0, {APP_LIMITS['guidance']:g}], got {guidance!r}")
    return seed, g, steps


def _num_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def run_meta_error(meta) -> Optional[str]:
    """Why a run.json cannot be shown (None when it is fine): every field the views read is checked."""
    if not isinstance(meta, dict):
        return "run.json is not an object"
    if not isinstance(meta.get("method"), str) or meta["method"] not in METHODS:
        return f"unknown method {str(meta.get('method'))[:40]!r}"
    b = meta.get("bits")
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
        return f"bits is not an integer in [1, 16] ({str(b)[:20]!r})"
    for key in ("k", "d", "n_blocks", "steps_done", "total_steps", "n_candidates"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"{key} is not a non-negative integer"
    for key in ("bits_per_weight", "block_mse", "seconds"):
        if not _num_or_none(meta.get(key)):
            return f"{key} is not a number"
    for key in ("metrics", "fp_metrics"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, dict) or not all(_num_or_none(x) for x in v.values())):
            return f"{key} is not an object of numbers"
    pb = meta.get("per_block_mse")
    if pb is not None and (not isinstance(pb, list) or not all(_num_or_none(x) for x in pb)):
        return "per_block_mse is not a list of numbers"
    for key in ("status", "stopped"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"{key} is not a string"
    return None


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


@dataclass
class AppConfig:
    """What `python app.py` flags set. None = the library's default for the loaded model."""
    model: str = str(DIGITS_DIT_DIR)
    runs_dir: str = str(ROOT / "runs")
    device: Optional[str] = None
    iterations: Optional[int] = None      # calibration trajectories (default: SMALL_MODEL_RECIPE)
    sampling_steps: Optional[int] = None  # teacher steps per trajectory (default: SMALL_MODEL_RECIPE)
    kmeans_iters: Optional[int] = None    # default: SMALL_MODEL_KMEANS_ITERS (embedded model)
    eval_per_class: int = 5               # images per class for a run's accuracy / FD-digits / PSNR
    eval_steps: int = 25                  # sampler steps for those images
    image_steps: int = 25                 # default sampler steps in the Images view
    warm_umap: bool = True                # compile umap's numba code in the background at start
    demo_runs: bool = True                # list the shipped demo runs (embedded model only; read-only)
    cache_weights: bool = False           # packed runs keep decoded weights (faster, more memory; io.load_quantized)


@dataclass
class RunSettings:
    """One run as the Set-up panel describes it."""
    method: str = DEFAULT_METHOD
    bits: int = 2
    k: Optional[int] = None
    d: Optional[int] = None
    n_candidates: int = 2
    kmeans_iters: int = SMALL_MODEL_KMEANS_ITERS
    seed: int = 0
    calib: dict = field(default_factory=dict)  # CalibConfig overrides

    def config(self):
        """The library's validated config (ValueError with a clear message when invalid).
        App limits (APP_LIMITS) are checked first, before anything is allocated."""
        self.check_limits()
        spec = METHODS[self.method] if self.method in METHODS else None
        if spec is not None and spec.kind == "rtn":
            return method_config(self.method, bits=self.bits)
        return method_config(self.method, bits=self.bits, calib=self.calib if spec and spec.calibrated else None,
                             **self.vq_kwargs())

    def check_limits(self):
        L = APP_LIMITS
        for name, v, lo, hi in (("k", self.k, 2, L["k"]), ("d", self.d, 1, L["d"]),
                                ("candidates n", self.n_candidates, 1, L["n_candidates"]),
                                ("k-means iterations", self.kmeans_iters, 1, L["kmeans_iters"]),
                                ("seed", self.seed, 0, L["seed"]), ("bits", self.bits, 1, 8)):
            if v is not None:
                _whole(v, name, lo, hi)
        c = self.calib or {}
        it = _whole(c.get("iterations", 1), "iterations", 1, L["iterations"])
        st = _whole(c.get("num_sampling_steps", 1), "sampling steps", 1, L["sampling_steps"])
        if "labels_per_iteration" in c:
            _whole(c["labels_per_iteration"], "labels per iteration", 1, 256)
        if _calibrated(self.method) and it * st > L["total_steps"]:
            raise ValueError(f"iterations x sampling steps = {it * st} optimizer steps is over the app's limit of "
                             f"{L['total_steps']}: use the library or the CLI for longer runs")
        for key in ("lr_logits", "lr_codebook", "lambda_r", "guidance_scale"):
            if key in c:
                try:
                    f = float(c[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{key} must be a number, got {c[key]!r}") from None
                if not math.isfinite(f):
                    raise ValueError(f"{key} must be a finite number, got {c[key]!r}")

    def vq_kwargs(self) -> dict:
        kw = dict(k=self.k, d=self.d, n_candidates=self.n_candidates, kmeans_iters=self.kmeans_iters,
                  seed=self.seed)
        return {k: v for k, v in kw.items() if v is not None}


def default_calib(cfg: AppConfig, embedded: bool) -> dict:
    """CalibConfig defaults, the small-model recipe for the embedded model (read at runtime),
    then the command-line overrides."""
    base = {k: v for k, v in asdict(CalibConfig()).items()
            if k in ("iterations", "num_sampling_steps", "lr_logits", "lr_codebook", "lambda_r",
                     "guidance_scale", "labels_per_iteration")}
    if embedded:
        base.update(RECIPES["small"])
    if cfg.iterations is not None:
        base["iterations"] = cfg.iterations
    if cfg.sampling_steps is not None:
        base["num_sampling_steps"] = cfg.sampling_steps
    return base


# ----------------------------------------------------------------------------------------
# The runs directory
# ----------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    id: str
    path: Path
    meta: Optional[dict] = None
    error: Optional[str] = None  # set when the run cannot be read


def _atomic_json(path: Path, obj):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(v):
    """JSON floats: NaN -> None so the file stays standard JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class RunStore:
    """Saved runs on disk plus in-memory caches of their traces and packed models.

    `demo_root` (optional): a second, read-only directory of finished runs shipped with the app,
    whose ids start with DEMO_PREFIX. They are listed before (as older than) the runs dir's, resolve
    only inside `demo_root`, and are never written. Their packed models share the FP weights of
    `fp_base` (the embedded model), see `vq4dit.io.save_quantized(fp_base=...)`."""

    def __init__(self, root, device=None, demo_root=None, fp_base=None, cache_weights: bool = False):
        self.root = Path(root)
        self.cache_weights = cache_weights
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.demo_root = Path(demo_root) if demo_root is not None else None
        self.fp_base = fp_base
        self.bad: dict[str, str] = {}          # runs found corrupt when loading
        self._traces: OrderedDict = OrderedDict()
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # -- ids ------------------------------------------------------------------------------
    def is_demo(self, run_id) -> bool:
        """A shipped demo run (read-only): its id has the demo prefix and a demo dir is attached."""
        return self.demo_root is not None and isinstance(run_id, str) and run_id.startswith(DEMO_PREFIX)

    def run_dir(self, run_id) -> Path:
        """The directory of a run: `run_id` must be a plain name that resolves strictly inside the runs
        dir (demo ids: inside the demo dir). The error never says whether anything exists elsewhere on disk."""
        if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
            raise ValueError(f"invalid run id {str(run_id)[:80]!r}: pick a run from the Runs table")
        base = self.demo_root if self.is_demo(run_id) else self.root
        root = base.resolve()
        p = (base / run_id).resolve()
        if p.parent != root:
            raise ValueError(f"invalid run id {run_id!r}: pick a run from the Runs table")
        return base / run_id

    # -- listing --------------------------------------------------------------------------
    def list(self) -> list[RunInfo]:
        """Demo runs (if any), then the runs dir's, each sorted by id (= oldest first)."""
        out = []
        dirs = []
        if self.demo_root is not None and self.demo_root.is_dir():
            dirs += sorted((p for p in self.demo_root.iterdir() if p.name.startswith(DEMO_PREFIX)), key=lambda q: q.name)
        if self.root.is_dir():
            dirs += sorted((p for p in self.root.iterdir() if not self.is_demo(p.name)), key=lambda q: q.name)
        for p in dirs:
            if not p.is_dir() or p.name.startswith("."):
                continue
            info = RunInfo(p.name, p)
            try:
                self.run_dir(p.name)
                info.meta = json.loads((p / RUN_FILE).read_text())
                err = run_meta_error(info.meta)
                if err:
                    raise ValueError(err)
            except FileNotFoundError:
                info.meta, info.error = None, f"no {RUN_FILE}"
            except ValueError as e:
                info.meta, info.error = None, f"{RUN_FILE} invalid: {e}"[:120]
            except OSError as e:
                info.meta, info.error = None, f"{RUN_FILE} unreadable ({type(e).__name__})"
            if info.error is None and p.name in self.bad:
                info.error = self.bad[p.name]
            out.append(info)
        return out

    def readable_ids(self) -> list[str]:
        return [r.id for r in self.list() if r.error is None]

    def meta(self, run_id: str) -> dict:
        p = self.run_dir(run_id) / RUN_FILE
        try:
            meta = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"run {run_id!r} not found in the runs dir") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"run {run_id!r} is unreadable: {RUN_FILE} is not valid JSON ({type(e).__name__})") from None
        err = run_meta_error(meta)
        if err:
            raise ValueError(f"run {run_id!r} is unreadable: {err}")
        return meta

    def table(self) -> pd.DataFrame:
        rows = []
        for r in reversed(self.list()):  # newest first (ids start with a timestamp)
            m = r.meta or {}
            met = m.get("metrics") or {}
            rows.append({
                "run": r.id,
                "method": m.get("method", "?"),
                "bits": m.get("bits"),
                "k x d": f"{m.get('k')}x{m.get('d')}" if m.get("k") else "-",
                "bits/weight": _round(m.get("bits_per_weight"), 3),
                "block MSE": _round(m.get("block_mse"), 5),
                "image MSE vs FP": _round(met.get("image_mse"), 5),
                "FD-digits": _round(met.get("fd_digits"), 2),  # None below MIN_FD_IMAGES images
                "accuracy": _round(met.get("accuracy"), 3),
                "PSNR vs FP (dB)": _round(met.get("psnr"), 2),
                "steps": f"{m.get('steps_done', '-')}/{m.get('total_steps', '-')}" if m.get("total_steps") else "-",
                "status": r.error and f"unreadable: {r.error}" or m.get("status", "?"),
            })
        cols = ["run", "method", "bits", "k x d", "bits/weight", "block MSE", "image MSE vs FP", "FD-digits",
                "accuracy", "PSNR vs FP (dB)", "steps", "status"]
        return pd.DataFrame(rows, columns=cols)

    def latest(self, method: str, bits: int, exclude: Optional[str] = None) -> Optional[str]:
        """Newest readable run of `method` at `bits`."""
        for r in reversed(self.list()):
            if r.error is None and r.id != exclude and r.meta["method"] == method and int(r.meta["bits"]) == int(bits):
                return r.id
        return None

    def baselines(self, bits: int, exclude: Optional[str] = None, limit: int = 4) -> list[str]:
        """Newest run of every other method at the same bits."""
        seen, out = set(), []
        ex_method = None
        if exclude:
            try:
                ex_method = self.meta(exclude)["method"]
            except ValueError:
                pass
        for r in reversed(self.list()):
            if r.error or r.id == exclude or int(r.meta["bits"]) != int(bits):
                continue
            m = r.meta["method"]
            if m in seen or m == ex_method:
                continue
            seen.add(m)
            out.append(r.id)
        return out[:limit]

    # -- loading --------------------------------------------------------------------------
    def trace(self, run_id: str) -> Optional[Trace]:
        """The run's calibration trace (cached); None for methods without calibration."""
        with self._lock:
            if run_id in self._traces:
                self._traces.move_to_end(run_id)
                return self._traces[run_id]
        meta = self.meta(run_id)
        tdir = self.run_dir(run_id) / "trace"
        if not tdir.exists():
            if _calibrated(meta["method"]):
                self.bad[run_id] = "trace missing"
                raise ValueError(f"run {run_id!r} is unreadable: its trace/ directory is missing")
            tr = None
        else:
            try:
                tr = Trace.load(tdir)
                _ = tr.steps, tr.layers  # parse now so a corrupt CSV fails here, not in a plot
                if "layers" not in tr.meta:
                    raise ValueError(f"trace at {tdir} has no layer list in meta.json")
            except (ValueError, FileNotFoundError, KeyError) as e:
                self.bad[run_id] = "corrupt trace"
                raise ValueError(f"run {run_id!r} is unreadable: {e}") from e
        with self._lock:
            self._traces[run_id] = tr
            while len(self._traces) > 8:
                self._traces.popitem(last=False)
        return tr

    def model(self, run_id: str):
        """The packed model as a DiTBundle (cached, a few at a time)."""
        with self._lock:
            if run_id in self._models:
                self._models.move_to_end(run_id)
                return self._models[run_id]
        mdir = self.run_dir(run_id) / "model"
        self.meta(run_id)
        try:
            b = load_dit(mdir, device=self.device, fp_base=self.fp_base, cache=self.cache_weights)
        except (FileNotFoundError, ValueError) as e:
            self.bad[run_id] = "corrupt model"
            raise ValueError(f"run {run_id!r}: packed model unreadable: {e}") from e
        with self._lock:
            self._models[run_id] = b
            while len(self._models) > 6:
                self._models.popitem(last=False)
        return b

    # -- saving ---------------------------------------------------------------------------
    def new_id(self, method: str, bits: int) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-w{bits}"
        rid, i = base, 1
        while (self.root / rid).exists():
            i += 1
            rid = f"{base}-{i}"
        return rid

    def save(self, run_id: str, result, meta: dict, scheduler=None) -> Path:
        """Trace + packed model + run.json, built in a temp dir and renamed into place."""
        if self.is_demo(run_id) or str(run_id).startswith(DEMO_PREFIX):
            raise ValueError(f"{run_id!r}: ids starting with {DEMO_PREFIX!r} are reserved for the read-only demo runs")
        out = self.run_dir(run_id)
        self.root.mkdir(parents=True, exist_ok=True)  # the runs dir may have been deleted meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=self.root))
        try:
            if result.trace is not None:
                result.trace.save(tmp / "trace")
            save_quantized(result.model, tmp / "model", scheduler=scheduler,
                           extra=dict(run=run_id, block_mse=result.block_mse))
            _atomic_json(tmp / RUN_FILE, _clean(meta))
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    # -- downloads ------------------------------------------------------------------------
    def export_dir(self) -> Path:
        d = Path(tempfile.gettempdir()) / "vq4dit-app-exports"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def export_zip(self, run_id: str, what: str) -> Optional[str]:
        """Zip of the run's trace CSVs (what='trace') or its packed model (what='model').
        Only the files the app itself writes (EXPORT_FILES) are included; links are skipped."""
        if what not in EXPORT_FILES:
            raise ValueError(f"unknown export {what!r}")
        run = self.run_dir(run_id)
        self.meta(run_id)
        src = run / what
        if not src.is_dir() or src.is_symlink():
            return None
        out = self.export_dir() / f"{run_id}-{what}.zip"
        if out.is_file():
            return str(out)
        root = run.resolve()
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for rel in EXPORT_FILES[what]:
                    f = run / rel
                    if f.is_symlink() or not f.is_file() or root not in f.resolve().parents:
                        continue
                    z.write(f, f"{run_id}/{rel}")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(out)


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{new_id}-", dir=out_root))
    try:
        tr = store.trace(run_id)
        if tr is not None:
            tr.compact(n_samples, max_records).save(tmp / "trace")
        packed = json.loads((src / "model" / PACKED_CONFIG).read_text())

        def keep_config(d: Path):  # the run's full method config (a reloaded model keeps only the VQ part)
            m = json.loads((d / PACKED_CONFIG).read_text())
            m["config"], m["extra"] = packed.get("config"), dict(packed.get("extra") or {}, run=new_id)
            (d / PACKED_CONFIG).write_text(json.dumps(m, indent=1, default=str))

        b = load_dit(src / "model")
        save_quantized(b.transformer, tmp / "model", scheduler=b.scheduler, fp_base=fp_base, write_extra=keep_config)
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


def write_demo_samples(engine: "Engine", run_dir: Path, model, labels: list, seed: int, guidance: float, steps: int):
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


def _calibrated(method: str) -> bool:
    """Does a run of `method` record a Trace? ('m+switch=..' derived names map to m.)"""
    spec = METHODS.get(str(method).split("+", 1)[0])
    return spec is not None and spec.calibrated


def _round(v, n):
    try:
        return None if v is None or not math.isfinite(float(v)) else round(float(v), n)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# The calibration worker (one at a time) and image generation
# ----------------------------------------------------------------------------------------


class RunCancelled(Exception):
    """Cancel pressed before there was a model worth saving (during k-means)."""


@dataclass
class ActiveRun:
    settings: RunSettings
    total_steps: int
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    rows: list = field(default_factory=list)    # on_step rows (no Trace object)
    phase: str = "k-means init"
    run_id: Optional[str] = None
    error: Optional[BaseException] = None
    t0: float = field(default_factory=time.time)
    layers_done: int = 0                        # k-means / RTN progress over the target layers
    layers_total: int = 0
    quantize_seconds: Optional[float] = None    # time of the per-layer quantization (k-means) stage
    cancelled_in: Optional[str] = None          # phase in which Cancel took effect (None: not cancelled)

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows))


class Engine:
    """Holds the FP teacher (loaded once), the runs store, the worker and image caches."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.bundle = load_dit(cfg.model, device=self.device)
        self.teacher = self.bundle.transformer
        tc = self.teacher.config
        if tc.num_embeds_ada_norm is None:
            raise ValueError(f"{cfg.model} is not a class-conditional DiT (num_embeds_ada_norm is None)")
        self.n_classes = int(tc.num_embeds_ada_norm)
        self.n_blocks = len(self.teacher.transformer_blocks)
        self.embedded = Path(cfg.model).resolve() == Path(DIGITS_DIT_DIR).resolve()
        self.is_digits = (tc.in_channels == 1 and tc.sample_size == 16 and self.n_classes == 10
                          and self.bundle.vae is None)
        demo = DEMO_DIR if cfg.demo_runs and self.embedded else None  # demo runs were made from this model
        self.store = RunStore(cfg.runs_dir, device=self.device, demo_root=demo, fp_base=self.teacher,
                              cache_weights=cfg.cache_weights)
        self.calib_defaults = default_calib(cfg, self.embedded)
        self.kmeans_default = cfg.kmeans_iters or (SMALL_MODEL_KMEANS_ITERS if self.embedded else 100)
        self.model_lock = threading.Lock()   # every forward pass of a model goes through here
        self.active: Optional[ActiveRun] = None
        self._evaluator = None
        self._images: OrderedDict = OrderedDict()  # (model key, labels, seed, cfg, steps) -> images

    # -- metrics --------------------------------------------------------------------------
    @property
    def evaluator(self):
        if self._evaluator is None and self.is_digits:
            from vq4dit.testbed.classifier import DigitsEvaluator
            self._evaluator = DigitsEvaluator()
        return self._evaluator

    def eval_spec(self) -> EvalSpec:
        return EvalSpec(n_per_class=self.cfg.eval_per_class, num_classes=min(10, self.n_classes),
                        num_steps=self.cfg.eval_steps, guidance_scale=4.0, seed=0)

    def images(self, key: str, model, labels, seed: int, guidance: float, steps: int,
               scheduler=None, vae=None) -> torch.Tensor:
        """Samples for `labels`, cached by (model key, labels, seed, guidance, steps)."""
        ck = (key, tuple(int(x) for x in labels), int(seed), float(guidance), int(steps))
        if ck in self._images:
            self._images.move_to_end(ck)
            return self._images[ck]
        x = self.shipped_images(*ck)
        if x is not None:
            self._images[ck] = x
            return x
        with self.model_lock:
            x = sample(model, list(labels), num_steps=int(steps), guidance_scale=float(guidance), seed=int(seed),
                       scheduler=scheduler or self.bundle.scheduler, vae=vae if vae is not None else self.bundle.vae)
        self._images[ck] = x
        while len(self._images) > 48:
            self._images.popitem(last=False)
        return x

    def has_images(self, key: str, labels, seed, guidance, steps) -> bool:
        """Are these images cached or shipped with a demo run (no sampling needed)?"""
        ck = (key, tuple(int(x) for x in labels), int(seed), float(guidance), int(steps))
        return ck in self._images or self.shipped_images(*ck) is not None

    def shipped_images(self, key: str, labels: tuple, seed: int, guidance: float, steps: int) -> Optional[torch.Tensor]:
        """Images a demo run ships (DEMO_SAMPLES: its own and FP's, sampled by `python -m app.demo build`
        at the Images tab's defaults) when the request matches them exactly; key 'fp' = the FP model."""
        if self.store.demo_root is None or not self.store.demo_root.is_dir():
            return None
        rids = [key] if self.store.is_demo(key) else sorted(p.name for p in self.store.demo_root.iterdir()
                                                            if p.name.startswith(DEMO_PREFIX)) if key == "fp" else []
        want = dict(labels=",".join(map(str, labels)), seed=str(seed), guidance=str(float(guidance)), steps=str(steps))
        from safetensors import safe_open
        for rid in rids:
            try:
                f = self.store.run_dir(rid) / DEMO_SAMPLES
                if not f.is_file():
                    continue
                with safe_open(str(f), "pt") as st:
                    if {k: st.metadata().get(k) for k in want} != want:
                        continue
                    return st.get_tensor("fp" if key == "fp" else "run").float()
            except (ValueError, OSError):
                continue
        return None

    def fp_images(self, labels, seed, guidance, steps) -> torch.Tensor:
        return self.images("fp", self.teacher, labels, seed, guidance, steps)

    def run_images(self, run_id, labels, seed, guidance, steps) -> torch.Tensor:
        b = self.store.model(run_id)
        return self.images(run_id, b.transformer, labels, seed, guidance, steps, vae=self.bundle.vae)

    def image_metrics(self, images, labels, reference) -> dict:
        """The library's metrics (DigitsEvaluator on the digits model, vq4dit.metrics otherwise)
        plus the predicted class of each image ("pred") for the image labels."""
        if self.evaluator is not None:
            out = self.evaluator.evaluate(images, labels, reference)
            out["pred"] = self.evaluator.predict(images).tolist()
            return out
        from vq4dit.metrics import image_mse, psnr
        if reference is None:
            return {}
        return dict(psnr=float(psnr(images, reference).mean()), image_mse=float(image_mse(images, reference).mean()))

    def evaluate_run_model(self, model) -> tuple[dict, dict]:
        """(metrics of the quantized model, metrics of FP) on the fixed eval spec."""
        spec = self.eval_spec()
        labels = spec.labels()
        fp = self.fp_images(labels, spec.seed, spec.guidance_scale, spec.num_steps)
        with self.model_lock:
            q = generate(model, spec, self.bundle.scheduler, self.bundle.vae)
        m = self.image_metrics(q, labels, fp)
        f = self.image_metrics(fp, labels, None)
        m.pop("pred", None), f.pop("pred", None)
        return m, f

    # -- estimates ------------------------------------------------------------------------
    def estimate(self, cfg) -> dict:
        """Before a run: storage from the library's bit accounting (`vq_storage_bits` /
        `rtn_storage_bits`, the numbers the packed model will have) over the layers `quantize`
        targets, and time from earlier runs of the same method and k x d (median per stage)."""
        from vq4dit.config import VQConfig
        from vq4dit.naming import default_filter
        from vq4dit.size import rtn_storage_bits, vq_storage_bits
        n = total = 0
        for name, lin in self.teacher.named_modules():
            if not default_filter(lin, name):
                continue
            bias = lin.bias is not None
            if isinstance(cfg, VQConfig):
                if lin.in_features % cfg.d:
                    return dict(error=f"d={cfg.d} does not divide {name}'s in_features={lin.in_features}")
                b = vq_storage_bits(lin.out_features, lin.in_features, cfg.k, cfg.d, cfg.codebook_dtype, bias)
            else:
                b = rtn_storage_bits(lin.out_features, lin.in_features, cfg.bits, cfg.per_channel, bias)
            n += b["n_weights"]
            total += b["index_bits"] + b["side_bits"] + b["bias_bits"]
        calib = getattr(cfg, "calib", None)
        steps = calib.total_steps if calib is not None else 0
        out = dict(n_weights=n, bits_per_weight=total / max(n, 1), bytes=total / 8, steps=steps, seconds=None)
        same = [r.meta for r in self.store.list() if r.error is None and r.meta.get("quantize_seconds") is not None
                and r.meta.get("method") == cfg.method and r.meta.get("k") == getattr(cfg, "k", None)
                and r.meta.get("d") == getattr(cfg, "d", None)]
        if same:
            q = float(np.median([m["quantize_seconds"] for m in same]))
            per = [(m["seconds"] - m["quantize_seconds"]) / m["steps_done"] for m in same if m.get("steps_done")]
            out["seconds"] = q + (float(np.median(per)) * steps if per else 0.0)
            out["basis"] = f"median of {len(same)} earlier {cfg.method} run(s) at this k×d, excluding evaluation"
        return out

    # -- runs -----------------------------------------------------------------------------
    def busy(self) -> bool:
        return self.active is not None and not self.active.done.is_set()

    def start_run(self, s: RunSettings) -> ActiveRun:
        """Validate, then quantize + calibrate + evaluate + save in a worker thread."""
        if s.method not in METHODS:
            raise ValueError(f"unknown method {s.method!r}: choose one of {sorted(METHODS)}")
        config = s.config()  # ValueError for invalid k/d/n/bits/iterations/learning rates
        if self.busy():
            raise RuntimeError("a run is already in progress: wait for it or press Cancel")
        calib = getattr(config, "calib", None)
        total = calib.total_steps if calib is not None else 0
        a = ActiveRun(settings=s, total_steps=total)
        self.active = a
        threading.Thread(target=self._work, args=(a,), daemon=True, name="vq4dit-run").start()
        return a

    def _work(self, a: ActiveRun):
        s = a.settings
        try:
            def layer_progress(items, desc=None):
                """Wraps the library's per-layer quantization loop: progress and Cancel."""
                items = list(items)
                a.layers_total, t = len(items), time.time()
                for i, item in enumerate(items):
                    if a.stop.is_set():
                        a.cancelled_in = a.phase
                        raise RunCancelled(f"cancelled during {a.phase} (layer {i}/{len(items)}): nothing saved")
                    a.layers_done = i
                    yield item
                a.layers_done, a.quantize_seconds = len(items), time.time() - t
                a.phase = "calibrating" if METHODS[s.method].calibrated else "measuring block MSE vs FP"

            def on_step(info):
                a.rows.append({k: v for k, v in info.items() if k != "trace"})
                if a.stop.is_set():
                    a.cancelled_in = a.cancelled_in or "calibrating"
                    return False
                return True

            calib = dict(s.calib, device=str(self.device)) if METHODS[s.method].calibrated else None
            with self.model_lock:
                res = run_method(self.teacher, s.method, s.bits, calib=calib, vq=s.vq_kwargs(),
                                 on_step=on_step, progress=layer_progress)
            if a.stop.is_set():  # Cancel after calibration: skip the image evaluation, save as cancelled
                a.cancelled_in = a.cancelled_in or "measuring block MSE vs FP"
                metrics, fp_metrics = {}, {}
            else:
                a.phase = "evaluating images"
                metrics, fp_metrics = self.evaluate_run_model(res.model)
            a.phase = "saving"
            run_id = self.store.new_id(s.method, s.bits)
            tr = res.trace
            meta = dict(
                id=run_id, method=s.method, bits=s.bits, k=getattr(res.config, "k", None),
                d=getattr(res.config, "d", None), n_candidates=getattr(res.config, "n_candidates", None),
                settings=asdict(s), config=res.config.to_dict(), model_source=str(self.cfg.model),
                bits_per_weight=res.size["bits_per_weight"], size=res.size, block_mse=res.block_mse,
                per_block_mse=res.per_block_mse, seconds=res.seconds, metrics=metrics, fp_metrics=fp_metrics,
                eval_spec=asdict(self.eval_spec()), n_blocks=self.n_blocks, created=time.time(),
                total_steps=tr.total_steps if tr is not None else None,
                steps_done=tr.steps_done if tr is not None else None,
                stopped=tr.stopped if tr is not None else None,
                status=("cancelled" if a.cancelled_in or (tr is not None and tr.stopped == "cancelled")
                        else (f"stopped ({tr.stopped})" if tr is not None and tr.stopped else "finished")),
                cancelled_in=a.cancelled_in, quantize_seconds=a.quantize_seconds,
            )
            self.store.save(run_id, res, meta, scheduler=self.bundle.scheduler)
            a.run_id = run_id
            a.phase = "saved"
        except RunCancelled as e:
            a.error, a.phase = e, "cancelled"
        except BaseException as e:  # reported to the UI by the streaming generator
            a.error = e
            a.phase = "failed"
        finally:
            a.done.set()


def warm_umap_async():
    """Compile umap's numba kernels in the background so the first UMAP view doesn't stall."""
    def warm():
        try:
            import umap
            x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
            umap.UMAP(n_neighbors=8, n_epochs=20, random_state=0, n_jobs=1).fit_transform(x)
        except Exception:
            pass
    t = threading.Thread(target=warm, daemon=True, name="umap-warmup")
    t.start()
    return t
