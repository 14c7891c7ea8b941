"""What every benchmark script shares: the machine it ran on, the load it ran under, timers,
per-stage rows, and CSVs written atomically (a reader never sees half a file)."""
from __future__ import annotations

import csv
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------
# The machine and its load
# ----------------------------------------------------------------------------------------


def load_avg() -> float:
    """1-minute load average: on a shared machine, what a wall time has to be read against."""
    return os.getloadavg()[0]


def machine_name(device=None) -> str:
    """What ran the rows: the GPU for CUDA runs, else the CPU (also on a host that has a GPU)."""
    if torch.cuda.is_available() and str(device or "cuda").startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}"


def gpu_name() -> str:
    """The GPU's name from nvidia-smi, for a parent process that must not create a CUDA context."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def rss_now_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def sync(device):
    """Wait for queued CUDA work, so a timer measures it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# Timers and rows
# ----------------------------------------------------------------------------------------


class Timer:
    """`with Timer() as t: ...` -> t.wall (s), t.cpu (process CPU s, all threads), t.load_start, t.load_end.

    CPU seconds depend on the machine's load much less than wall seconds do."""

    def __enter__(self):
        self.load_start = load_avg()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.load_end = load_avg()
        return False


class Rows:
    """Rows of one stage: (stage, what, value, unit), each printed as it is measured."""

    def __init__(self, stage: str, device="cpu"):
        self.stage, self.device, self.rows = stage, device, []

    def add(self, what: str, value: float, unit: str):
        self.rows.append(dict(stage=self.stage, what=what, value=value, unit=unit))
        print(f"  {self.stage:12s} {what:44s} {value:12.4g} {unit}", file=sys.stderr, flush=True)

    def memory(self):
        """Peak resident memory of this process (and peak GPU memory on CUDA)."""
        self.add("peak RSS (process)", peak_rss_gb(), "GiB")
        if torch.device(self.device).type == "cuda":
            self.add("peak GPU memory", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB")


# ----------------------------------------------------------------------------------------
# CSVs
# ----------------------------------------------------------------------------------------


def read_rows(path) -> list[dict]:
    """Rows of a CSV as dicts ([] when the file does not exist); `#` comment lines are skipped."""
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def write_csv(rows, path, columns, comment: str | None = None):
    """Write rows (extra keys ignored) to a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            if comment:
                f.write(f"# {comment}\n")
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# The app in a subprocess (browser tests, explorer timings, screenshots)
# ----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright cannot download its own browser here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    """An unused loopback port (free when asked; a server binds it right after)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py ARGS` on a free loopback port, its output in `log`:

        with AppServer(["--runs-dir", d], log) as app:   # returns once the page answers
            page.goto(app.url)

    A server that exits or does not answer within `timeout` s raises with its log's tail."""

    def __init__(self, args, log, env: dict | None = None, timeout: float = 240):
        self.log, self.timeout, self.port = Path(log), timeout, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *map(str, args)], cwd=ROOT,
            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", **(env or {})),
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)  # "a": restarts share a log

    def wait(self, poll_s: float = 0.2) -> float:
        """Block until the page answers; seconds since the process started."""
        import urllib.request
        deadline = self.t0 + self.timeout
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return time.time() - self.t0
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"app did not start (exit {self.proc.returncode}): "
                                       f"{self.log.read_text()[-2000:]}")
                time.sleep(poll_s)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        self.wait()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False
