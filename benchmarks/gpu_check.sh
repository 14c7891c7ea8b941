#!/usr/bin/env bash
# The device check of issue 20, in one run of a few minutes on one CUDA GPU (never part of CI):
#   1. the CUDA tests (tests/unit/test_cuda.py; they skip without a GPU)
#   2. digits W2 calibration, default method, small recipe: fp32 and bf16 autocast (gpu_check digits)
#   3. XL/2-wide calibration steps, vq4dit and codebook-only, fp32 and bf16 (scale_bench calib) and
#      the reference budget projected from them (gpu_check project)
#   4. FP vs packed sampling latency and peak GPU memory, compact and cached runtime (runtime_memory)
#   5. the app started with --device cuda, one calibration driven through gradio_client (gpu_check app)
# Every part writes its CSV under $OUT; a failing part is logged and the others still run.
#   OUT=$OUT bash benchmarks/gpu_check.sh                                        # on the device machine
#   DEVICE=cpu BLOCKS=1 CALIB_BLOCKS=1 CALIB_STEPS=2 KMEANS_ITERS=1 DIGITS_ITERS=1 DIGITS_KMEANS_ITERS=2 SAMPLE_STEPS=1 REPEATS=1 \
#     OUT=benchmarks/results/speed/gpu_check_cpu_smoke bash benchmarks/gpu_check.sh    # CPU smoke
# Device machine: python3 has torch but no registry; diffusers comes as wheels in .whl/ (as gpu_xl.sh).
set -uo pipefail
OUT=${OUT:-out/benchmarks/gpu_check}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/vq4dit-gpu-check}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export VQ4DIT_CACHE=off PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())";
  uptime; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
part() {  # part NAME CMD...: run, time, log; remember a failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.log" | grep -v "torchao\|Enum subclass"
  [ "$rc" -eq 0 ] || status=1
}
part cuda_tests python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_runtime_modes.py
part digits python3 -m benchmarks.gpu_check digits --device "$DEVICE" ${DIGITS_ITERS:+--iterations $DIGITS_ITERS} \
  ${DIGITS_KMEANS_ITERS:+--kmeans-iters $DIGITS_KMEANS_ITERS} \
  --out "$OUT/digits_calib.csv"
part xl_calib python3 -m benchmarks.scale_bench --device "$DEVICE" --blocks "${CALIB_BLOCKS:-28}" \
  --calib-blocks "${CALIB_BLOCKS:-28}" --calib-steps "${CALIB_STEPS:-6}" --kmeans-iters "${KMEANS_ITERS:-2}" \
  --threads "${THREADS:-8}" --work "$WORK/scale" --stages write calib --out "$OUT/xl_calib.csv"
part xl_projection python3 -m benchmarks.gpu_check project --scale-csv "$OUT/xl_calib.csv" --device "$DEVICE" \
  --out "$OUT/xl_projection.csv"
part runtime python3 -m benchmarks.runtime_memory --device "$DEVICE" --blocks "${BLOCKS:-28}" \
  --steps "${SAMPLE_STEPS:-50}" --repeats "${REPEATS:-3}" --threads "${THREADS:-8}" --work "$WORK/runtime" \
  --out "$OUT/runtime_memory.csv"
part app python3 -m benchmarks.gpu_check app --device "$DEVICE" --out "$OUT/app.csv"
ls -la "$OUT"
exit "$status"
