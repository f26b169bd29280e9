#!/usr/bin/env bash
# GPU re-check of the selection's CuTe top-k (kernels/select_topk.py, the public op's default since session 13) and
# of the side stream's options, in one device call of <= ~6 minutes (bf16 and fp16, B=1, H=32, D=128, causal, 32k,
# b=0.05):
#   bash profiling/prefill/topk_check.sh OUTDIR
# 1. pytest tests/test_select_topk_gpu.py (bit-equality with select_blocks + selection_bitmask, and the public op);
# 2. profiling/prefill/quick_bench.py with AB_TOPK=1 AB_PRIO=1 in bf16, then fp16: SDPA-flash, quant+prefill and end
#    to end as shipped, with the other top-k (torch's sort), in order, and with the side stream at priority -1 (one
#    process each, so the rows of one dtype are a same-run A/B);
# 3. with what is left of TOTAL_S: profiling/prefill/bench.py (SWEEP=0, the issue's table) with the CuTe top-k iff
#    step 1 passed (TOPK=1), else torch's (TOPK=0).
# Everything goes to OUTDIR/topk_check.log (+ the pytest log and bench.json). Caps: TEST_S, QB_S, TOTAL_S seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?output folder}
mkdir -p "$OUT"
L=$OUT/topk_check.log
PY=${PY:-python}
T0=$(date +%s)
el() { echo "t=$(( $(date +%s) - T0 ))s" | tee -a "$L"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$L"
timeout "${TEST_S:-150}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=5 -rf tests/test_select_topk_gpu.py \
  > "$OUT/topk_tests.log" 2>&1
rc=$?; echo "topk tests rc=$rc" | tee -a "$L"; tail -n 5 "$OUT/topk_tests.log" | tee -a "$L"; el
TOPK=0  # on only if the tests ran (not skipped) and passed
[ $rc -eq 0 ] && grep -q " passed" "$OUT/topk_tests.log" && ! grep -q " skipped" "$OUT/topk_tests.log" && TOPK=1
for dt in bf16 fp16; do
  AB_PRIO=1 AB_TOPK=1 DTYPE=$dt SIZES=32768 timeout "${QB_S:-130}" "$PY" profiling/prefill/quick_bench.py 2>&1 \
    | grep -v Warn | tee -a "$L"; el
done
LEFT=$(( ${TOTAL_S:-360} - ($(date +%s) - T0) ))
echo "bench.py with TOPK=$TOPK, ${LEFT}s left" | tee -a "$L"
if [ "$LEFT" -gt 100 ]; then
  OUT=$OUT TOPK=$TOPK SWEEP=0 timeout "$LEFT" "$PY" profiling/prefill/bench.py 2>&1 | grep -v Warn | tee -a "$L"
  el
fi
