"""The runs directory: saved runs on disk, their labels, and cached reads of their traces and models.

A saved run is one directory under the runs dir, written atomically (temp dir, then rename):
    runs/<id>/run.json         settings, size, block MSE, image metrics (what the Runs table shows)
    runs/<id>/trace/           vq4dit.trace.Trace.save (absent for rtn / kmeans: no calibration)
    runs/<id>/model/           vq4dit.io.save_quantized (packed model, reloadable with load_dit)
"""
from __future__ import annotations

import json
import re
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from vq4dit.fs import pid_alive
from vq4dit.io import load_dit, save_quantized
from vq4dit.trace import Trace

from .cache import LRU
from .config import ROOT, RUN_ID_RE, RUN_JSON_MAX_BYTES, calibrated, is_peer, run_meta_error
from .exports import PrivateExports

RUN_FILE = "run.json"
DEMO_DIR = ROOT / "assets" / "demo_runs"   # finished runs shipped with the app (python -m app.demo build)
DEMO_PREFIX = "demo-"                       # ids of demo runs; never used for runs the app saves
DEMO_SAMPLES = "samples.safetensors"        # a demo run's images (and FP's) at the Images tab's defaults
LIVE_ID = "live"                            # the run in progress (its worker's snapshots); saved ids start with a date
# The only files an export may contain: what the app itself wrote (relative to the run dir).
EXPORT_FILES = {
    "model": ("model/vq4dit_config.json", "model/model.safetensors", "model/scheduler/scheduler_config.json"),
    "trace": ("trace/meta.json", "trace/steps.csv", "trace/layers.csv", "trace/ratios.csv", "trace/events.csv",
              RUN_FILE),
}


def run_label(meta: dict) -> str:
    """What a run is, in one line: method, k x d and bits/weight (nominal bits alone mislead: k=16, d=4
    is "2-bit" by its preset but 1.11 bits/weight), plus its status when not finished."""
    kd = f" {meta['k']}×{meta['d']}" if meta.get("k") else ""
    bpw = meta.get("bits_per_weight")
    bpw = f", {bpw:.2f} b/w" if isinstance(bpw, (int, float)) and math.isfinite(bpw) else f", W{meta.get('bits')}"
    init = " act-aware" if (meta.get("config") or {}).get("activation_aware") else ""
    st = meta.get("status", "finished")
    return f"{meta.get('method', '?')}{kd}{init}{bpw}" + ("" if st == "finished" else f" [{st}]")


def pair_key(meta: dict) -> tuple:
    """What a baseline must share with a run to be compared with it: (k, d, init)."""
    return (meta.get("k"), meta.get("d"), bool((meta.get("config") or {}).get("activation_aware")))


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


def read_run_json(path: Path):
    """run.json parsed, or ValueError (one line) for a file too big, not JSON or nested too deeply."""
    size = path.stat().st_size
    if size > RUN_JSON_MAX_BYTES:
        raise ValueError(f"{size} bytes, more than a run.json holds")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


_RUN_TMP_RE = re.compile(r"^\.(?P<id>.+)-tmp(?P<pid>\d+)-[^/]*$")
LEGACY_TMP_AGE_S = 24 * 3600  # temp dirs from before the pid was in the name: removed once this old


def clean_stale_run_temps(root: Path) -> list[str]:
    """Remove the `.RUNID-tmpPID-*` dirs a killed app left while saving (its pid no longer runs), and
    pid-less `.RUNID-*` dirs of older versions after a day. Returns the names removed."""
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if not p.name.startswith(".") or p.name.startswith(".write-probe"):
            continue
        m = _RUN_TMP_RE.match(p.name)
        try:
            stale = (not pid_alive(int(m.group("pid")))) if m else (
                RUN_ID_RE.fullmatch(p.name[1:].rsplit("-", 1)[0] or "-") is not None
                and time.time() - p.lstat().st_mtime > LEGACY_TMP_AGE_S)
            if not stale:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError:
            continue
    return removed


