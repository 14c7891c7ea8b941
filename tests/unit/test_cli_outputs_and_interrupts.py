"""Command line (subprocess): no output that destroys an input, a finished calibration survives
an interrupt, one-line errors naming the file."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CLI_ENV, ROOT, cli, error_line  # noqa: F401

ENV = CLI_ENV


SAMPLE = ("--labels", "0", "--steps", "1", "--device", "cpu")


# -- item 4: sample --out never replaces an input, names its format ---------------------------

def test_sample_out_never_replaces_the_model_or_an_existing_file(tiny_dit_dir, tmp_path):
    weights = tiny_dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    for extra in ((), ("--overwrite",)):
        r = cli("sample", "--model", tiny_dit_dir, "--out", weights, *SAMPLE, *extra)
        assert r.returncode == 2 and "inside the model directory" in error_line(r)
        r = cli("sample", "--model", tiny_dit_dir, "--out", tiny_dit_dir / "grid.png", *SAMPLE, *extra)
        assert r.returncode == 2 and "inside the model directory" in error_line(r)
    assert weights.read_bytes() == before
    old = tmp_path / "grid.png"
    old.write_bytes(b"my old picture")
    r = cli("sample", "--model", tiny_dit_dir, "--out", old, *SAMPLE)
    assert r.returncode == 2 and "already exists" in error_line(r) and "--overwrite" in error_line(r)
    assert old.read_bytes() == b"my old picture"
    link = tmp_path / "link.png"
    link.symlink_to(old)
    r = cli("sample", "--model", tiny_dit_dir, "--out", link, *SAMPLE, "--overwrite")
    assert r.returncode == 2 and "symbolic link" in error_line(r)
    r = cli("sample", "--model", tiny_dit_dir, "--out", old, *SAMPLE, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert old.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_writes_the_format_its_extension_names(tiny_dit_dir, tmp_path):
    r = cli("sample", "--model", tiny_dit_dir, "--out", tmp_path / "grid.jpg", *SAMPLE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "grid.jpg").read_bytes()[:3] == b"\xff\xd8\xff"      # JPEG, not PNG bytes named .jpg
    for name in ("grid.txt", "grid", "grid.safetensors"):
        r = cli("sample", "--model", tiny_dit_dir, "--out", tmp_path / name, *SAMPLE)
        assert r.returncode == 2 and "image format" in error_line(r), name
        assert not (tmp_path / name).exists()


# -- item 5: an interrupt after calibration finished keeps the model and the trace --------------

def _quantize_main(tiny_dit_dir, out):
    from vq4dit.__main__ import main
    return main(["quantize", "--model", str(tiny_dit_dir), "--out", str(out), "--iterations", "1",
                 "--sampling-steps", "2", "--kmeans-iters", "2", "--device", "cpu"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_eval_keeps_the_calibration(tiny_dit_dir, tmp_path, monkeypatch, capsys, sig):
    import vq4dit.metrics as metrics
    from vq4dit.io import load_quantized
    from vq4dit.trace import Trace

    def interrupted_eval(*a, **k):
        os.kill(os.getpid(), sig)  # a real signal, delivered while the block MSE is computed
        time.sleep(5)
        raise AssertionError("the signal did not interrupt the evaluation")
    monkeypatch.setattr(metrics, "block_mse", interrupted_eval)
    out = tmp_path / "w2"
    rc = _quantize_main(tiny_dit_dir, out)
    err = capsys.readouterr().err
    assert rc == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "during the block-MSE evaluation" in err and f"model and its calibration trace were written to {out}" in err
    assert "nothing written" not in err
    assert load_quantized(out).transformer is not None
    tr = Trace.load(out / "trace")
    assert tr.meta["steps_done"] >= 1 and len(tr.steps) == tr.meta["steps_done"]


def test_sigterm_while_saving_finishes_the_save(tiny_dit_dir, tmp_path, monkeypatch, capsys):
    from vq4dit.io import load_quantized
    from vq4dit.trace import Trace
    real_save = Trace.save

    def save_then_signal(self, path, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of save_quantized
        return real_save(self, path, *a, **k)
    monkeypatch.setattr(Trace, "save", save_then_signal)
    out = tmp_path / "w2"
    rc = _quantize_main(tiny_dit_dir, out)
    err = capsys.readouterr().err
    assert rc == 143 and "terminated (SIGTERM) while saving" in err and "were written to" in err, err[-2000:]
    assert load_quantized(out).transformer is not None and Trace.load(out / "trace").meta["steps_done"] >= 1
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGTERM) is not None


# -- items 10, 11: outputs checked at start, one-line errors naming the file ------------------------

def test_out_under_a_file_and_busy_out_fail_at_start(tiny_dit_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = cli("quantize", "--model", tiny_dit_dir, "--out", blocker / "w2", "--method", "rtn", "--no-eval")
    line = error_line(r)
    assert r.returncode == 2 and f"{blocker} is a file, not a directory" in line and "File exists" not in line
    # a second run on the same --out while the first still works: refused before loading anything
    out = tmp_path / "w2"
    (tmp_path / ".w2.vq4dit-lock").write_text(str(os.getpid()))          # a live process holds OUT
    t = time.time()
    r = cli("quantize", "--model", tiny_dit_dir, "--out", out, "--method", "rtn", "--no-eval")
    assert r.returncode == 2 and f"(pid {os.getpid()}) is writing {out}" in error_line(r)
    assert "load" not in r.stderr.lower() and not out.exists()
    # the lock of a dead process is taken over, and released at the end
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".w2.vq4dit-lock").write_text(str(dead.pid))
    r = cli("quantize", "--model", tiny_dit_dir, "--out", out, "--method", "rtn", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_dir() and not (tmp_path / ".w2.vq4dit-lock").exists()
    assert time.time() - t < 600


def test_disk_full_during_save_is_one_line(tiny_dit_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch as st
    from vq4dit.__main__ import main

    class SafetensorError(Exception):  # what safetensors raises on ENOSPC
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(st, "save_file", full)
    out = tmp_path / "w2"
    rc = main(["quantize", "--model", str(tiny_dit_dir), "--out", str(out), "--method", "rtn", "--no-eval"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: could not write {out}") and "disk full" in err[0]
    assert not out.exists() and [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


def test_app_runs_dir_that_is_a_file_fails_before_loading(tmp_path):
    f = tmp_path / "runs"
    f.write_text("x")
    from conftest import free_port
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--runs-dir", str(f), "--port", str(free_port())], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith("error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(lines) == 1 and f"{f} is a file, not a directory" in lines[0], r.stderr[-1000:]
