"""W2 k-means (k=256, d=4, 100 Lloyd iterations) of the 7 Linears of one XL/2-shaped block, one
thread, timed per layer; extrapolated to 28 blocks. Prints only (a probe, no CSV).

    python -m benchmarks.xl_kmeans_one_block
"""
import time

import torch

from vq4dit import kmeans
from vq4dit.naming import default_filter
from vq4dit.testbed.xl import make_xl_transformer

from benchmarks.common import load_avg


def main():
    torch.set_num_threads(1)
    model = make_xl_transformer(num_layers=1)
    total = 0.0
    for name, lin in model.named_modules():
        if default_filter(lin, name):
            x = lin.weight.detach().reshape(-1, 4)  # (S, d) sub-vectors
            t = time.time()
            kmeans(x, 256, 100, seed=0)
            dt = time.time() - t
            total += dt
            print(f"{name} {tuple(lin.weight.shape)} S={len(x)} {dt:.2f}s load={load_avg():.1f}", flush=True)
    print(f"one block (7 layers) {total:.1f}s -> x28 = {total * 28 / 60:.1f} min (1 thread)", flush=True)


if __name__ == "__main__":
    main()
