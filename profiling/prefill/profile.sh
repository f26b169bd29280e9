#!/bin/bash
# One device call: ncu --set full (+ source counters, CUTE_DSL_LINEINFO=1) of ONE prefill launch
# (S=8192, H=32, B=1, D=128, causal, bf16, budget 0.05), reports/text to $OUT, then the quick bench.
export PYTHONPATH=$PWD:$PYTHONPATH
NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
nvidia-smi -L > $OUT/device.txt; date -u >> $OUT/device.txt
S=${S:-8192}
CUTE_DSL_LINEINFO=1 timeout 170 $NCU -k regex:ThriftPrefill --launch-skip 1 -c 1 --clock-control none --set full \
  --import-source yes -f --export $OUT/prefill python profiling/prefill/profile_one.py $S > $OUT/ncu_run.log 2>&1
tail -5 $OUT/ncu_run.log
$NCU --import $OUT/prefill.ncu-rep --page details > $OUT/details.txt 2>&1
$NCU --import $OUT/prefill.ncu-rep --page source --csv --print-source sass > $OUT/source_sass.csv 2>&1
$NCU --import $OUT/prefill.ncu-rep --page source --csv --print-source cuda > $OUT/source_py.csv 2>&1
$NCU --import $OUT/prefill.ncu-rep --page raw --csv > $OUT/raw.csv 2>&1
gzip -k $OUT/source_sass.csv
grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Issue Slots|Eligible|Active Warps|No Eligible|Warp Cycles|Executed Ipc|Block Limit" $OUT/details.txt | head -60
timeout 100 python profiling/prefill/quick_bench.py 2>&1 | tee $OUT/quick_bench.log
