"""The calibration worker: one run (quantize, calibrate, evaluate, save) in its own process.

The server (app/engine.py) starts `worker_main` with multiprocessing's "spawn" context, so the run
never shares the server's GIL or model lock, and reads what the worker streams over a queue:

    ("pid", pid)                  the worker is up (its model is loading)
    ("phase", name)               "k-means init", "calibrating", "measuring block MSE vs FP",
                                  "evaluating images", "saving"
    ("layers", done, total)       per-layer k-means / RTN progress
    ("quantize_seconds", s)       time of the per-layer stage
    ("eval", done, total)         sampler steps of the image evaluation
    ("row", dict)                 each calibration step's on_step row (without the Trace object)
    ("cancelled_in", phase)       the phase in which Cancel took effect
    ("live_trace", path)          the live run (run.json + partial trace/) was rewritten at `path`
    ("saved", run_id)             terminal: the run dir is in place
    ("cancelled", message)        terminal: cancelled before a model existed, nothing saved
    ("failed", message)           terminal: an exception; nothing saved

A worker that dies without a terminal record (killed, out of memory) is reported by the server,
which also removes the temp dirs it left (their names carry the worker's pid, `clean_stale_run_temps`).
Requests travel as plain dicts (AppConfig / RunRequest fields); the worker rebuilds the library
config through the same `Engine.run_config` the server validated it with.
"""
from __future__ import annotations

import importlib
import os
import shutil
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

LIVE_TRACE_EVERY_S = 10.0   # at most one partial-trace snapshot per this many seconds of calibration
LIVE_TRACE_MAX_SHARE = 0.1  # ... and writing them may take at most this share of the calibration time
PARENT_GONE_GRACE_S = 60.0  # the server died: stop as Cancel does (partial run saved), else exit after this


class RunCancelled(Exception):
    """Cancel pressed before there was a model worth saving (during k-means)."""


class EvaluationCancelled(Exception):
    """Cancel pressed during the image evaluation: the run is saved without metrics."""


def live_run_dir(runs_root: Path, pid: int) -> Path:
    """Where worker `pid` keeps the live run (run.json + partial trace/): a dot-name the runs list
    skips, and whose pid makes `clean_stale_run_temps` remove it once that process is gone."""
    return Path(runs_root) / f".live-tmp{pid}-run"


def write_live_run(live: Path, meta: dict, trace, steps_done: int):
    """The live run's snapshot, each part atomic (Trace.save: temp dir + rename; run.json: temp + rename).
    run.json is written after the trace, so the steps it claims are always in the trace on disk."""
    from .store import RUN_FILE, _atomic_json, _clean
    live.mkdir(exist_ok=True)
    trace.save(live / "trace")
    _atomic_json(live / RUN_FILE, _clean(dict(meta, steps_done=steps_done)))


def worker_main(job: dict, records, stop, requests):
    """Process entry point. `job`: app (AppConfig fields), threads, setup (optional "module:function"
    called first: tests inject faults through it). The worker imports first, then waits on `requests`
    for its one RunRequest (a dict), so it can be started ahead as a spare; `stop` before any request
    retires it."""
    emit = records.put
    emit(("pid", os.getpid()))
    finished = threading.Event()
    threading.Thread(target=watch_parent, args=(stop, finished, records), daemon=True).start()
    try:
        import torch
        torch.set_num_threads(max(1, int(job.get("threads") or 1)))
        if job.get("setup"):
            mod, fn = job["setup"].split(":")
            getattr(importlib.import_module(mod), fn)()
        from .config import AppConfig, RunRequest
        from .engine import Engine
        request = wait_for_request(requests, stop)
        if request is None:
            return  # a spare retired before it got a run: nothing to report
        cfg = AppConfig(**dict(job["app"], warm_umap=False, spare_worker=False))
        engine = Engine(cfg)  # after the request: the runs dir (new ids) is read as it is now
        calibrate_and_save(engine, RunRequest(**request), stop, emit)
    except RunCancelled as e:
        emit(("cancelled", str(e)))
    except BaseException as e:  # noqa: BLE001 - everything is reported; the server shows it
        tb = traceback.format_exc(limit=-3)
        emit(("failed", f"{type(e).__name__}: {e}", tb))
    finally:
        finished.set()


def wait_for_request(requests, stop, every_s: float = 0.5, last_s: float = 2.0):
    """A spare worker's wait: the request dict, or None once `stop` is set with no request sent
    (retired, or server gone). A request always wins over `stop`: Cancel pressed right after Run
    can reach this process before the request does, and the run must then end as a cancelled run
    ("cancelled during k-means init"), not as a worker that exited without a word."""
    import queue
    while not stop.is_set():
        try:
            return requests.get(timeout=every_s)
        except queue.Empty:
            pass
    try:
        return requests.get(timeout=last_s)  # one in flight (Queue.put hands it to a feeder thread)
    except queue.Empty:
        return None


def watch_parent(stop, finished, records, every_s: float = 1.0):
    """A worker outlives a killed server (SIGTERM/SIGKILL skip the server's cleanup): when the parent is
    gone, stop as Cancel does, so the run ends and its partial trace is saved; exit hard if that takes
    longer than PARENT_GONE_GRACE_S. The parent is watched through multiprocessing's sentinel, not the
    parent pid: a server killed while this process was still starting is seen as gone too."""
    import multiprocessing as mp
    parent = mp.parent_process()
    if parent is None:
        return  # not started by multiprocessing (called directly): nobody to watch
    while not finished.wait(every_s):
        if not parent.is_alive():
            records.cancel_join_thread()  # nobody reads the queue now: do not block the exit on it
            hard_exit = threading.Timer(PARENT_GONE_GRACE_S, os._exit, args=(1,))  # even if stopping hangs
            hard_exit.daemon = True  # a worker that stops in time exits at once
            hard_exit.start()
            stop.set()
            return


