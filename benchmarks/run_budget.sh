#!/bin/bash
# Finished-budget rows (benchmarks/results/budget/NOTE.md): every method and its codebook-only pair at
# one step budget per setting where every layer switches by itself. One thread per process (two starved
# on the shared 2-core box); on a 2-core box run two shards side by side (--shard 0/2, 1/2, each into
# its own CSV, then `python -m benchmarks.bench merge A.csv B.csv --out ...`). Resumable: rows already
# in the CSV are skipped.
cd "$(dirname "$0")/.." || exit 1
R=benchmarks/results/budget
B="nice -n 10 python -m benchmarks.bench --fd-images 0 --threads 1"
# 1. at the small recipe's learning rates (budget.csv)
$B --plan budget --out $R/budget.csv --settings XL-sharing --methods codebook-only vq4dit --seeds 3 4 5
$B --plan budget --out $R/budget.csv --settings XL-sharing --methods vq4dit-ref --seeds 3 4 5
$B --plan budget --out $R/budget.csv --settings W2 --methods codebook-only vq4dit --seeds 3 4 5
$B --plan budget --out $R/budget.csv --settings W2 --methods vq4dit-ref --seeds 3 4 5
# 2. the lr grid on the tuning seed (block MSE only); `report` marks each method's pick = TUNED_LR
$B --plan sweep --out $R/sweep.csv --settings W2 XL-sharing --seeds 0
# 3. every method at its TUNED_LR, seeds 3-5 (rows of budget.csv with the same learning rates are copied)
$B --plan tuned --out $R/tuned.csv --reuse $R/budget.csv --settings W2 XL-sharing --seeds 3 4 5
