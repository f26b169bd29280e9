#!/bin/bash
# One-call GPU validation of main (H100/H200 through the device tool):
#   source .gpu-bundle/activate.sh; bash profiling/validate_all.sh
# 1. prefill: all GPU tests (parallel processes), memcheck + racecheck, benchmark, short ncu of one launch
#    (profiling/prefill/run_all.sh);  2. decode + codec GPU tests, decode memcheck + racecheck, decode benchmark.
# Everything lands in $OUT/validate.tar.gz (the device tool returns at most 8 files) plus $OUT/summary.txt.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
FINAL_OUT=$OUT
WORK=$(mktemp -d)
mkdir -p $WORK/prefill $WORK/decode
( OUT=$WORK/prefill bash profiling/prefill/run_all.sh > $WORK/prefill/run_all.log 2>&1 )
D=$WORK/decode
nvidia-smi -L > $D/device.txt
timeout 300 python -m pytest -q -p no:cacheprovider -rfE -s tests/test_decode_gpu.py tests/test_codecs.py -m gpu > $D/tests.log 2>&1
for tool in memcheck racecheck; do
  timeout 200 compute-sanitizer --tool $tool --report-api-errors no --kernel-name kns=Thrift \
    python profiling/decode_sanitize_case.py > $D/$tool.log 2>&1
done
timeout 240 python -m kernels.decode_bench --out $D/bench.json > $D/bench.log 2>&1
{
  echo "== device"; cat $WORK/prefill/device.txt
  echo "== prefill (profiling/prefill/run_all.sh)"; cat $WORK/prefill/summary.txt 2>/dev/null | grep -v "^B=" | tail -40
  echo "-- prefill bench"; grep -h "S=\||" $WORK/prefill/bench.log | tail -30
  echo "== decode + codec GPU tests"; grep -E "passed|failed|error" $D/tests.log | tail -5
  grep -h "rel L2" $D/tests.log | awk '{for(i=1;i<=NF;i++) if($i=="L2") print $(i+1)}' | sort -g | tail -1 | sed 's/^/worst decode rel L2: /'
  echo "-- decode sanitizers"; tail -n 2 $D/memcheck.log $D/racecheck.log
  echo "-- decode bench"; tail -n 30 $D/bench.log
} > $FINAL_OUT/summary.txt 2>&1
tar -C $WORK -czf $FINAL_OUT/validate.tar.gz prefill decode
cat $FINAL_OUT/summary.txt
