#!/bin/bash
# Device driver: GPU tests (parallel processes), sanitizer, benchmark. Logs to $OUT.
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi -L > $OUT/device.txt; date -u >> $OUT/device.txt; python -c "import torch,cutlass;print(torch.__version__, torch.cuda.get_device_name())" >> $OUT/device.txt 2>&1
FLAG=$OUT/.tests_done
python profiling/prefill/bench.py $FLAG > $OUT/bench.log 2>&1 &
BENCH=$!
pids=()
i=0
for sel in fp16_d64_causal fp16_d64_full fp16_d128_causal fp16_d128_full bf16_d64_causal bf16_d64_full bf16_d128_causal bf16_d128_full; do
  timeout 330 python -m pytest -q -s -x tests/test_prefill_gpu.py -k "$sel" > $OUT/t_$i.log 2>&1 & pids+=($!); i=$((i+1))
done
for sel in test_prefill_long_32k test_prefill_schedules test_prefill_mqa_fully_masked_rows test_public_entry_and_compile test_quant_kernel_bit_exact; do
  timeout 330 python -m pytest -q -s tests/test_prefill_gpu.py -k "$sel" > $OUT/t_$sel.log 2>&1 & pids+=($!)
done
(timeout 300 compute-sanitizer --tool memcheck --report-api-errors no python profiling/prefill/sanitize_case.py > $OUT/memcheck.log 2>&1) & pids+=($!)
(timeout 300 compute-sanitizer --tool racecheck --report-api-errors no python profiling/prefill/sanitize_case.py > $OUT/racecheck.log 2>&1) & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
touch $FLAG
echo "tests done $(date -u)" >> $OUT/device.txt
wait $BENCH
for f in $OUT/t_*.log; do echo "=== $f"; cat $f; done > $OUT/tests_all.log; rm -f $OUT/t_*.log
grep -h "relL2\|passed\|failed\|Error" $OUT/tests_all.log > $OUT/summary.txt

tail -n 5 $OUT/memcheck.log $OUT/racecheck.log >> $OUT/summary.txt