class RunStore:
    """Saved runs on disk plus in-memory caches of their traces and packed models.

    `demo_root` (optional): a second, read-only directory of finished runs shipped with the app,
    whose ids start with DEMO_PREFIX. They are listed before (as older than) the runs dir's, resolve
    only inside `demo_root`, and are never written. Their packed models share the FP weights of
    `fp_base` (the embedded model), see `vq4dit.io.save_quantized(fp_base=...)`."""

    pair_key = staticmethod(pair_key)

    def __init__(self, root, device=None, demo_root=None, fp_base=None, cache_weights: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.demo_root = Path(demo_root) if demo_root is not None else None
        self.fp_base = fp_base
        self.cache_weights = cache_weights    # packed runs keep decoded weights (io.load_quantized cache=)
        self.bad: dict[str, str] = {}          # runs found corrupt when loading
        self._traces = LRU(8)
        self._models = LRU(6)
        self._exports = PrivateExports()
        self.cleaned = clean_stale_run_temps(self.root)
        self.live: Optional[Path] = None       # the run in progress: its worker's live dir (run.json + trace/)
        self.live_version = 0                  # bumped at each new snapshot (the trace cache key)

    def set_live(self, path: Optional[Path], version: int = 0):
        """The worker wrote a new snapshot of the run in progress at `path` (None: no run in progress)."""
        self.live, self.live_version = (Path(path) if path else None), version

    # -- ids ------------------------------------------------------------------------------
    def is_demo(self, run_id) -> bool:
        """A shipped demo run (read-only): its id has the demo prefix and a demo dir is attached."""
        return self.demo_root is not None and isinstance(run_id, str) and run_id.startswith(DEMO_PREFIX)

    def run_dir(self, run_id) -> Path:
        """The directory of a run: `run_id` must be a plain name that resolves strictly inside the runs
        dir (demo ids: inside the demo dir). The error never says whether anything exists elsewhere on disk."""
        if run_id == LIVE_ID:
            if self.live is None:
                raise ValueError("the live run has ended: pick its saved run in the Runs table")
            return self.live
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
                if any((p / n).is_symlink() for n in (RUN_FILE, "trace", "model")):
                    raise ValueError("run.json, trace/ or model/ is a symbolic link (the app never writes one)")
                info.meta = read_run_json(p / RUN_FILE)
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
            meta = read_run_json(p)
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

    # -- loading --------------------------------------------------------------------------
    def trace(self, run_id: str) -> Optional[Trace]:
        """The run's calibration trace (cached; the live run's per snapshot); None for methods without calibration."""
        key = f"{LIVE_ID}@{self.live_version}" if run_id == LIVE_ID else run_id
        if key in self._traces:
            return self._traces.get(key)
        meta = self.meta(run_id)
        tdir = self.run_dir(run_id) / "trace"
        if tdir.is_symlink():
            self.bad[run_id] = "trace/ is a link"
            raise ValueError(f"run {run_id!r} is unreadable: its trace/ is a symbolic link (the app never writes one)")
        if not tdir.exists():
            if calibrated(meta["method"]):
                self.bad[run_id] = "trace missing"
                raise ValueError(f"run {run_id!r} is unreadable: its trace/ directory is missing")
            tr = None
        else:
            try:
                tr = Trace.load(tdir)
                _ = tr.steps, tr.layers  # parse now so a corrupt CSV fails here, not in a plot
                if "layers" not in tr.meta:
                    raise ValueError(f"trace at {tdir} has no layer list in meta.json")
            except Exception as e:  # any failure (e.g. safetensors' own error for a truncated file): this run only
                self.bad[run_id] = "corrupt trace"
                raise ValueError(f"run {run_id!r} is unreadable: {e}") from e
        return self._traces.put(key, tr)

    def model(self, run_id: str):
        """The packed model as a DiTBundle (cached, a few at a time); a peer run's is re-made."""
        if run_id in self._models:
            return self._models.get(run_id)
        if run_id == LIVE_ID:
            raise ValueError("the live run has no packed model until it is saved")
        mdir = self.run_dir(run_id) / "model"
        meta = self.meta(run_id)
        if is_peer(meta.get("method")):
            return self._models.put(run_id, self._peer_model(run_id, meta))
        if mdir.is_symlink():
            self.bad[run_id] = "model/ is a link"
            raise ValueError(f"run {run_id!r}: its model/ is a symbolic link (the app never writes one)")
        try:
            b = load_dit(mdir, device=self.device, fp_base=self.fp_base, cache=self.cache_weights)
        except Exception as e:  # any failure reading the files marks this run, never the app
            self.bad[run_id] = "corrupt model"
            raise ValueError(f"run {run_id!r}: packed model unreadable: {e}") from e
        return self._models.put(run_id, b)

    def _peer_model(self, run_id: str, meta: dict):
        """A peer run keeps no model (the packed format stores VQ and RTN layers only): its library makes
        it again from the loaded FP model (calibration-free and deterministic). The stored bits/weight must
        come out the same, else the run was made from another model or library version."""
        import copy

        from vq4dit import quantize
        from vq4dit.io.bundle import DiTBundle
        from vq4dit.peers import peer_config
        from vq4dit.size import size_summary
        if self.fp_base is None:
            raise ValueError(f"run {run_id!r} is a {meta['method']} run: it needs the FP model it was made from")
        m = copy.deepcopy(self.fp_base)
        quantize(m, peer_config(meta["method"]), progress=False)
        got, want = size_summary(m)["bits_per_weight"], meta.get("bits_per_weight")
        if want is None or abs(got - float(want)) > 1e-9:
            raise ValueError(f"run {run_id!r}: {meta['method']} of the loaded model stores {got:.4f} bits/weight, "
                             f"the run recorded {want}: it was made from another model or library version")
        return DiTBundle(transformer=m.eval(), scheduler=None, source=f"{meta['method']} of the loaded model")

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
        """Trace + packed model + run.json, built in a temp dir and renamed into place (a peer run: run.json only)."""
        if self.is_demo(run_id) or str(run_id).startswith(DEMO_PREFIX):
            raise ValueError(f"{run_id!r}: ids starting with {DEMO_PREFIX!r} are reserved for the read-only demo runs")
        out = self.run_dir(run_id)
        self.root.mkdir(parents=True, exist_ok=True)  # the runs dir may have been deleted meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}-tmp{os.getpid()}-", dir=self.root))
        try:
            if result.trace is not None:
                result.trace.save(tmp / "trace")
            if not is_peer(meta.get("method")):  # a peer run's model is re-made by its library (_peer_model)
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
        """This process's private export dir (app/exports.py): fresh, 0700, never a shared fixed name."""
        return self._exports.directory()

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
        return self._exports.write_zip((run_id, what), run, run_id, EXPORT_FILES[what])


def _round(v, n):
    try:
        return None if v is None or not math.isfinite(float(v)) else round(float(v), n)
    except (TypeError, ValueError):
        return None
