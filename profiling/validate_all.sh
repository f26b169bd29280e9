#!/bin/bash
# One-call GPU validation of main (H100/H200 through the device tool; ~8 minutes):
#   source .gpu-bundle/activate.sh; bash profiling/validate_all.sh
# Phase A (parallel processes): every GPU test (prefill split by config, decode, codecs) and compute-sanitizer
# memcheck + racecheck on a small prefill and a small decode case.  Phase B (GPU otherwise idle): the prefill
# benchmark (profiling/prefill/bench.py; it compiles first, then waits for phase A) and the decode benchmark.
# Everything lands in $OUT/validate.tar.gz (the device tool returns at most 8 files) plus $OUT/summary.txt.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
W=$(mktemp -d)
nvidia-smi -L > $W/device.txt; date -u >> $W/device.txt
python -c "import torch,cutlass;print(torch.__version__, torch.cuda.get_device_name(), cutlass.__version__)" >> $W/device.txt 2>&1
FLAG=$W/.tests_done
python profiling/prefill/bench.py $FLAG > $W/prefill_bench.log 2>&1 &
BENCH=$!
pids=()
for sel in fp16_d64_causal fp16_d64_full fp16_d128_causal fp16_d128_full bf16_d64_causal bf16_d64_full bf16_d128_causal bf16_d128_full \
           test_prefill_long_32k test_prefill_sync_mma_long_32k test_prefill_schedules test_prefill_mqa_fully_masked_rows test_public_entry_and_compile \
           test_quant_kernel_bit_exact test_prefill_small_kv_magnitude test_prefill_ws_long_32k test_prefill_ws_shapes; do
  timeout 400 python -m pytest -q -p no:cacheprovider -s tests/test_prefill_gpu.py -k "$sel" > $W/t_prefill_$sel.log 2>&1 & pids+=($!)
done
timeout 400 python -m pytest -q -p no:cacheprovider -rfE -s tests/test_decode_gpu.py > $W/t_decode.log 2>&1 & pids+=($!)
timeout 400 python -m pytest -q -p no:cacheprovider -rfE -s -m gpu tests/test_codecs.py > $W/t_codecs.log 2>&1 & pids+=($!)
# the other GPU-marked files (rotation / scale-rule lever tests, the transformers backend on the kernels)
for f in $(grep -l "mark.gpu\|pytestmark = pytest.mark.gpu" tests/test_*.py); do
  case $f in tests/test_prefill_gpu.py|tests/test_decode_gpu.py|tests/test_codecs.py) continue ;; esac
  timeout 400 python -m pytest -q -p no:cacheprovider -rfE -s -m gpu $f > $W/t_$(basename $f .py).log 2>&1 & pids+=($!)
done
for tool in memcheck racecheck; do
  (timeout 300 compute-sanitizer --tool $tool --report-api-errors no python profiling/prefill/sanitize_case.py > $W/prefill_$tool.log 2>&1) & pids+=($!)
  (timeout 300 compute-sanitizer --tool $tool --report-api-errors no --kernel-name kns=Thrift \
     python profiling/decode_sanitize_case.py > $W/decode_$tool.log 2>&1) & pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
echo "phase A done $(date -u)" >> $W/device.txt
touch $FLAG; wait $BENCH
if [ "${SKIP_DECODE_BENCH:-0}" != 1 ]; then  # SKIP_DECODE_BENCH=1: no decode timing (e.g. no decode code changed)
  timeout 280 python -m kernels.decode_bench --out $W/decode_bench.json --ctas-per-sm 8 10 --schedules "work=static" --no-fa4 \
    > $W/decode_bench.log 2>&1
fi
echo "phase B done $(date -u)" >> $W/device.txt
# Phase C: Nsight Compute --set full of one split-KV decode launch, B=1, L=128k, budget 0.05 (the issue-4 goal shape)
if [ "${SKIP_NCU:-0}" != 1 ]; then
  OUTDIR=$W/ncu timeout 300 bash profiling/ncu/run.sh full thrift-decode-f0.05 1,1,131072,32,8,128 decode \
    > $W/ncu_decode.log 2>&1
  for r in $W/ncu/*.ncu-rep; do [ -f "$r" ] && ncu --import "$r" --page details > ${r%.ncu-rep}.details.txt 2>&1; done
  echo "phase C done $(date -u)" >> $W/device.txt
fi
{
  echo "== device"; cat $W/device.txt
  echo "== test results (file: last line)"
  for f in $W/t_*.log; do echo "$(basename $f): $(grep -E 'passed|failed|error' $f | tail -1)"; done
  echo "worst prefill relL2: $(grep -ho 'relL2=[0-9.e+-]*' $W/t_prefill_*.log | cut -d= -f2 | sort -g | tail -1)"
  echo "worst decode rel L2: $(grep -h 'rel L2' $W/t_decode.log | sed 's/.*rel L2 \([0-9.e+-]*\).*/\1/' | sort -g | tail -1)"
  echo "== sanitizers"; for f in $W/*memcheck.log $W/*racecheck.log; do echo "$(basename $f): $(grep -E 'SUMMARY' $f | tail -1)"; done
  echo "== prefill bench"; grep -E "S=|\|" $W/prefill_bench.log | tail -50
  echo "== decode bench"; tail -n 40 $W/decode_bench.log
  echo "== ncu decode (B=1, 128k, b=0.05)"; tail -n 5 $W/ncu_decode.log 2>/dev/null
  grep -hE "^  [A-Z].*(Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issued Ipc|Warp Cycles Per Issued|No Eligible|Theoretical Occupancy) " $W/ncu/*.details.txt 2>/dev/null | head -20
} > $OUT/summary.txt 2>&1
tar -C $W -czf $OUT/validate.tar.gz .
cat $OUT/summary.txt
