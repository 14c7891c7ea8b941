"""The calibration runs in a worker process (app/worker.py), followed by the server (app/active_run.py).

Engine only (no Gradio): the run's pid is not the server's, the streamed rows are the saved trace's
steps, Cancel keeps a partial trace and a loadable hard model, a worker that raises, dies mid-save or
ignores Cancel gives a clear error and leaves no run dir and no temp dir behind. Faults are injected
through `Engine.worker_setup`: a function of this module the worker calls first (it patches the
worker's own process only).
"""
import os
import signal
import time

import numpy as np
import pytest


TINY_RUN = dict(method="vq4dit", bits=2, k=256, d=4, kmeans_iters=5)


@pytest.fixture
def engine(tmp_path):
    from app.config import AppConfig
    from app.engine import Engine
    e = Engine(AppConfig(runs_dir=str(tmp_path / "runs"), warm_umap=False, demo_runs=False, device="cpu",
                         eval_per_class=1, eval_steps=3, iterations=1, sampling_steps=3, kmeans_iters=5,
                         threads=1))
    yield e
    e.close()


def request(iterations=1, steps=3, **kw):
    from app.config import RunRequest
    return RunRequest(**dict(TINY_RUN, **kw), calib=dict(iterations=iterations, num_sampling_steps=steps))


def wait(a, until=lambda a: a.done.is_set(), timeout=300):
    t0 = time.time()
    while not until(a):
        assert time.time() - t0 < timeout, f"timed out in phase {a.phase}"
        time.sleep(0.02)


def run_dirs(engine):
    """Everything in the runs dir: saved runs and any dot-named temp dir."""
    return sorted(p.name for p in engine.store.root.iterdir())


# -- faults (called first thing in the worker process) ----------------------------------------
def fault_raise_in_evaluation():
    from app.engine import Engine

    def boom(self, model, progress=None):
        raise RuntimeError("injected evaluation failure")
    Engine.evaluate_run_model = boom


