"""Paired A/B of one soft VQLinear calibration step (n = 2, STE forward as in vq4dit-ste-aa):
forward + backward + freezing check, old ratio path (assignment_ratios()[:, :1], (S, 2) max) vs the
new one (VQLinear.first_ratio, max(p, 1 - p)); identical values (checked here), timed interleaved
A B A B ... so machine load hits both alike.

    python -m benchmarks.vq_step_ab --out benchmarks/results/speed/vq_step_ab.csv
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from vq4dit.layers import VQLinear, ratio_softmax


def old_first_ratio(self):
    return self.assignment_ratios()[:, :1]


@torch.no_grad()
def old_freeze(self, freeze_threshold, hard_threshold):
    r = ratio_softmax(self.logits, self.temperature)
    self.frozen_mask |= r.max(1).values > freeze_threshold
    return False


def make_layer(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = VQLinear(in_f, out_f, 256, 4, bias=True, codebook_dtype="float32")
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    with torch.no_grad():
        q.codebook.copy_(w.reshape(-1, 4)[torch.randperm(w.numel() // 4, generator=g)[:256]])
    q.assignment.copy_(torch.cdist(w.reshape(-1, 4), q.codebook.detach()).argmin(1))
    q.init_soft(w)
    q.hard_forward = True
    q.frozen_mask[: q.num_subvectors // 3] = True  # a third frozen, as mid-calibration
    q.logits.requires_grad_(True)
    q.codebook.requires_grad_(True)
    return q, torch.randn(64, in_f, generator=g)


def step(q, x):
    q.logits.grad = q.codebook.grad = None
    y = q(x)
    y.square().mean().backward()
    q.freeze_confident(0.99, 0.99)
    return y.detach(), q.logits.grad.clone(), q.codebook.grad.clone()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[1536, 384], help="layer (out, in): digits fc1")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="out/benchmarks/vq_step_ab.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.bench import machine_name, write_csv
    new_fr, new_fz = VQLinear.first_ratio, VQLinear.freeze_confident
    impl = {"old": (old_first_ratio, old_freeze), "new": (new_fr, new_fz)}
    times, outs = {k: [] for k in impl}, {}
    load0 = os.getloadavg()[0]
    for r in range(a.repeats + 1):
        for name, (fr, fz) in impl.items():
            VQLinear.first_ratio, VQLinear.freeze_confident = fr, fz
            q, x = make_layer(*a.shape)
            t = time.perf_counter()
            out = step(q, x)
            if r:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t)
            outs[name] = out
    VQLinear.first_ratio, VQLinear.freeze_confident = new_fr, new_fz
    same = all(torch.equal(u, v) for u, v in zip(outs["old"], outs["new"]))
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    load = round(max(load0, os.getloadavg()[0]), 2)
    rows = [dict(what=f"{k} step median ({a.shape[0]}x{a.shape[1]}, d=4, k=256)", value=statistics.median(v), unit="s")
            for k, v in times.items()]
    rows += [dict(what="new / old, median of paired ratios", value=statistics.median(ratios), unit="x"),
             dict(what="outputs and gradients identical", value=float(same), unit="bool")]
    for r in rows:
        r.update(load_avg=load, machine=machine_name("cpu"), repeats=a.repeats)
        print(f"{r['what']:55s} {r['value']:.4g} {r['unit']}  (load {load})")
    write_csv(rows, a.out, ["what", "value", "unit", "repeats", "load_avg", "machine"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
