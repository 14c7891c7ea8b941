import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository (pyproject's pytest pythonpath puts it on sys.path)
os.environ.setdefault("VQ4DIT_CACHE", "off")  # tests measure k-means itself, not a cache hit
# tiny ops: one thread avoids OpenMP wake-up overhead (35x faster on a busy 2-core box)
torch.set_num_threads(1)


def make_tiny_dit(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 32):
    """Small random DiT (hidden 64, 16 tokens) with non-zero adaLN so every layer matters."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(sample_size=8, in_channels=1, out_channels=1, patch_size=2,
                              num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                              num_embeds_ada_norm=10)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm1.linear" in n or "proj_out" in n:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()


@pytest.fixture
def tiny_dit_dir(tmp_path):
    from vq4dit.sampling import make_scheduler
    m = make_tiny_dit()
    d = tmp_path / "tiny-dit"
    m.save_pretrained(d / "transformer", safe_serialization=True)
    make_scheduler().save_pretrained(d / "scheduler")
    return d


from benchmarks.common import AppServer, CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402,F401  (app servers for tests)


def pytest_configure(config):
    config.addinivalue_line("markers", "core: library mechanics (no app, no browser): python -m pytest -m core tests")
    config.addinivalue_line("markers", "slow: minutes to hours on 2 cores (the full DiT-XL/2-shaped run); "
                                       "skipped unless selected with -m slow or VQ4DIT_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    """Slow tests run only when asked for: `-m slow` (or an -m expression naming it) or VQ4DIT_SLOW_TESTS=1."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("VQ4DIT_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or VQ4DIT_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- the CLI by subprocess (tests/unit/test_safety_cli.py, test_cli_outputs_and_interrupts.py) ---
CLI_ENV = dict(os.environ, VQ4DIT_CACHE="off", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def cli(*args, cwd=None, env=None):
    """`python -m vq4dit ARGS`; never a traceback on stderr."""
    r = subprocess.run([sys.executable, "-m", "vq4dit", *map(str, args)], cwd=cwd or ROOT, env=env or CLI_ENV,
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def error_line(r) -> str:
    """The one error line a failed CLI call printed."""
    lines = [l for l in r.stderr.splitlines() if l.startswith("error") or ": error:" in l]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]
