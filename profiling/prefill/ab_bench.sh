#!/usr/bin/env bash
# Same-run A/B of the prefill timing: the working tree against a git revision, alternating runs of
# profiling/prefill/quick_bench.py (8k / 32k, bf16, b=0.05, median of do_bench, L2 flushed) in each tree.
#
#   bash profiling/prefill/ab_bench.sh [REV] [RUNS] [quick_bench args...]     # REV default HEAD, RUNS default 2
#   OLD_TREE=dir bash profiling/prefill/ab_bench.sh - 2                       # an already extracted old tree
#
# On the lent GPU the checkout's .git may not hold your latest commits: extract the old tree here instead
# (`mkdir -p scratch/old && git archive HEAD kernels layouts quant profiling | tar -x -C scratch/old`, untracked, so it
# travels with the working tree) and pass OLD_TREE=scratch/old. Delete scratch/ before committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
REV=${1:-HEAD}
RUNS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
PY=${PY:-python}
if [ -n "${OLD_TREE:-}" ]; then
  [ -d "$OLD_TREE" ] || { echo "ab_bench: OLD_TREE=$OLD_TREE is not a directory" >&2; exit 2; }
  OLD=$(cd "$OLD_TREE" && pwd)
else
  OLD=$(mktemp -d)
  trap 'rm -rf "$OLD"' EXIT
  git archive "$REV" kernels layouts quant profiling | tar -x -C "$OLD"
fi
[ -f "$OLD/profiling/prefill/quick_bench.py" ] || { echo "ab_bench: no profiling/prefill/quick_bench.py in $OLD" >&2; exit 2; }
for r in $(seq 1 "$RUNS"); do
  echo "== old (${OLD_TREE:-$REV}), run $r"
  (cd "$OLD" && PYTHONPATH="$OLD:${PYTHONPATH:-}" $PY profiling/prefill/quick_bench.py "$@")
  echo "== working tree, run $r"
  PYTHONPATH="$PWD:${PYTHONPATH:-}" $PY profiling/prefill/quick_bench.py "$@"
done
