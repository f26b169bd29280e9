"""Where a kernel's warps wait, per SASS instruction, from an Nsight Compute source-page CSV.

Capture (on the GPU; CUTE_DSL_LINEINFO=1 is only needed for the CUDA/Python source view, not for SASS):
    ncu -k regex:ThriftPrefill --launch-skip 1 -c 1 --section SourceCounters --section WarpStateStats \
        -f -o /tmp/src python profiling/prefill/profile_one.py 8192
    ncu --import /tmp/src.ncu-rep --page source --csv --print-source sass > sass.csv
Read (anywhere, CPU):
    python -m profiling.ncu.sass_hotspots sass.csv [--top 30] [--json out.json]

Prints the stall-reason split of all warp-state samples, the instructions with the most samples (index in the
listing, share, executions, the SASS text and its two largest reasons), and the share per opcode. Sample counts are
"Warp Stall Sampling (All Samples)": a sample is charged to the instruction a warp was about to issue, so a wait on
a load shows up on the first instruction that reads the loaded register (RESULTS.md, session 8: the bitmask scan).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def load(path: str) -> list[dict]:
    """Rows of the SASS listing: {"idx", "sass", "samples", "executed", "stalls": {reason: samples}}."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    hdr_i = next((i for i, r in enumerate(rows) if SAMPLES in r and "Source" in r), None)
    if hdr_i is None:
        raise ValueError(f"{path}: no header row with 'Source' and '{SAMPLES}' "
                         "(expected `ncu --import R --page source --csv --print-source sass`)")
    hdr = rows[hdr_i]
    ix = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "(Not Issued)" not in h]
    out = []
    for r in rows[hdr_i + 1:]:
        if len(r) < len(hdr):
            continue
        try:
            s = int(r[ix[SAMPLES]] or 0)
        except ValueError:
            continue
        ex = r[ix["Instructions Executed"]] if "Instructions Executed" in ix else ""
        out.append({"idx": len(out), "sass": r[ix["Source"]].strip(), "samples": s,
                    "executed": int(ex) if ex.isdigit() else 0,
                    "stalls": {c[len("stall_"):]: int(r[ix[c]] or 0) for c in reasons}})
    if not out:
        raise ValueError(f"{path}: header found but no instruction rows")
    return out


def opcode(sass: str) -> str:
    """'@!P0 IMAD.WIDE.U32 R1, ...' -> 'IMAD'."""
    toks = sass.split()
    if toks and toks[0].startswith("@"):
        toks = toks[1:]
    return toks[0].split(".")[0] if toks else "?"


def summarize(rows: list[dict], top: int = 30) -> dict:
    total = sum(r["samples"] for r in rows)
    if total == 0:
        raise ValueError("no warp-state samples in the listing (was SourceCounters / WarpStateStats collected?)")
    reasons = collections.Counter()
    by_op = collections.Counter()
    for r in rows:
        reasons.update(r["stalls"])
        by_op[opcode(r["sass"])] += r["samples"]
    hot = sorted(rows, key=lambda r: -r["samples"])[:top]
    return {
        "total_samples": total,
        "reasons": {k: v / total for k, v in reasons.most_common() if v},
        "top": [{"idx": r["idx"], "share": r["samples"] / total, "executed": r["executed"], "sass": r["sass"],
                 "reasons": {k: v / total for k, v in sorted(r["stalls"].items(), key=lambda kv: -kv[1])[:2] if v}}
                for r in sorted(hot, key=lambda r: r["idx"])],
        "opcodes": {k: v / total for k, v in by_op.most_common(15)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", help="also write the summary here")
    a = ap.parse_args(argv)
    s = summarize(load(a.csv), a.top)
    print(f"{s['total_samples']} warp-state samples")
    print("by reason: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["reasons"].items()))
    print(f"top {a.top} instructions (listing order):")
    for t in s["top"]:
        why = " ".join(f"{k}={100 * v:.1f}%" for k, v in t["reasons"].items())
        print(f"  {t['idx']:6d} {100 * t['share']:5.1f}%  ex={t['executed']:<10d} {t['sass'][:60]:60s} {why}")
    print("by opcode: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["opcodes"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
