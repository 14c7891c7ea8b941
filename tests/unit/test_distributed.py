"""Data-parallel calibration (vq4dit.distributed, issue 12 item 5): 2 gloo ranks on CPU give the
model 1 process gives, with the same seed and total batch. Fails when the gradient all-reduce,
the batch split or the trajectory gather is wrong (each was broken once on purpose and caught)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port, make_tiny_dit
from vq4dit import distributed, method_config, quantize
from vq4dit.layers import VQLinear
from vq4dit.size import quantized_layers

pytestmark = pytest.mark.core

# fp32 codebooks: the comparison sees calibration itself, not fp16 storage rounding. 3 labels over
# 2 ranks: unequal shares (2 + 1). DDPM teacher: the per-step noise must not depend on the split.
# force_hard_at: every layer goes hard half-way, so the run takes discrete decisions on all ranks.
CONFIG = dict(method="vq4dit", bits=3, kmeans_iters=5, codebook_dtype="float32",
              calib=dict(iterations=2, num_sampling_steps=6, labels_per_iteration=3, teacher_sampler="ddpm",
                         lr_codebook=2e-3, force_hard_at=0.5, trace_every=1, seed=3))


def _calibrated(config: dict) -> dict:
    """Quantize + calibrate the tiny DiT; its codebooks, assignments and recorded statistics."""
    torch.set_num_threads(1)
    config = copy.deepcopy(config)
    student = make_tiny_dit(layers=2)
    teacher = copy.deepcopy(student)
    trace = quantize(student, method_config(config.pop("method"), **config), teacher=teacher, progress=False)
    layers = {n: m for n, m in quantized_layers(student).items() if isinstance(m, VQLinear)}
    return dict(codebook={n: m.codebook.detach().clone() for n, m in layers.items()},
                kmeans_codebook={n: torch.from_numpy(trace.snapshot(n, 0).codebook) for n in layers},
                kmeans_assignment={n: m.kmeans_assignment.clone() for n, m in layers.items()},
                assignment={n: m.assignment.clone() for n, m in layers.items()},
                steps=trace.steps[["loss", "block_loss", "l_r", "frozen_frac", "hard_layers"]].to_numpy().copy(),
                conflicts=trace.layer_stats()[["conflict_share", "coherence_mean"]].to_numpy().copy(),
                world_size=trace.meta["world_size"])


def _rank_worker(rank: int, world: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_calibrated(CONFIG), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ranks = mp.spawn(_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=False)
    one = _calibrated(CONFIG)  # while the two ranks start
    while not ranks.join():
        pass
    return one, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def test_two_ranks_give_the_one_rank_model(one_and_two_ranks):
    one, (two, _) = one_and_two_ranks
    assert one["world_size"] == 1 and two["world_size"] == 2
    # calibration moved every codebook far beyond the tolerance, so the comparison means something
    assert min(_rel(one["kmeans_codebook"][n], one["codebook"][n]) for n in one["codebook"]) > 1e-3
    worst = max(_rel(one["codebook"][n], two["codebook"][n]) for n in one["codebook"])
    assert worst <= 1e-5, f"codebooks differ by {worst:.2e} relative"
    changed = sum(int((one["assignment"][n] != one["kmeans_assignment"][n]).sum()) for n in one["assignment"])
    assert changed > 0  # calibration re-assigned sub-vectors
    differ = sum(int((one["assignment"][n] != two["assignment"][n]).sum()) for n in one["assignment"])
    total = sum(a.numel() for a in one["assignment"].values())
    assert differ <= 0.001 * total, f"{differ} of {total} assignments differ"
    # the recorded statistics are the full batch's: losses, freezing, conflict
    torch.testing.assert_close(torch.tensor(two["steps"]), torch.tensor(one["steps"]), rtol=1e-5, atol=1e-8)
    got, want = torch.tensor(two["conflicts"]).T, torch.tensor(one["conflicts"]).T
    # conflict share counts gradients against their codeword's sum: a cosine near 0 may flip sign
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-3, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_ranks_hold_identical_models(one_and_two_ranks):
    _, (r0, r1) = one_and_two_ranks
    for n in r0["codebook"]:
        assert torch.equal(r0["codebook"][n], r1["codebook"][n]) and torch.equal(r0["assignment"][n], r1["assignment"][n])


def test_rows_split_a_batch_exactly(monkeypatch):
    assert distributed.world_size() == 1 and distributed.rows(5) == slice(0, 5)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.rows(5))
    assert shares == [slice(0, 2), slice(2, 4), slice(4, 5)]  # contiguous, sizes differ by at most one
    with pytest.raises(ValueError, match="cannot be split over 3"):
        distributed.rows(2)


def test_torchrun_cli_writes_once_and_matches_one_process(tiny_dit_dir, tmp_path):
    """`torchrun -m vq4dit quantize` with 2 processes: one output (rank 0's) equal to a plain run's."""
    from vq4dit.__main__ import main
    from vq4dit.io import load_dit

    flags = ["quantize", "--model", str(tiny_dit_dir), "--method", "vq4dit", "--bits", "3", "--kmeans-iters", "5",
             "--iterations", "2", "--sampling-steps", "4", "--labels-per-iteration", "4",
             "--lr-codebook", "2e-3", "--device", "cpu"]
    assert main(flags + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vq4dit", *flags, "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [line for line in run.stdout.splitlines() if line.strip() == "{"]
    assert len(summaries) == 1  # only rank 0 reports (and writes)
    assert json.loads(run.stdout[run.stdout.index("{"):])["out"] == str(tmp_path / "two")
    one = quantized_layers(load_dit(tmp_path / "one").transformer)
    two = quantized_layers(load_dit(tmp_path / "two").transformer)
    for n, m in one.items():
        # fp16 storage: the codebooks agree to within one rounding step of the stored values
        torch.testing.assert_close(two[n].codebook, m.codebook, rtol=1e-3, atol=1e-6)
        assert (two[n].assignment != m.assignment).float().mean() <= 0.001
