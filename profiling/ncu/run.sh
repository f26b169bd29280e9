#!/usr/bin/env bash
# One Nsight Compute question about exactly ONE kernel launch of one benchmark variant.
#
#   profiling/ncu/run.sh QUESTION VARIANT [SHAPE] [MODE]
#
#   QUESTION  sol      speed of light: % of peak compute / memory throughput (SpeedOfLight)
#             memory   memory chart + tables: L1/L2/DRAM traffic and hit rates (MemoryWorkloadAnalysis*)
#             stalls   warp stall reasons and scheduler issue stats (WarpStateStats, SchedulerStats)
#             source   source-level hot spots: SASS/PTX/Python lines with stall samples (SourceCounters,
#                      compiled with CUTE_DSL_LINEINFO=1, report imported with --import-source yes)
#             full     --set full (everything; slow)
#   VARIANT   a bench variant name: thrift-f0.05, thrift-fp4only, fa2-sdpa, cudnn-sdpa, fa4-cute, sage1, ...
#             (`python -m harness bench --list` prints what is available here)
#   SHAPE     B,Sq,Skv,Hq,Hkv,D  (default 1,4096,4096,32,8,128)
#   MODE      prefill (default) or decode
#
# Selection of the one launch: the bench runs the variant in --profile mode (prepare/JIT outside any NVTX
# range, then a few calls each inside nested NVTX ranges <variant>/<phase>/<shape>), and ncu profiles the first
# kernel launched inside "<variant>/attention/" (-c 1) whose name matches MATCH (default for thrift variants:
# ThriftPrefill / ThriftDecodeSplitKV; MATCH= for none). PHASE=quantize (or select/combine) picks thrift's other
# phases once its entry points annotate them; NVTX=0 drops the NVTX filter (kernel-name regex only).
# --clock-control none (the card's own clocks) unless CLOCK=base.
# Environment: NCU (ncu binary), PY (python), OUTDIR (reports; default results/ncu), EXTRA (more ncu flags).
set -euo pipefail
cd "$(dirname "$0")/../.."
Q=${1:?question: sol|memory|stalls|source|full}
VARIANT=${2:?variant name, e.g. thrift-f0.05}
SHAPE=${3:-1,4096,4096,32,8,128}
MODE=${4:-prefill}
PHASE=${PHASE:-attention}
OUTDIR=${OUTDIR:-results/ncu}
PY=${PY:-python3}
if [ -z "${NCU:-}" ]; then
  NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1 || true)
fi
[ -n "$NCU" ] && [ -x "$NCU" ] || { echo "ncu not found (set NCU=/path/to/ncu)" >&2; exit 2; }
mkdir -p "$OUTDIR"

case "$Q" in
  sol)    SECTIONS=(--section SpeedOfLight) ;;
  memory) SECTIONS=(--section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Chart
                    --section MemoryWorkloadAnalysis_Tables) ;;
  stalls) SECTIONS=(--section WarpStateStats --section SchedulerStats --section Occupancy) ;;
  source) SECTIONS=(--section SourceCounters --section WarpStateStats --import-source yes)
          export CUTE_DSL_LINEINFO=1 ;;
  full)   SECTIONS=(--set full) ;;
  *) echo "unknown question $Q (sol|memory|stalls|source|full)" >&2; exit 2 ;;
esac

# thrift budgets come from the variant name (thrift-f0.05 -> 0.05, *fp4only -> 0)
BUDGET=0.05
case "$VARIANT" in
  *fp4only) BUDGET=0 ;;
  thrift-f*) BUDGET=${VARIANT#thrift-f} ;;
  thrift-decode-f*) BUDGET=${VARIANT#thrift-decode-f} ;;
esac

# Until the thrift entry points open their own NVTX phases, the bench's "attention" range also holds the
# quantize/select launches, so thrift variants add a kernel-name filter by default (both filters must match).
if [ -z "${MATCH+x}" ]; then
  case "$VARIANT" in
    thrift-decode-*) MATCH=ThriftDecodeSplitKV ;;
    thrift-*) MATCH=ThriftPrefill ;;
    *) MATCH= ;;
  esac
fi
# the full range path <variant>/<phase>/<shape>/ (the shape tag as profiling.nvtx_ranges.shape_tag writes it);
# SHORT=1 filters on "<variant>/<phase>/" only (any shape)
IFS=, read -r B SQ SKV HQ HKV D <<< "$SHAPE"
TAG="b${B}_sq${SQ}_skv${SKV}_h${HQ}_kv${HKV}_d${D}_${CAUSAL_TAG:-c}"
if [ "${SHORT:-0}" = 1 ]; then NVTX_PATH="${VARIANT}/${PHASE}/"; else NVTX_PATH="${VARIANT}/${PHASE}/${TAG}/"; fi
FILTER=()
[ "${NVTX:-1}" = 1 ] && FILTER+=(--nvtx --nvtx-include "$NVTX_PATH")
[ -n "$MATCH" ] && FILTER+=(-k "regex:${MATCH}")
FILTER+=(-c 1)
REP="$OUTDIR/${Q}_${VARIANT}_${MODE}"
set -x
"$NCU" "${FILTER[@]}" --clock-control "${CLOCK:-none}" "${SECTIONS[@]}" ${EXTRA:-} -f -o "$REP" \
  "$PY" -m harness bench --profile --profile-iters 2 --mode "$MODE" "--$MODE" "$SHAPE" \
  --variants "$VARIANT" --budgets "$BUDGET" --no-plots --out "$OUTDIR/bench_profile"
# print the captured sections (and, for 'source', the per-line view) from the saved report
"$NCU" --import "$REP.ncu-rep" --print-summary none
if [ "$Q" = source ]; then
  "$NCU" --import "$REP.ncu-rep" --page source --csv --print-source cuda,sass > "$REP.source.csv" || true
  echo "per-line source counters: $REP.source.csv"
fi
