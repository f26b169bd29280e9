"""`python -m harness demo`: accuracy of every ThriftAttention variant on the built-in long-context workload (CPU).

For each length it builds `harness.workload.make_workload`, computes exact attention (fp64) and, with the
bit-faithful reference `kernels.reference.thrift_attention_ref`, the variants: fp16 (budget 1, the 16-bit
rounding floor), fp4 (budget 0, SageAttention3 numerics), thrift (block_mean) at 5/10/25 %, and random / local /
quest selection at 5 %. It prints the relative L2 error ||O - O_exact|| / ||O_exact|| over all evaluated rows and
heads, the selection and reference times, and writes the table as Markdown, JSON and CSV to
results/<UTC timestamp>/. Then it prints the compile-only kernel report (profiling.resources) when available.

Evaluated rows: the reference does every rounding step of the kernels in torch (tens of ns per (query, key) pair
and head on two cores, about a minute per variant for the full causal 32k square at 4 heads), so by default only
the LAST `--query-window` (2048) queries of each sequence are evaluated, against all keys, causal: exactly those
rows of the full-sequence computation, with the same selection (query blocks stay aligned because the window and
the lengths are multiples of 64, and k comes from the full number of key blocks). These are the longest rows, at
the full context length. `--query-window 0` evaluates every row.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import sys
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (label, selection method, budget)
VARIANTS = (
    ("fp16 (budget 1)", "block_mean", 1.0),
    ("fp4 (budget 0)", "block_mean", 0.0),
    ("thrift 5%", "block_mean", 0.05),
    ("thrift 10%", "block_mean", 0.10),
    ("thrift 25%", "block_mean", 0.25),
    ("random 5%", "random", 0.05),
    ("local 5%", "local", 0.05),
    ("quest 5%", "quest", 0.05),
)


def _length(s: str) -> int:
    s = s.strip().lower()
    mult = 1024 if s.endswith("k") else 1
    n = int(float(s[:-1]) * mult) if s.endswith("k") else int(s)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {s!r}")
    return n


def _lengths(s: str):
    try:
        return [_length(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--lengths: expected e.g. '2k,8k,32k', got {s!r} ({e})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=_lengths, default=[2048, 8192, 32768],
                   help="comma-separated sequence lengths, e.g. '2k,8k,32k' (default)")
    p.add_argument("--heads-q", type=int, default=4, help="query heads (default 4)")
    p.add_argument("--heads-kv", type=int, default=2, help="key/value heads (default 2; GQA when < heads-q)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--fmt", choices=("nvfp4", "mxfp4"), default="nvfp4")
    p.add_argument("--query-window", type=int, default=2048,
                   help="evaluate the last N queries of each sequence against all keys (multiple of 64; "
                        "0 = all queries). Default 2048")
    p.add_argument("--seed", type=int, default=0, help="workload seed (random selection uses it too)")
    p.add_argument("--out", default="results", help="results root folder (default results/)")
    p.add_argument("--no-resources", action="store_true", help="skip the compile-only kernel report")


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    r = ref.double()
    return float((out.double() - r).norm() / r.norm())


def _machine() -> str:
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _markdown(rows, lengths, meta) -> str:
    head = "| variant | " + " | ".join(_fmt_len(n) for n in lengths) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in lengths) + " |"
    lines = [head, sep]
    for label, _, _ in VARIANTS:
        cells = []
        for n in lengths:
            r = next(r for r in rows if r["variant"] == label and r["seq_len"] == n)
            cells.append(f"{r['rel_l2']:.4f}" + (f" (k={r['k']})" if 0.0 < r["budget"] < 1.0 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    t = ["| time (s) | " + " | ".join(
        f"sel {sum(r['select_s'] for r in rows if r['seq_len'] == n):.2f}, "
        f"ref {sum(r['ref_s'] for r in rows if r['seq_len'] == n):.1f}, "
        f"exact {meta['exact_s'][str(n)]:.1f}" for n in lengths) + " |"]
    return "\n".join(lines + t) + "\n"


def main(args) -> int:
    from harness.workload import make_workload
    from kernels.reference import attention_exact, thrift_attention_ref
    from kernels.selection import block_visibility, select_blocks, selection_mask, topk_for_budget

    if args.query_window < 0 or args.query_window % 64:
        print(f"demo: --query-window must be 0 or a positive multiple of 64, got {args.query_window}",
              file=sys.stderr)
        return 2
    if any(n % 64 for n in args.lengths) and args.query_window:
        print("demo: note: a length that is not a multiple of 64 shifts the window's query blocks "
              "relative to the full sequence's")
    dtype = DTYPES[args.dtype]
    t_start = time.time()
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out_dir = os.path.join(args.out, stamp.strftime("%Y%m%dT%H%M%SZ"))
    command = " ".join(["python -m harness demo", *sys.argv[2:]])
    print(f"ThriftAttention accuracy demo: lengths {[_fmt_len(n) for n in args.lengths]}, batch {args.batch}, "
          f"heads {args.heads_q}q/{args.heads_kv}kv, head_dim {args.head_dim}, {args.dtype}, {args.fmt}, "
          f"query window {args.query_window or 'all'}; {_machine()}", flush=True)
    rows, exact_s = [], {}
    for n in args.lengths:
        t0 = time.time()
        q, k, v = make_workload(n, batch=args.batch, heads_q=args.heads_q, heads_kv=args.heads_kv,
                                head_dim=args.head_dim, dtype=dtype, seed=args.seed)
        w = min(args.query_window, n) if args.query_window else n
        qe = q[:, n - w:]
        t1 = time.time()
        exact = attention_exact(qe, k, v, causal=True)
        exact_s[str(n)] = time.time() - t1
        print(f"[{_fmt_len(n)}] workload {t1 - t0:.1f}s, exact attention (fp64) on the last {w} queries "
              f"{exact_s[str(n)]:.1f}s", flush=True)
        nkb = -(-n // 64)
        vis = block_visibility(w, n, 64, True)
        for label, method, budget in VARIANTS:
            ts = time.time()
            sel = select_blocks(qe, k, budget=budget, causal=True, method=method, seed=args.seed)
            t_sel = time.time() - ts
            tr = time.time()
            o = thrift_attention_ref(qe, k, v, causal=True, fmt=args.fmt, selected=sel)
            t_ref = time.time() - tr
            err = rel_l2(o, exact)
            fp16_share = float((selection_mask(sel, nkb) & vis).sum() / (vis.sum() * sel.shape[0] * sel.shape[1]))
            rows.append(dict(seq_len=n, variant=label, method=method, budget=budget,
                             k=topk_for_budget(nkb, budget, True), fp16_share=fp16_share, rel_l2=err,
                             select_s=t_sel, ref_s=t_ref, query_window=w))
            print(f"[{_fmt_len(n)}] {label:16s} rel L2 {err:.4f}  (k={rows[-1]['k']}, FP16 share of the evaluated "
                  f"rows' block pairs {100 * fp16_share:.1f}%)  select {t_sel:.2f}s, reference {t_ref:.1f}s",
                  flush=True)
        del q, k, v, qe, exact
    total = time.time() - t_start
    meta = dict(command=command, machine=_machine(), date=stamp.strftime("%Y-%m-%d %H:%M UTC"),
                lengths=args.lengths, batch=args.batch, heads_q=args.heads_q, heads_kv=args.heads_kv,
                head_dim=args.head_dim, dtype=args.dtype, fmt=args.fmt, query_window=args.query_window,
                seed=args.seed, exact_s=exact_s, total_s=total)
    md = _markdown(rows, args.lengths, meta)
    print()
    print(f"Relative L2 error vs exact attention (fp64), last {args.query_window or 'all'} queries, "
          f"{args.heads_q}q/{args.heads_kv}kv heads, D={args.head_dim}, {args.dtype}, {args.fmt}; "
          f"k = key blocks in FP16 per query block")
    print(md)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "accuracy.md"), "w") as f:
        f.write(f"# ThriftAttention accuracy (demo)\n\nCommand: `{command}`  \nMachine: {meta['machine']}  \n"
                f"Date: {meta['date']}  \nEvaluated rows: last {args.query_window or 'all'} queries per sequence "
                f"(all of them where the sequence is shorter), "
                f"all keys, causal; heads {args.heads_q}q/{args.heads_kv}kv, D={args.head_dim}, {args.dtype}, "
                f"{args.fmt}, seed {args.seed}.\n\nRelative L2 error vs exact attention (fp64):\n\n{md}")
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "accuracy.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {out_dir}/accuracy.{{md,json,csv}}; total {total:.1f}s "
          f"(selection {sum(r['select_s'] for r in rows):.2f}s)", flush=True)

    if not args.no_resources:
        _resources()
    return 0


def _resources() -> None:
    """The compile-only kernel report, if profiling.resources is present; never fails the demo."""
    try:
        from profiling import resources
    except ImportError as e:
        print(f"compile-only kernel report: profiling.resources not available ({e}); skipped")
        return
    print("\nCompile-only kernel report (python -m profiling.resources --quick; drop --quick for every schedule):", flush=True)
    try:
        rc = resources.main(["--quick"])  # default schedules (~40 s); all schedules: python -m profiling.resources
        if rc:
            print(f"compile-only kernel report: exited with status {rc}")
    except SystemExit as e:  # argparse or an explicit exit inside the report
        print(f"compile-only kernel report: exited ({e.code})")
    except Exception as e:  # noqa: BLE001 - report and go on: the accuracy table is the demo's main output
        print(f"compile-only kernel report failed: {type(e).__name__}: {e}")
