#!/usr/bin/env bash
# The benchmark matrix on one CUDA GPU, a few processes sharing it.
#   main plan (seeds 3-5) one process per setting in MAIN_SETTINGS, ablations (seeds 0-2, block
#   MSE only) one process per setting in ABL_SETTINGS; each process stops at BUDGET seconds and
#   keeps every finished row. Results are merged into $OUT (or ./out/benchmarks/gpu when OUT is unset)
#   by benchmarks/bench_jobs.sh, which runs any such list of processes.
# Device machine: python3 there has torch; diffusers comes as wheels in .whl/ (see docs/scale.md).
set -uo pipefail
OUT=${OUT:-out/benchmarks/gpu}; mkdir -p "$OUT"
MAIN_SETTINGS=${MAIN_SETTINGS:-"W2 XL-sharing W3 W2-budget W4"}; ABL_SETTINGS=${ABL_SETTINGS:-"XL-sharing W2"}
JOBS=$(mktemp)
for s in $MAIN_SETTINGS; do echo "main_$s cuda --plan main --settings $s --seeds 3 4 5"; done >> "$JOBS"
for s in $ABL_SETTINGS; do echo "abl_$s cuda --plan ablations --settings $s --seeds 0 1 2"; done >> "$JOBS"
if [ "${SMOKE:-1}" != 0 ]; then  # fail fast: one tiny CUDA run of every code path the matrix uses
  echo "smoke cuda --quick --methods vq4dit-ste codebook-only --settings XL-sharing" > "$JOBS.smoke"
  BUDGET=120 bash "$(dirname "$0")/bench_jobs.sh" "$JOBS.smoke" "$OUT/smoke" || exit 1
  grep -q "^quick,XL-sharing,vq4dit-ste" "$OUT/smoke/bench_quick.csv" 2>/dev/null || { cat "$OUT/smoke/bench_logs_tail.txt"; exit 1; }
fi
bash "$(dirname "$0")/bench_jobs.sh" "$JOBS" "$OUT"
