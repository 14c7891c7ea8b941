"""W3 k-means on a subsample (256 points per codeword) vs full Lloyd on the embedded digits DiT,
seeds 1 and 2 (seed 0 is `python -m benchmarks.scale_bench --stages quality`). Prints only.

    python -m benchmarks.kmeans_subsample_w3_seeds
"""
import time

import torch

from vq4dit import method_config, quantize, quantized_layers
from vq4dit.io import load_dit
from vq4dit.naming import default_filter
from vq4dit.metrics import block_mse
from vq4dit.testbed import DIGITS_DIT_DIR


def main():
    torch.set_num_threads(1)
    teacher = load_dit(DIGITS_DIT_DIR).transformer
    ws = {n: m.weight.detach() for n, m in teacher.named_modules() if default_filter(m, n)}
    for seed in (1, 2):
        for ppc in (256, None):
            m = load_dit(DIGITS_DIT_DIR).transformer
            t = time.time()
            quantize(m, method_config("kmeans", bits=3, kmeans_iters=50, seed=seed, kmeans_points_per_codeword=ppc),
                     progress=False)
            secs = time.time() - t
            err = sum((q.weight - ws[n]).pow(2).sum().item() for n, q in quantized_layers(m).items())
            err /= sum(w.numel() for w in ws.values())
            print(f"W3 seed {seed} ppc {ppc}: weight MSE {err:.4e} block MSE {block_mse(m, teacher)['mean']:.4f} "
                  f"k-means {secs:.1f}s", flush=True)


if __name__ == "__main__":
    main()
