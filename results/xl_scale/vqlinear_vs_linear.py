"""One XL/2 MLP layer (1152 -> 4608) on 512 tokens: nn.Linear vs a hard VQLinear (W2) with its
decoded-weight cache, interleaved, best of 10.  Run from the repository root:
    OMP_NUM_THREADS=1 python results/xl_scale/vqlinear_vs_linear.py"""
import sys
import time

import torch

sys.path.insert(0, ".")
from vq4dit import method_config  # noqa: E402
from vq4dit.layers import VQLinear# noqa: E402

torch.set_num_threads(1)
lin = torch.nn.Linear(1152, 4608)
q = VQLinear.from_linear(lin, method_config("kmeans", bits=2, kmeans_iters=1)).eval()
x = torch.randn(512, 1152)
with torch.no_grad():
    q(x), lin(x)
    t_lin = t_vq = float("inf")
    for _ in range(10):
        t = time.time(); lin(x); t_lin = min(t_lin, time.time() - t)
        t = time.time(); q(x); t_vq = min(t_vq, time.time() - t)
print(f"nn.Linear {t_lin:.4f} s, VQLinear (cached) {t_vq:.4f} s, ratio {t_vq / t_lin:.3f}")
