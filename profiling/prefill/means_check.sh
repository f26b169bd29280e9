#!/usr/bin/env bash
# GPU check of the block means from the quantizer kernel (kernels.interface.SELECT_FUSED_MEANS, quant/quant_kernel.py
# with_qmean) in one device call of <= ~9 minutes:
#   bash profiling/prefill/means_check.sh OUTDIR
# 1. tests/test_select_topk_gpu.py (select_and_mask from the quantizer's means == select_blocks, the public op bit for
#    bit with either source of means, the NaN-key fix of c7f997a) and the quantizer's bit-exactness tests (Kmean /
#    Qmean == block_means bit for bit); after step 2, with the time left, the other tests the change touches (the
#    quantizer's new argument: rotation, mse, the decode's prequantized query; the public entries);
# 2. profiling/prefill/quant_ab.py time (the 32k quantizer without and with the Q means), then
#    profiling/prefill/quick_bench.py with AB_MEANS=1 in fp16, then bf16 (B=1, H=32, D=128, causal, 32k, b=0.05; one
#    process per dtype, so its rows are a same-run A/B: as shipped, with the other source of means, as shipped again);
# 3. with what is left of TOTAL_S: profiling/prefill/bench.py (SWEEP=0, the issue's table) with MEANS=1 iff step 1
#    passed;
# 4. the decode seed replay of sessions 10/13 (-s: its numbers), if time is left.
# QAB_ARGS: extra NAME=PATH versions for quant_ab.py (e.g. the previous commit's copy).
# Everything goes to OUTDIR/means_check.log (+ the pytest logs and bench.json). Caps: TEST_S, QB_S, TOTAL_S seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?output folder}
mkdir -p "$OUT"
L=$OUT/means_check.log
PY=${PY:-python}
T0=$(date +%s)
el() { echo "t=$(( $(date +%s) - T0 ))s" | tee -a "$L"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$L"
git log --oneline -1 2>/dev/null | tee -a "$L"
timeout "${TEST_S:-150}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=8 -rf tests/test_select_topk_gpu.py \
  tests/test_prefill_gpu.py -k "topk or quant_kernel" > "$OUT/tests.log" 2>&1
rc=$?; echo "tests rc=$rc" | tee -a "$L"; tail -n 12 "$OUT/tests.log" | tee -a "$L"; el
MEANS=0  # on only if the tests ran (not skipped) and passed
[ $rc -eq 0 ] && grep -q " passed" "$OUT/tests.log" && ! grep -q " skipped" "$OUT/tests.log" && MEANS=1
timeout "${QAB_S:-80}" "$PY" profiling/prefill/quant_ab.py time ${QAB_ARGS:-} 2>&1 | grep "^quant" | tee -a "$L"; el
for dt in fp16 bf16; do
  AB_MEANS=1 DTYPE=$dt SIZES=32768 timeout "${QB_S:-110}" "$PY" profiling/prefill/quick_bench.py 2>&1 \
    | grep -v Warn | tee -a "$L"; el
done
LEFT=$(( ${TOTAL_S:-520} - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 40 ]; then  # the other tests the change touches (the quantizer's new argument, the public entries)
  timeout "$LEFT" "$PY" -m pytest -q -p no:cacheprovider --maxfail=8 -rf tests/test_prefill_gpu.py \
    tests/test_rotation.py tests/test_scale_rule.py -k "side_stream or public_entry or rotation_switch or prequantized \
    or quant_kernel_rotation or quant_kernel_mse" > "$OUT/tests2.log" 2>&1
  echo "tests2 rc=$?" | tee -a "$L"; tail -n 8 "$OUT/tests2.log" | tee -a "$L"; el
fi
LEFT=$(( ${TOTAL_S:-520} - ($(date +%s) - T0) - 75 ))
echo "bench.py with MEANS=$MEANS, ${LEFT}s left" | tee -a "$L"
if [ "$LEFT" -gt 110 ]; then
  OUT=$OUT MEANS=$MEANS SWEEP=0 timeout "$LEFT" "$PY" profiling/prefill/bench.py 2>&1 | grep -v Warn | tee -a "$L"
  el
fi
LEFT=$(( ${TOTAL_S:-520} - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 30 ]; then
  THRIFT_TEST_SEED=253370319 timeout "$LEFT" "$PY" -m pytest -q -s -x -p no:cacheprovider tests/test_decode_gpu.py \
    -k "bits_layout and cfg1" > "$OUT/decode_replay.log" 2>&1
  echo "decode replay rc=$?" | tee -a "$L"; grep -E "rel|assert|passed|failed" "$OUT/decode_replay.log" | tail -n 15 \
    | tee -a "$L"; el
fi
