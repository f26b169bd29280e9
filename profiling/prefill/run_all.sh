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
for sel in test_prefill_long_32k test_prefill_sync_mma_long_32k test_prefill_schedules test_prefill_mqa_fully_masked_rows test_public_entry_and_compile test_quant_kernel_bit_exact; do
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
# short ncu look at one launch of the default schedule (8k, b=0.05): time, instructions, issue/stall summary
if [ "${NCU_AFTER:-1}" = 1 ]; then
  NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
  timeout 50 $NCU -k regex:ThriftPrefill --launch-skip 1 -c 1 --clock-control none --section SpeedOfLight \
    --section InstructionStats --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section Occupancy -f --export $OUT/after python profiling/prefill/profile_one.py 8192 > $OUT/ncu_after.log 2>&1
  $NCU --import $OUT/after.ncu-rep --page details > $OUT/after_details.txt 2>&1
  grep -E "Duration|Executed Instructions |Issue Slots|Registers Per|Theoretical Occ|No Eligible|Warp Cycles Per Issued" $OUT/after_details.txt >> $OUT/summary.txt
fi
cat $OUT/summary.txt; tail -n 12 $OUT/bench.log