def fault_killed_while_saving():
    """The packed model is written into the temp dir, then the process dies (SIGKILL)."""
    import app.store as store
    real = store.save_quantized

    def save_then_die(*a, **kw):
        real(*a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    store.save_quantized = save_then_die


def fault_ignore_cancel():
    """Calibration that never returns and never looks at Cancel."""
    import vq4dit.runner as runner

    def stuck(teacher, config=None, on_step=None, progress=None, **kw):
        list(progress([1, 2], desc="k-means"))  # the k-means phase starts, then it hangs
        while True:
            time.sleep(1)
    runner.run_method = stuck


# -- tests ----------------------------------------------------------------------------------
def test_run_happens_in_a_worker_process_and_rows_match_the_trace(engine):
    from vq4dit.trace import Trace
    a = engine.start_run(request(iterations=2, steps=3))
    wait(a)
    assert a.error is None and a.run_id, a.error
    assert isinstance(a.pid, int) and a.pid != os.getpid()
    meta = engine.store.meta(a.run_id)
    assert meta["worker_pid"] == a.pid and meta["status"] == "finished" and meta["steps_done"] == 6
    steps = Trace.load(engine.store.run_dir(a.run_id) / "trace").steps
    assert [r["step"] for r in a.rows] == list(steps["step"]) == list(range(1, 7))
    np.testing.assert_allclose([r["block_loss"] for r in a.rows], steps["block_loss"], rtol=1e-6)
    assert all("trace" not in r for r in a.rows)
    # every phase was seen, in order, and the evaluation's sampler steps were counted to the end
    assert list(a.phase_t0) == ["starting worker", "k-means init", "calibrating", "evaluating images", "saving"]
    assert a.layers_done == a.layers_total > 0 and a.eval_done == a.eval_total == 3 + 3  # FP + quantized
    assert a.live_trace is not None and a.live_version >= 1
    assert run_dirs(engine) == [a.run_id]  # the live-trace snapshot dir was removed with the worker


def test_next_run_is_served_by_the_spare_started_after_the_last(engine):
    """After a run, the engine starts the next run's worker ahead; Run hands it the request. A changed
    worker job (here the setup hook) retires that spare: a stale process never runs a request."""
    assert engine._spare is None  # Engine alone starts none (create_app does)
    wait(engine.start_run(request()))
    spare = engine._spare
    assert spare is not None and spare.proc.is_alive() and spare.proc.pid != os.getpid()
    time.sleep(1.0)  # the spare is up before the request: it waits for it
    assert spare.proc.is_alive() and spare.requests.empty()
    b = engine.start_run(request(seed=1))
    wait(b)
    assert b.error is None and b.pid == spare.proc.pid and engine.store.meta(b.run_id)["worker_pid"] == spare.proc.pid
    stale = engine._spare
    assert stale is not None and stale.proc.pid != spare.proc.pid
    engine.worker_setup = f"{__name__}:fault_raise_in_evaluation"
    c = engine.start_run(request(seed=2))
    wait(c)
    assert c.pid != stale.proc.pid and "injected evaluation failure" in str(c.error)
    stale.proc.join(timeout=10)
    assert not stale.proc.is_alive()  # retired, not left waiting
    engine.close()
    last = engine._spare
    assert last is None


def test_cancel_during_calibration_keeps_partial_trace_and_loadable_model(engine):
    from vq4dit.layers import VQLinear
    from vq4dit.trace import Trace
    a = engine.start_run(request(iterations=50, steps=3))  # 150 steps: far longer than we wait
    wait(a, lambda a: len(a.rows) >= 2 and a.live_trace is not None)
    from app.store import LIVE_ID
    live = engine.store.trace(LIVE_ID)  # the views read the run while it goes, as the run "live"
    assert len(live.steps) >= 1 and live.layer_names
    lm = engine.store.meta(LIVE_ID)
    assert lm["status"] == "running" and lm["worker_pid"] == a.pid and 1 <= lm["steps_done"] <= len(live.steps)
    check_live_run_in_views(engine)
    a.stop.set()
    wait(a)
    assert a.error is None and a.run_id, a.error
    meta = engine.store.meta(a.run_id)
    assert meta["status"] == "cancelled" and meta["cancelled_in"] == "calibrating" and meta["metrics"] == {}
    assert 2 <= meta["steps_done"] < 150 and meta["steps_done"] == len(a.rows)
    tr = Trace.load(engine.store.run_dir(a.run_id) / "trace")
    assert tr.stopped == "cancelled" and len(tr.steps) == meta["steps_done"]
    model = engine.store.model(a.run_id).transformer
    vq = [m for m in model.modules() if isinstance(m, VQLinear)]
    assert vq and all(m.hard for m in vq)
    img = engine.run_images(a.run_id, [3], seed=0, guidance=4.0, steps=2)
    assert img.shape[0] == 1 and bool(img.isfinite().all())
    assert run_dirs(engine) == [a.run_id]
    with pytest.raises(ValueError, match="live run has ended"):
        engine.store.meta(LIVE_ID)


def check_live_run_in_views(engine):
    """While the run goes: it is in the run picker, the views describe it, and the refresh timer
    re-issues the selection only for a new snapshot of the selected live run."""
    import gradio as gr
    from app.live import live_tick
    from app.store import LIVE_ID
    from app.views import Views
    views = Views(engine)
    labels = dict((v, k) for k, v in views.run_choices())
    assert labels[LIVE_ID].startswith("▶ live: vq4dit 256×4")
    sel = views.initial_selection(LIVE_ID)
    assert "running" in views.describe(sel) and sel["layer"] in engine.store.trace(LIVE_ID).layer_names
    slider, new, _ = live_tick(engine, views, dict(sel, block=1))
    assert new["run"] == LIVE_ID and new["block"] == 1 and new["live_version"] == engine.store.live_version
    assert new["snap"] == slider["value"] == len(views.steps_of(LIVE_ID)) - 1
    now = dict(new, live_version=engine.store.live_version)  # the newest snapshot is on screen: nothing to redraw
    assert live_tick(engine, views, now) == (gr.skip(),) * 3
    assert live_tick(engine, views, dict(new, run="some-saved-run")) == (gr.skip(),) * 3


def test_exception_in_worker_is_a_clear_error_and_saves_nothing(engine):
    engine.worker_setup = f"{__name__}:fault_raise_in_evaluation"
    a = engine.start_run(request())
    wait(a)
    assert a.phase == "failed" and a.run_id is None
    assert "RuntimeError: injected evaluation failure" in str(a.error)
    assert run_dirs(engine) == []
    assert not engine.busy()


def test_worker_killed_mid_save_leaves_no_half_written_run(engine):
    engine.worker_setup = f"{__name__}:fault_killed_while_saving"
    a = engine.start_run(request())
    wait(a)
    assert a.phase == "failed" and a.run_id is None
    msg = str(a.error)
    assert f"pid {a.pid}" in msg and "killed by SIGKILL" in msg and "during saving" in msg and "nothing saved" in msg
    assert run_dirs(engine) == []  # no run dir, and the temp dir with the half-written save is gone
    assert engine.store.list() == []


def test_worker_that_ignores_cancel_is_terminated_after_the_grace_period(engine):
    engine.cfg.cancel_grace_s = 1.0
    engine.worker_setup = f"{__name__}:fault_ignore_cancel"
    a = engine.start_run(request())
    wait(a, lambda a: "k-means init" in a.phase_t0)  # the worker is up and stuck in run_method
    t = time.time()
    a.stop.set()
    wait(a, timeout=60)
    assert 1.0 <= time.time() - t < 30
    msg = str(a.error)
    assert a.phase == "failed" and "did not stop within 1 s of Cancel" in msg and "terminated" in msg, msg
    with pytest.raises(ProcessLookupError):
        os.kill(a.pid, 0)
    assert run_dirs(engine) == []


def test_status_shows_each_phase_with_progress_and_eta():
    """ETAs come from each phase's own clock: 100 s of worker start and k-means before the image
    evaluation must not inflate its ETA."""
    from app.active_run import ActiveRun
    from app.config import RunRequest
    from app.text import status_text
    a = ActiveRun(settings=RunRequest(method="vq4dit", bits=2), total_steps=10, phase="starting worker")
    assert "starting the calibration worker process" in status_text(a) and "○ k-means → ○ calibration" in status_text(a)
    now = time.time()
    a.t0 = now - 100
    a.apply(("phase", "k-means init"))
    a.phase_t0["k-means init"] = now - 10
    a.apply(("layers", 5, 20))
    s = status_text(a)
    assert "k-means: layer 5/20, ~30 s left" in s and "**▶ k-means ██░░░░░░░░ 25%**" in s, s
    a.apply(("phase", "evaluating images"))
    a.phase_t0["evaluating images"] = now - 4
    a.apply(("eval", 2, 10))
    s = status_text(a)
    assert "sampler step 2/10, ~16 s left" in s and "**▶ evaluation ██░░░░░░░░ 20%**" in s, s
    assert "● k-means → ● calibration → **▶ evaluation" in s and "○ saving" in s
    a.apply(("phase", "saving"))
    assert "saving… (" in status_text(a)


SERVER_THAT_DIES = """
import sys, time
from app.config import AppConfig, RunRequest
from app.engine import Engine
eng = Engine(AppConfig(runs_dir=sys.argv[1], warm_umap=False, demo_runs=False, device="cpu", eval_per_class=1,
                       eval_steps=3, iterations=1, sampling_steps=3, kmeans_iters=5, threads=1))
a = eng.start_run(RunRequest(method="vq4dit", bits=2, k=256, d=4, kmeans_iters=5,
                             calib=dict(iterations=400, num_sampling_steps=25)))
while len(a.rows) < 2:
    time.sleep(0.05)
print(a.pid, flush=True)
time.sleep(600)
"""


def test_worker_stops_and_saves_when_the_server_is_killed(tmp_path):
    """SIGKILL to the server skips all its cleanup: the worker notices it was orphaned, stops as Cancel
    does (the partial run is saved as cancelled) and exits, instead of calibrating on for hours."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    runs = tmp_path / "runs"
    server = subprocess.Popen([sys.executable, "-c", SERVER_THAT_DIES, str(runs)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        worker = int(server.stdout.readline())
    finally:
        server.kill()
        server.wait(30)
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned worker was still running 120 s after its server was killed")
    saved = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    assert len(saved) == 1 and json.loads((saved[0] / "run.json").read_text())["status"] == "cancelled"
    assert 2 <= len((saved[0] / "trace" / "steps.csv").read_text().splitlines()) - 1 < 10_000


SERVER_KILLED_AT_ONCE = """
import sys
from app.active_run import WorkerProcess
w = WorkerProcess.spawn(dict(app=dict(runs_dir=sys.argv[1], warm_umap=False, demo_runs=False, device="cpu"),
                             setup=None, threads=1))
print(w.proc.pid, flush=True)
"""


def test_spare_of_a_server_killed_while_it_starts_exits(tmp_path):
    """The server dies before its spare worker has even imported (a pid-based watch would read the
    re-parented pid as its parent's and wait for a request forever): the spare exits by itself."""
    import subprocess
    import sys
    from conftest import ROOT
    server = subprocess.Popen([sys.executable, "-c", SERVER_KILLED_AT_ONCE + "import os; os.kill(os.getpid(), 9)",
                               str(tmp_path / "runs")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    spare = int(server.stdout.readline())
    server.wait(30)
    assert server.returncode == -signal.SIGKILL
    t0 = time.time()
    while time.time() - t0 < 90:
        try:
            os.kill(spare, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.kill(spare, signal.SIGKILL)
    pytest.fail("the spare worker of a killed server was still waiting 90 s later")


def test_peer_run_is_made_saved_listed_and_drawn_like_any_run(engine):
    """A peer scheme (here HQQ 2-bit, group 64) runs through the same worker path: saved with the
    library's own bit count, no packed model (re-made from the FP model, checked against that count),
    images, the runs table, the rate-distortion plot and runs side by side."""
    pytest.importorskip("hqq", reason="peer library hqq not installed (benchmarks/requirements-peers.txt)")
    from app import plots
    from app.config import app_methods
    from app.views import Views
    from vq4dit.naming import default_filter
    assert "hqq-w2-g64" in app_methods() and app_methods()[0] == "vq4dit"
    a = engine.start_run(request(method="hqq-w2-g64"))   # the form's bits, k and d are ignored by a peer
    wait(a)
    assert a.error is None and a.run_id, a.error
    meta = engine.store.meta(a.run_id)
    assert meta["method"] == "hqq-w2-g64" and meta["bits"] == 2 and meta["k"] is None and meta["status"] == "finished"
    lins = [m for n, m in engine.teacher.named_modules() if default_filter(m, n)]
    lins_names = [n for n, m in engine.teacher.named_modules() if default_filter(m, n)]
    n = sum(m.weight.numel() for m in lins)   # 2-bit codes + fp16 scale and zero per 64 weights + fp32 bias
    expect = sum(m.weight.numel() * (2 + 32 / 64) + 32 * m.out_features for m in lins) / n
    assert abs(meta["bits_per_weight"] - expect) < 1e-9
    assert not (engine.store.run_dir(a.run_id) / "model").exists() and run_dirs(engine) == [a.run_id]
    est = engine.estimate(engine.run_config(request(method="hqq-w2-g64")))  # the Set-up estimate: from this run
    assert est["peer"] and est["bits_per_weight"] == meta["bits_per_weight"]
    assert 0 < meta["block_mse"] and meta["metrics"]["image_mse"] > 0
    img = engine.run_images(a.run_id, [3, 5], seed=0, guidance=4.0, steps=2)   # the re-made model
    fp = engine.fp_images([3, 5], 0, 4.0, 2)
    assert img.shape == fp.shape and 0 < float((img - fp).pow(2).mean()) < 0.5
    table = engine.store.table()
    assert list(table["run"]) == [a.run_id] and table["bits/weight"].iloc[0] == pytest.approx(expect, abs=1e-3)
    fig = plots.rd_figure(table, a.run_id)
    assert any(a.run_id in list(t.customdata or []) for t in fig.data)
    note, _, side = Views(engine).side_by_side([a.run_id])
    assert list(side["method"]) == ["hqq-w2-g64"] and side["k x d"].iloc[0] == "-"
    from app.handlers import Handlers   # Set-up: picking the peer (any setting) selects its newest run
    out = Handlers(engine, Views(engine)).choose_setting("W3", "hqq-w2-g64")
    assert out[3]["value"] == a.run_id and "does not apply" in out[4]
    note, missing, _, _ = Views(engine).conflicts(dict(run=a.run_id, layer=lins_names[0]))
    assert "no codebooks" in note and missing is None   # no offer to run a codebook-only pair for it


def test_cancel_right_after_run_on_a_spare_is_a_cancelled_run(engine):
    """Run, then Cancel at once, while the spare is still importing: when it gets to its request,
    both the request and Cancel are there. The run ends as cancelled during k-means (nothing saved),
    not as a worker that exited without a word."""
    import multiprocessing as mp
    from app.engine import RunCancelled
    from app.worker import wait_for_request
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    stop.set()
    q.put({"method": "kmeans"})
    assert wait_for_request(q, stop) == {"method": "kmeans"}   # a sent request wins over Cancel
    assert wait_for_request(q, stop, last_s=0.2) is None       # retired with nothing sent
    engine.start_spare()
    a = engine.start_run(request())
    a.stop.set()
    wait(a)
    assert isinstance(a.error, RunCancelled) and "nothing saved" in str(a.error), a.error
    assert a.cancelled_in == "k-means init" and run_dirs(engine) == []
