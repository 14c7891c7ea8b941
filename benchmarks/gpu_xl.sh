#!/usr/bin/env bash
# DiT-XL/2 at scale on one CUDA GPU: writes the XL-shaped pipeline there (random weights,
# the Hub's layout), W2 k-means of all 196 block Linears, save + reload of the packed dir, a fixed
# number of calibration steps of `vq4dit` (soft phase) and `codebook-only` (all hard) in fp32 and
# bf16 autocast on the full 28 blocks, and FP vs packed sampling latency. Prints time per stage,
# peak RSS and peak GPU memory; writes $OUT/xl_scale_gpu.csv, its log and env.txt.
#   bash benchmarks/gpu_xl.sh                                # OUT=out/benchmarks/gpu_xl
#   OUT=$OUT CALIB_STEPS=10 SAMPLE_STEPS=50 bash benchmarks/gpu_xl.sh
#   DEVICE=cpu BLOCKS=2 CALIB_BLOCKS=2 KMEANS_ITERS=1 CALIB_STEPS=1 SAMPLE_STEPS=1 SAMPLE_BATCH=1 REPEATS=1 \
#     THREADS=1 STAGES="write load kmeans load_packed sample calib" OUT=/tmp/smoke bash benchmarks/gpu_xl.sh# CPU smoke
# Device machine: python3 has torch but no registry; diffusers comes as wheels in .whl/
# (git-ignored, carried with the tree; see docs/scale.md).
set -uo pipefail
OUT=${OUT:-out/benchmarks/gpu_xl}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export VQ4DIT_CACHE=off PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m benchmarks.scale_bench --device "$DEVICE" --blocks "${BLOCKS:-28}" --calib-blocks "${CALIB_BLOCKS:-28}" \
  --calib-steps "${CALIB_STEPS:-10}" --kmeans-iters "${KMEANS_ITERS:-100}" --sample-steps "${SAMPLE_STEPS:-50}" \
  --sample-batch "${SAMPLE_BATCH:-8}" --repeats "${REPEATS:-3}" --threads "${THREADS:-8}" \
  --work "${WORK:-/tmp/vq4dit-xl-work}" --stages ${STAGES:-write load kmeans load_packed sample calib digits quality} \
  --out "$OUT/xl_scale_gpu.csv" 2>&1 | grep -v "accelerate" | tee "$OUT/xl_scale_gpu.log"
rc=${PIPESTATUS[0]}
ls -la "$OUT"
exit "$rc"
