#!/bin/bash
# Finished-budget rows (benchmarks/results/budget/NOTE.md): every method and its codebook-only pair at
# one step budget per setting where every layer switches by itself. One thread (two starved on the
# shared 2-core box). Resumable: rows already in the CSV are skipped.
cd "$(dirname "$0")/.." || exit 1
B="nice -n 10 python -m benchmarks.bench --plan budget --out benchmarks/results/budget/budget.csv --fd-images 0 --threads 1"
$B --settings XL-sharing --methods codebook-only vq4dit --seeds 3 4 5
$B --settings XL-sharing --methods vq4dit-ref --seeds 3 4 5
$B --settings XL-sharing --methods vq4dit-ste-aa --seeds 3 4 5
$B --settings W2 --methods codebook-only vq4dit --seeds 3 4 5
$B --settings W2 --methods vq4dit-ref vq4dit-ste-aa --seeds 3 4 5
