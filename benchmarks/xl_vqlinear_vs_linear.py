"""One XL/2 MLP layer (1152 -> 4608) on 512 tokens: nn.Linear vs a hard VQLinear (W2) with its
decoded-weight cache, interleaved, best of 10. Prints only.

    OMP_NUM_THREADS=1 python -m benchmarks.xl_vqlinear_vs_linear
"""
import time

import torch

from vq4dit import VQLinear, method_config


def main():
    torch.set_num_threads(1)
    lin = torch.nn.Linear(1152, 4608)
    q = VQLinear.from_linear(lin, method_config("kmeans", bits=2, kmeans_iters=1)).eval()
    x = torch.randn(512, 1152)  # (tokens, in)
    with torch.no_grad():
        q(x), lin(x)  # warm-up: the VQLinear decodes its weight once here
        t_lin = t_vq = float("inf")
        for _ in range(10):
            t = time.time()
            lin(x)
            t_lin = min(t_lin, time.time() - t)
            t = time.time()
            q(x)
            t_vq = min(t_vq, time.time() - t)
    print(f"nn.Linear {t_lin:.4f} s, VQLinear (cached) {t_vq:.4f} s, ratio {t_vq / t_lin:.3f}")


if __name__ == "__main__":
    main()
