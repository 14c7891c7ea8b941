#!/usr/bin/env bash
# The issue-13 benchmark matrix on one CUDA GPU, a few processes sharing it.
#   main plan (seeds 3-5) one process per setting in MAIN_SETTINGS, ablations (seeds 0-2, block
#   MSE only) one process per setting in ABL_SETTINGS; each process stops at BUDGET seconds and
#   keeps every finished row. Results are merged into $OUT (or ./results/gpu when OUT is unset).
# Device machine: python3 there has torch; diffusers comes as wheels in .whl/ (see README).
set -uo pipefail
OUT=${OUT:-results/gpu}; mkdir -p "$OUT"
BUDGET=${BUDGET:-400}
MAIN_SETTINGS=${MAIN_SETTINGS:-"W2 XL-sharing W3 W2-budget W4"}; ABL_SETTINGS=${ABL_SETTINGS:-"XL-sharing W2"}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export VQ4DIT_CACHE=off OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/env.txt" 2>&1
# fail fast: one tiny CUDA run of every code path the matrix uses
[ "${SMOKE:-1}" = 0 ] || timeout 120 python3 -m vq4dit.bench --quick --device cuda --methods vq4dit-ste codebook-only --settings XL-sharing --out "$W/smoke.csv" > "$W/smoke.log" 2>&1 \
  || { cat "$W/smoke.log"; cp "$W/smoke.log" "$OUT/"; exit 1; }
t0=$(date +%s)
# One process per group: processes time-slice one GPU (no MPS), so a few beat many.
i=0
for s in $MAIN_SETTINGS; do
  timeout "$BUDGET" python3 -m vq4dit.bench --plan main --settings $s --seeds 3 4 5 --device cuda \
    --out "$W/main_$i.csv" > "$W/main_$i.log" 2>&1 &
  i=$((i + 1))
done
i=0
for s in $ABL_SETTINGS; do
  timeout "$BUDGET" python3 -m vq4dit.bench --plan ablations --settings $s --seeds 0 1 2 --device cuda \
    --out "$W/abl_$i.csv" > "$W/abl_$i.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "matrix wall: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
python3 - "$W" "$OUT" <<'PY'
import csv, glob, sys
w, out = sys.argv[1], sys.argv[2]
for name, pat in [("bench_main.csv", "main_?.csv"), ("bench_ablations.csv", "abl_?.csv"),
                  ("bench_main_conflicts.csv", "main_*_conflicts.csv"), ("bench_ablations_conflicts.csv", "abl_*_conflicts.csv")]:
    rows, cols = [], None
    for f in sorted(glob.glob(f"{w}/{pat}")):
        r = list(csv.DictReader(open(f)))
        if r:
            cols = cols or list(r[0])
            rows += r
    if cols:
        with open(f"{out}/{name}", "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=cols); wr.writeheader(); wr.writerows(rows)
    print(name, len(rows), "rows")
PY
tail -n 3 "$W"/*.log > "$OUT/bench_logs_tail.txt"
for f in "$OUT"/bench_main.csv "$OUT"/bench_ablations.csv; do [ -f "$f" ] && python3 -m vq4dit.bench report "$f" > "${f%.csv}_report.md"; done
ls -la "$OUT"
