"""Data-parallel calibration on torch.distributed: the few collective operations it needs.

    torchrun --nproc_per_node 2 -m vq4dit quantize --out out/w2    # 2 processes, one model

Every rank draws the whole batch's labels and noise from the same seed and keeps its rows
(`rows`), so the run does not depend on how a batch is split. Gradients of every trained
parameter and the recorded statistics are summed with per-rank weights n_rank / N (the mean
over the full batch); discrete decisions then see identical parameters on every rank. Without
a process group (plain `python -m vq4dit`) every helper is the identity: world size 1, rank 0.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: Optional[torch.device] = None) -> Optional[torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT): NCCL for
    CUDA, gloo for CPU. Returns this rank's device (cuda:LOCAL_RANK for CUDA), or `device`
    unchanged when not launched with WORLD_SIZE > 1 or the group already exists."""
    if not launched_by_torchrun() or is_initialized():
        return device
    cuda = device is not None and device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown():
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Only the main rank writes outputs, traces and progress."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------
# The batch split
# ----------------------------------------------------------------------------------------


def rows(n: int) -> slice:
    """This rank's contiguous share of a batch of n (sizes differ by at most one)."""
    r, w = rank(), world_size()
    if n < w:
        raise ValueError(f"a batch of {n} labels cannot be split over {w} processes: "
                         f"use --labels-per-iteration >= {w} or fewer processes")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


# ----------------------------------------------------------------------------------------
# Reductions: weighted sums, so unequal shares still give the full-batch mean
# ----------------------------------------------------------------------------------------


def all_reduce_mean_grads(params: Iterable[torch.Tensor], weight: float):
    """grad <- sum over ranks of weight_rank * grad_rank, for every parameter that has a grad
    (`weight` = this rank's share of the batch, n_rank / N). One flat all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(values: torch.Tensor, weight: float) -> torch.Tensor:
    """sum over ranks of weight_rank * values (a new tensor); identity on one process."""
    if world_size() == 1:
        return values
    out = values.detach() * weight
    dist.all_reduce(out)
    return out


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when `flag` is True on any (stop requests, time budgets)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, src: int = 0):
    """Copy every parameter and buffer of `module` from rank `src` (identical start on all ranks)."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def check_same_on_all_ranks(tensors: Iterable[torch.Tensor], what: str):
    """Raise on every rank when `tensors` differ between ranks (compared by a float64 checksum)."""
    if world_size() == 1:
        return
    tensors = list(tensors)
    s = torch.stack([t.double().sum() + (t.double().reshape(-1) * torch.arange(
        t.numel(), device=t.device, dtype=torch.float64).remainder(7)).sum() for t in tensors])
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"data-parallel calibration diverged: {what} differ between ranks")
