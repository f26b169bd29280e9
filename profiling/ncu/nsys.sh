#!/usr/bin/env bash
# Nsight Systems timeline of the benchmark with every variant's NVTX ranges (<variant>/<phase>/<shape>).
#   profiling/ncu/nsys.sh [bench args...]      e.g. profiling/ncu/nsys.sh --variants fa2,thrift --seqlens 4096
# nsys is NOT installed on the lent H100/H200 machines (see profiling/README.md); run this on your own box.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${OUTDIR:-results/nsys}
mkdir -p "$OUTDIR"
nsys profile -t cuda,nvtx --force-overwrite true -o "$OUTDIR/bench" \
  "${PY:-python3}" -m harness bench --no-plots --out "$OUTDIR/bench_results" "$@"
nsys stats --report nvtx_sum,cuda_gpu_kern_sum "$OUTDIR/bench.nsys-rep"
