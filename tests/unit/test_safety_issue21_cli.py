"""Issue 21, command line (subprocess): no output that destroys an input, a finished calibration survives
an interrupt, one-line errors naming the file."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

ENV = dict(os.environ, VQ4DIT_CACHE="off", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def cli(*args, cwd=None, env=None):
    r = subprocess.run([sys.executable, "-m", "vq4dit", *map(str, args)], cwd=cwd or ROOT, env=env or ENV,
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def error_line(r) -> str:
    lines = [l for l in r.stderr.splitlines() if l.startswith("error") or ": error:" in l]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


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
