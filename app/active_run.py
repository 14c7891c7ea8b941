"""The server's side of a run in the worker process: `ActiveRun` (what the UI reads),
`WorkerProcess` (a spawned worker and its queues, started on Run or ahead of it as a spare), and
`follow_worker`, the thread that turns the worker's records (app/worker.py) into the ActiveRun,
ends a worker that ignores Cancel, and reports a worker that died."""
from __future__ import annotations

import json
import multiprocessing as mp
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from .store import clean_stale_run_temps
from .worker import RunCancelled, worker_main

TERMINAL = ("saved", "cancelled", "failed")


class WorkerFailed(RuntimeError):
    """The worker raised, died, or was terminated: nothing was saved."""


@dataclass
class ActiveRun:
    settings: object                            # the RunRequest
    total_steps: int
    config: object = None                       # the library config the worker runs
    stop: object = field(default_factory=threading.Event)  # Cancel (a multiprocessing Event for a worker)
    done: threading.Event = field(default_factory=threading.Event)
    rows: list = field(default_factory=list)    # on_step rows (no Trace object)
    phase: str = "k-means init"
    run_id: Optional[str] = None
    error: Optional[BaseException] = None
    t0: float = field(default_factory=time.time)
    layers_done: int = 0                        # k-means / RTN progress over the target layers
    layers_total: int = 0
    eval_done: int = 0                          # sampler steps of the image evaluation
    eval_total: int = 0
    quantize_seconds: Optional[float] = None    # time of the per-layer quantization (k-means) stage
    cancelled_in: Optional[str] = None          # phase in which Cancel took effect (None: not cancelled)
    pid: Optional[int] = None                   # the worker process
    phase_t0: dict = field(default_factory=dict)  # phase -> when it began (for per-phase ETAs)
    live_trace: Optional[str] = None            # the worker's latest partial trace snapshot (a trace dir)
    live_version: int = 0                       # bumped at each new snapshot

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows))

    def apply(self, rec: tuple):
        """One record of the worker (see app/worker.py)."""
        kind = rec[0]
        if kind == "phase":
            self.phase = rec[1]
            self.phase_t0.setdefault(rec[1], time.time())
        elif kind == "layers":
            self.layers_done, self.layers_total = rec[1], rec[2]
        elif kind == "eval":
            self.eval_done, self.eval_total = rec[1], rec[2]
        elif kind == "quantize_seconds":
            self.quantize_seconds = rec[1]
        elif kind == "row":
            self.rows.append(rec[1])
        elif kind == "cancelled_in":
            self.cancelled_in = rec[1]
        elif kind == "live_trace":
            self.live_trace, self.live_version = rec[1], self.live_version + 1
        elif kind == "pid":
            self.pid = rec[1]
        elif kind == "saved":
            self.run_id, self.phase = rec[1], "saved"
        elif kind == "cancelled":
            self.error, self.phase = RunCancelled(rec[1]), "cancelled"
        elif kind == "failed":
            self.error, self.phase = WorkerFailed(rec[1]), "failed"


@dataclass
class WorkerProcess:
    """A spawned worker (app/worker.py): started without a request it is a spare, which imports
    torch, diffusers and vq4dit (most of a worker's ~10 s start), then waits for `submit`."""
    proc: object
    records: object   # worker -> server records
    stop: object      # Cancel, or retire a spare
    requests: object  # server -> spare: the one RunRequest (as a dict)
    key: str          # the job it was started for (app config, setup hook, threads): reused only for the same

    @classmethod
    def spawn(cls, job: dict) -> "WorkerProcess":
        ctx = mp.get_context("spawn")  # a fresh interpreter: no shared GIL, no forked CUDA or thread state
        records, stop, requests = ctx.Queue(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=worker_main, args=(job, records, stop, requests), daemon=True, name="vq4dit-run")
        proc.start()
        return cls(proc, records, stop, requests, key=job_key(job))

    def fits(self, job: dict) -> bool:
        return self.proc.is_alive() and not self.stop.is_set() and self.key == job_key(job)

    def submit(self, request: dict):
        self.requests.put(request)

    def retire(self):
        """A spare that will not be used: it sees `stop` within a second and exits (daemon: never outlives us)."""
        self.stop.set()


def job_key(job: dict) -> str:
    return json.dumps(job, sort_keys=True, default=str)


def exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def follow_worker(a: ActiveRun, w: WorkerProcess, store, grace_s: float, poll_s: float = 0.2, on_end=None):
    """Read the worker's records into `a` until a terminal one, or until the worker is gone; the live
    run's snapshots are handed to `store` (a RunStore) for the views. After Cancel, a worker that sends
    nothing for `grace_s` seconds is terminated (then killed). Always: the live run is withdrawn, the
    temp dirs the worker left are removed, `on_end()` is called (the engine's next spare), `a.done` is set."""
    proc, records = w.proc, w.records  # `w` keeps its queues alive: one collected here breaks the worker's unpickling
    last, cancel_seen = time.time(), None
    try:
        while True:
            try:
                rec = records.get(timeout=poll_s)
            except queue.Empty:
                rec = None
            except (EOFError, OSError):
                rec = None
            if rec is not None:
                last = time.time()
                a.apply(rec)
                if rec[0] == "live_trace":
                    store.set_live(a.live_trace, a.live_version)
                if rec[0] in TERMINAL:
                    break
                continue
            if a.stop.is_set() and cancel_seen is None:
                cancel_seen = time.time()
            if not proc.is_alive():
                rec = _drain(a, records)
                if rec is None:
                    a.error = WorkerFailed(f"the calibration worker (pid {proc.pid}) {exit_text(proc.exitcode)} "
                                           f"during {a.phase}: nothing saved")
                    a.phase = "failed"
                break
            if cancel_seen is not None and time.time() - max(cancel_seen, last) > grace_s:
                _end(proc)
                a.error = WorkerFailed(f"the calibration worker (pid {proc.pid}) did not stop within {grace_s:g} s "
                                       f"of Cancel (during {a.phase}): terminated, nothing saved")
                a.phase = "failed"
                break
        proc.join(timeout=30)
        if proc.is_alive():
            _end(proc)
    finally:
        store.set_live(None)
        clean_stale_run_temps(Path(store.root))  # the dead worker's temp and live-run dirs
        try:
            if on_end is not None:
                on_end()  # before `done`: whoever waits for the run sees the next spare in place
        finally:
            a.done.set()


def _drain(a: ActiveRun, records) -> Optional[tuple]:
    """Records still in the pipe after the worker exited; returns the terminal one, if any."""
    while True:
        try:
            rec = records.get(timeout=0.5)
        except (queue.Empty, EOFError, OSError):
            return None
        a.apply(rec)
        if rec[0] in TERMINAL:
            return rec


def _end(proc):
    proc.terminate()
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
