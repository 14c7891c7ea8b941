#!/bin/bash
# Issue 19 finished-budget rows (one thread: two threads on the oversubscribed 2-core box starved) (see results/bench_budget.md). Resumable: rows in the CSV are skipped.
cd "$(dirname "$0")/.." && export PYTHONPATH=$PWD
B="nice -n 10 python -m vq4dit.bench --plan budget --out results/bench_budget.csv --fd-images 0 --threads 1"
$B --settings XL-sharing --methods codebook-only vq4dit --seeds 3 4 5
$B --settings XL-sharing --methods vq4dit-ref --seeds 3 4 5
$B --settings XL-sharing --methods vq4dit-ste-aa --seeds 3 4 5
$B --settings W2 --methods codebook-only vq4dit --seeds 3 4 5
$B --settings W2 --methods vq4dit-ref vq4dit-ste-aa --seeds 3 4 5
