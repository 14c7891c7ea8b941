#!/usr/bin/env bash
# Run a list of benchmark processes at once and merge what they finished.
#   BUDGET=470 bash benchmarks/bench_jobs.sh JOBS_FILE [OUT_DIR]
# JOBS_FILE: one process per line, "NAME DEVICE ARGS..." (# comments allowed), e.g.
#   w3   cuda --plan main --settings W3 --methods codebook-only vq4dit-ste --seeds 3 4 5
#   abl1 cpu  --plan ablations --settings XL-sharing --seeds 1 --labels codebook-only
# cuda lines share the GPU (they time-slice it: a few processes, not many); cpu lines get one
# thread each. Every process stops at BUDGET seconds and keeps each finished row (the bench
# writes its CSV per row). OUT_DIR gets bench_main.csv / bench_ablations.csv (+ _conflicts),
# env.txt, the logs' tails and raw.tar.gz (every per-process CSV and log).
set -uo pipefail
JOBS=${1:?usage: bench_jobs.sh JOBS_FILE [OUT_DIR]}
OUT=${2:-${OUT:-out/benchmarks/bench_jobs}}; mkdir -p "$OUT"
BUDGET=${BUDGET:-400}
if [ -d .whl ]; then  # device machine: diffusers travels as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export VQ4DIT_CACHE=off OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU";
  echo "cpus: $(nproc --all)"; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)";
  echo "BUDGET=$BUDGET"; grep -v '^\s*#' "$JOBS" | grep -v '^\s*$'; } > "$OUT/env.txt" 2>&1
t0=$(date +%s)
while read -r name dev args; do
  case "$name" in ''|\#*) continue ;; esac
  extra=""; [ "$dev" = cpu ] && extra="--threads 1"
  # shellcheck disable=SC2086  # args is a word list on purpose
  eval "timeout $BUDGET python3 -m benchmarks.bench $args --device $dev $extra --out $W/$name.csv" > "$W/$name.log" 2>&1 &
done < "$JOBS"
wait
echo "wall: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
python3 -m benchmarks.bench merge --by-plan "$OUT" "$W"/*.csv   # bench_<plan>.csv (+ _conflicts), first row wins
tail -n 4 "$W"/*.log > "$OUT/bench_logs_tail.txt"
tar -czf "$OUT/raw.tar.gz" -C "$W" .
ls -la "$OUT"   # 7 files at most, what a device call brings back; tables: python -m benchmarks.bench report CSV