def calibrate_and_save(engine, s, stop, emit) -> str:
    """run_method + image evaluation + RunStore.save for request `s`, streaming records via `emit`;
    `stop` (an Event) set = Cancel: the current step ends, the partial trace and model are saved."""
    from .config import calibrated, is_peer
    from vq4dit.runner import run_method

    config = engine.run_config(s)
    if is_peer(s.method):  # the scheme's own code bits, not the form's slider
        from vq4dit.peers import code_bits
        s = replace(s, bits=code_bits(config))
    st = dict(phase="k-means init", cancelled_in=None, quantize_seconds=None, live_t=None, live_cost=0.0, t_cal=None)

    def phase(name):
        st["phase"] = name
        emit(("phase", name))

    def cancelled_in(name):
        if st["cancelled_in"] is None:
            st["cancelled_in"] = name
            emit(("cancelled_in", name))

    def layer_progress(items, desc=None):
        """Wraps the library's per-layer quantization loop: progress and Cancel."""
        items = list(items)
        t = time.time()
        for i, item in enumerate(items):
            if stop.is_set():
                cancelled_in(st["phase"])
                raise RunCancelled(f"cancelled during {st['phase']} (layer {i}/{len(items)}): nothing saved")
            emit(("layers", i, len(items)))
            yield item
        st["quantize_seconds"] = time.time() - t
        emit(("layers", len(items), len(items)))
        emit(("quantize_seconds", st["quantize_seconds"]))
        phase("calibrating" if calibrated(s.method) else "measuring block MSE vs FP")

    from .store import LIVE_ID
    live = live_run_dir(engine.store.root, os.getpid())
    calib = getattr(config, "calib", None)
    live_meta = dict(id=LIVE_ID, method=s.method, bits=s.bits, k=getattr(config, "k", None),
                     d=getattr(config, "d", None), n_candidates=getattr(config, "n_candidates", None),
                     settings=asdict(s), config=config.to_dict(), model_source=str(engine.cfg.model),
                     bits_per_weight=engine.estimate(config).get("bits_per_weight"), n_blocks=engine.n_blocks,
                     total_steps=calib.total_steps if calib is not None else None, status="running",
                     worker_pid=os.getpid())

    def on_step(info):
        emit(("row", {k: v for k, v in info.items() if k != "trace"}))
        now = time.time()
        st["t_cal"] = st["t_cal"] or now
        due = st["live_t"] is None or now - st["live_t"] >= LIVE_TRACE_EVERY_S
        if due and st["live_cost"] <= LIVE_TRACE_MAX_SHARE * (now - st["t_cal"]):
            try:  # a partial snapshot the explorer's views can read while the run goes (atomic)
                write_live_run(live, live_meta, info["trace"], int(info["step"]))
                emit(("live_trace", str(live)))
            except OSError:
                pass  # the live view is a convenience; the run goes on
            st["live_t"] = time.time()
            st["live_cost"] += st["live_t"] - now
        if stop.is_set():
            cancelled_in("calibrating")
            return False
        return True

    phase("k-means init")
    res = run_method(engine.teacher, config=config, on_step=on_step, progress=layer_progress)
    metrics, fp_metrics = {}, {}
    if stop.is_set():  # Cancel after calibration: skip the image evaluation, save as cancelled
        cancelled_in("measuring block MSE vs FP")
    else:
        phase("evaluating images")

        def eval_progress(i, n):
            emit(("eval", i, n))
            if stop.is_set():  # Cancel during the evaluation: the rest is skipped, the run saved
                raise EvaluationCancelled
        try:
            metrics, fp_metrics = engine.evaluate_run_model(res.model, progress=eval_progress)
        except EvaluationCancelled:
            cancelled_in("evaluating images")
    phase("saving")
    store, tr = engine.store, res.trace
    run_id = store.new_id(s.method, s.bits)
    meta = dict(
        id=run_id, method=s.method, bits=s.bits, k=getattr(res.config, "k", None),
        d=getattr(res.config, "d", None), n_candidates=getattr(res.config, "n_candidates", None),
        settings=asdict(s), config=res.config.to_dict(), model_source=str(engine.cfg.model),
        bits_per_weight=res.size["bits_per_weight"], size=res.size, block_mse=res.block_mse,
        per_block_mse=res.per_block_mse, seconds=res.seconds, metrics=metrics, fp_metrics=fp_metrics,
        eval_spec=asdict(engine.eval_spec()), n_blocks=engine.n_blocks, created=time.time(),
        total_steps=tr.total_steps if tr is not None else None,
        steps_done=tr.steps_done if tr is not None else None,
        stopped=tr.stopped if tr is not None else None,
        status=("cancelled" if st["cancelled_in"] or (tr is not None and tr.stopped == "cancelled")
                else (f"stopped ({tr.stopped})" if tr is not None and tr.stopped else "finished")),
        cancelled_in=st["cancelled_in"], quantize_seconds=st["quantize_seconds"], worker_pid=os.getpid(),
    )
    store.save(run_id, res, meta, scheduler=engine.bundle.scheduler)
    emit(("saved", run_id))
    shutil.rmtree(live, ignore_errors=True)  # the saved run replaces the live one (also when the server is gone)
    return run_id
