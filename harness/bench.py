"""`python -m harness bench`: every attention variant side by side on the same inputs -- speed, accuracy, roofline.

For each shape (prefill and decode) and each variant usable here (torch SDPA flash = FlashAttention-2, SDPA
cuDNN, FlashAttention-4 `flash_attn.cute`, flash_attn 2.x, SageAttention3 on SM120, SageAttention 1/2, and this
project's thrift kernels at each FP16 budget, budget 0 = fp4-only with SageAttention3 numerics):

- accuracy: relative L2 (||O - ref|| / ||ref||) and max |O - ref| against an fp32 reference on the same inputs
  (chunked fp32 matmuls with the contract's bottom-right causal mask; ``--ref exact`` uses the project's fp64
  kernels.reference.attention_exact instead);
- speed: median of many calls timed with CUDA events (or triton's do_bench), L2 flushed before each call,
  input sets rotated, warm-up first; JIT compilation happens in prepare() and is reported as compile_s;
- roofline: floor time from FLOPs and minimum bytes against ceilings measured at start (D2D copy, bf16
  matmul) or a datasheet entry (``--ceilings rtx-5090``), and measured / floor.

Every timed call sits in NVTX ranges ``<variant>/<phase>/<shape>`` (nested push/pop ranges, see
profiling/nvtx_ranges.py), so ``nsys profile -t cuda,nvtx`` and ``ncu --nvtx --nvtx-include "<variant>/attention/"``
work; ``--profile`` runs each selected variant a few times without reference or timing, for ncu.

Output: a printed table, results.json, results.csv, table.txt and PNG plots (speed vs sequence length, error vs
time Pareto across budgets) in ``results/<UTC timestamp>/`` (or --out).

Shapes: ``--prefill B,Sq,Skv,Hq,Hkv,D`` / ``--decode B,Sq,Skv,Hq,Hkv,D`` (repeatable), or ``--seqlens`` with
``--batch/--heads/--kv-heads/--head-dim``, or ``--config file.json`` with keys prefill, decode (lists of
[B, Sq, Skv, Hq, Hkv, D]), budgets, variants, schedules, dtype, causal. ``--schedules m64_w4_s2,m64_w4_s3`` runs
the thrift prefill variants once per tile schedule (``--schedules "m64_wg_s2_f1:stages=3;min_ctas=2"`` sweeps
fields of a named schedule). Without a GPU, ``--dry-run`` prints the plan and the
discovery result (every skipped variant with its reason) and writes the report with 'skip' rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import baselines as bl
from . import report as rp
from . import roofline as rf
from profiling.nvtx_ranges import phase, variant_scope

DEFAULT_PREFILL_SEQLENS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_DECODE_SEQLENS = (4096, 16384, 65536)
DEFAULT_BUDGETS = (0.0, 0.02, 0.05, 0.1, 0.2)


def _csv_floats(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _csv_ints(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _shape6(s: str) -> List[int]:
    v = _csv_ints(s)
    if len(v) != 6 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected 6 positive integers B,Sq,Skv,Hq,Hkv,D, got {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    g = p.add_argument_group("shapes")
    g.add_argument("--mode", choices=("prefill", "decode", "both"), default="both",
                   help="which default shape sets to run (default both)")
    g.add_argument("--prefill", type=_shape6, action="append", metavar="B,Sq,Skv,Hq,Hkv,D",
                   help="a prefill shape (repeatable); replaces the default prefill sweep")
    g.add_argument("--decode", type=_shape6, action="append", metavar="B,Sq,Skv,Hq,Hkv,D",
                   help="a decode shape (repeatable; Sq = new tokens, usually 1); replaces the default decode sweep")
    g.add_argument("--seqlens", type=_csv_ints, default=list(DEFAULT_PREFILL_SEQLENS),
                   help="prefill sweep: Sq = Skv values (default %(default)s)")
    g.add_argument("--decode-seqlens", type=_csv_ints, default=list(DEFAULT_DECODE_SEQLENS),
                   help="decode sweep: Skv values with Sq = 1 (default %(default)s)")
    g.add_argument("--batch", type=int, default=1, help="prefill sweep batch (default 1)")
    g.add_argument("--decode-batch", type=int, default=8, help="decode sweep batch (default 8)")
    g.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    g.add_argument("--kv-heads", type=int, default=8, help="KV heads (GQA; default 8)")
    g.add_argument("--head-dim", type=int, default=128, help="head dim D (default 128)")
    g.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    g.add_argument("--inputs", choices=("randn", "workload"), default="randn",
                   help="N(0,1) Q/K/V (default) or the built-in structured long-context workload "
                        "(harness.workload: sinks, local band, needles; generated on the CPU, ~6 s per 2k tokens "
                        "x 32 heads per input set, so pair long sequences with --rotate 1)")
    g.add_argument("--no-causal", dest="causal", action="store_false", help="non-causal (default causal)")
    g.add_argument("--config", help="JSON file with keys prefill/decode/budgets/variants/dtype/causal")
    g = p.add_argument_group("variants")
    g.add_argument("--budgets", type=_csv_floats, default=list(DEFAULT_BUDGETS),
                   help="thrift FP16 budgets; 0 = fp4-only (default %(default)s)")
    g.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated name prefixes to keep, e.g. fa2,fa4,thrift-f0.05 (default: all)")
    g.add_argument("--schedules", type=lambda s: [x for x in s.split(",") if x],
                   help="thrift prefill tile schedules (names in kernels.schedules.SCHEDULES, or 'name:field=value;...' / "
                        "'field=value;...' overrides, see kernels.schedules.get_schedule), each a variant "
                        "'<name>@<schedule>'; default: the kernel's default schedule")
    g.add_argument("--list", action="store_true", help="print discovered/skipped variants and exit")
    g = p.add_argument_group("measurement")
    g.add_argument("--timer", choices=("events", "do_bench"), default="events",
                   help="CUDA events with L2 flush (default) or triton.testing.do_bench")
    g.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default 5)")
    g.add_argument("--rep", type=int, default=30, help="timed calls (median reported; default 30)")
    g.add_argument("--rotate", type=int, default=3, help="input sets rotated between calls (default 3)")
    g.add_argument("--ref", choices=("fp32", "exact", "none"), default="fp32",
                   help="accuracy reference: chunked fp32 (default), fp64 attention_exact, or none")
    g.add_argument("--ceilings", default="measured",
                   help="'measured' (D2D copy + bf16 matmul at start) or a datasheet key: "
                        + ", ".join(sorted(rf.DATASHEET)))
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: exercise the whole pipeline without a GPU on tiny shapes (torch SDPA math and the "
                        "thrift reference only; wall-clock timing; numbers are not kernel speeds)")
    g.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop starting new measurements after this many seconds (0 = no limit)")
    g.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, printed)")
    g = p.add_argument_group("output / profiling")
    g.add_argument("--out", help="results folder (default results/<UTC timestamp>)")
    g.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    g.add_argument("--dry-run", action="store_true", help="plan + discovery only (works without a GPU)")
    g.add_argument("--profile", action="store_true",
                   help="for ncu/nsys: prepare each variant, then run it --profile-iters times inside its "
                        "NVTX ranges; no reference, no timing")
    g.add_argument("--profile-iters", type=int, default=3)


# ------------------------------------------------------------------------------------------------- planning

def build_problems(args) -> List[bl.Problem]:
    """The shape list from flags / config file (ValueError on inconsistent shapes)."""
    cfg = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"--config: expected a JSON object, got {type(cfg).__name__}")
        for key in ("budgets", "variants", "schedules", "dtype", "causal"):
            if key in cfg:
                setattr(args, key, cfg[key])
    dtype, causal = args.dtype, bool(args.causal)
    probs: List[bl.Problem] = []
    if args.mode in ("prefill", "both") or args.prefill or "prefill" in cfg:
        shapes = args.prefill or cfg.get("prefill")
        if shapes is None and args.mode in ("prefill", "both"):
            shapes = [[args.batch, s, s, args.heads, args.kv_heads, args.head_dim] for s in args.seqlens]
        for s in shapes or []:
            probs.append(bl.Problem("prefill", *map(int, s), causal=causal, dtype=dtype))
    if args.mode in ("decode", "both") or args.decode or "decode" in cfg:
        shapes = args.decode or cfg.get("decode")
        if shapes is None and args.mode in ("decode", "both"):
            shapes = [[args.decode_batch, 1, s, args.heads, args.kv_heads, args.head_dim] for s in args.decode_seqlens]
        for s in shapes or []:
            probs.append(bl.Problem("decode", *map(int, s), causal=causal, dtype=dtype))
    return probs


def _base_row(p: bl.Problem, v_name: str, family: str, budget=None) -> dict:
    return {"mode": p.mode, "shape": p.tag, "b": p.b, "sq": p.sq, "skv": p.skv, "hq": p.hq, "hkv": p.hkv, "d": p.d,
            "causal": p.causal, "dtype": p.dtype, "variant": v_name, "family": family, "budget": budget}


# ------------------------------------------------------------------------------------------------- numerics

def reference_fp32(q, k, v, causal: bool, scale: Optional[float] = None, max_elems: int = 1 << 26):
    """fp32 attention (bottom-right causal, GQA) chunked over (batch, head, query rows); O fp32 [B, Sq, Hq, D]."""
    import torch

    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    out = torch.zeros((B, Sq, Hq, D), dtype=torch.float32, device=q.device)
    rows = max(1, min(Sq, max_elems // max(Skv, 1)))
    g = Hq // Hkv
    for b in range(B):
        for h in range(Hq):
            kf = k[b, :, h // g].float()
            vf = v[b, :, h // g].float()
            for r0 in range(0, Sq, rows):
                r1 = min(Sq, r0 + rows)
                s = (q[b, r0:r1, h].float() @ kf.T) * scale
                if causal:
                    qi = torch.arange(r0, r1, device=q.device)[:, None] + (Skv - Sq)
                    kj = torch.arange(Skv, device=q.device)[None, :]
                    s.masked_fill_(kj > qi, float("-inf"))
                m = s.amax(dim=1, keepdim=True)
                m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
                pexp = torch.exp(s - m)
                l = pexp.sum(dim=1, keepdim=True)
                out[b, r0:r1, h] = torch.where(l > 0, (pexp @ vf) / l.clamp_min(1e-30), torch.zeros_like(l))
    return out


def errors(out, ref) -> dict:
    """relative L2 and max abs error of out vs ref (NaN anywhere -> NaN)."""
    import torch

    o = out.float()
    diff = o - ref
    nref = torch.linalg.vector_norm(ref).item()
    rel = torch.linalg.vector_norm(diff).item() / nref if nref > 0 else math.nan
    if not torch.isfinite(o).all():
        rel = math.nan
    return {"rel_l2": rel, "max_abs_err": diff.abs().max().item()}


def _fp16_fraction(p: bl.Problem, budget: Optional[float]) -> float:
    if budget is None:
        return 1.0
    nqb, nkb = -(-p.sq // 64), -(-p.skv // 64)
    try:
        from kernels.selection import topk_for_budget

        k = topk_for_budget(nkb, budget, p.causal)
    except Exception:
        k = 0 if budget == 0 else max(1, round(budget * nkb))
    return rf.fp16_fraction_for_budget(nqb, nkb, k, p.causal)


def _make_inputs(p: bl.Problem, n_sets: int, seed: int, device: str = "cuda", kind: str = "randn"):
    """n_sets independent (q, k, v) on `device`: N(0, 1) ('randn') or the built-in long-context workload
    ('workload': harness.workload.make_workload, generated on the CPU; decode takes the last query rows)."""
    import torch

    if kind == "workload":
        from harness.workload import make_workload

        out = []
        for i in range(n_sets):
            q, k, v = make_workload(p.skv, batch=p.b, heads_q=p.hq, heads_kv=p.hkv, head_dim=p.d,
                                    dtype=p.torch_dtype(), seed=(seed + i) % (2 ** 31))
            out.append((q[:, p.skv - p.sq:].contiguous().to(device), k.to(device), v.to(device)))
        return out
    if kind != "randn":
        raise ValueError(f"inputs: expected 'randn' or 'workload', got {kind!r}")

    gen = torch.Generator(device=device).manual_seed(seed)
    dt = p.torch_dtype()
    sets = []
    for _ in range(n_sets):
        q = torch.randn((p.b, p.sq, p.hq, p.d), generator=gen, device=device, dtype=dt)
        k = torch.randn((p.b, p.skv, p.hkv, p.d), generator=gen, device=device, dtype=dt)
        v = torch.randn((p.b, p.skv, p.hkv, p.d), generator=gen, device=device, dtype=dt)
        sets.append((q, k, v))
    return sets


def _n_rotate(p: bl.Problem, want: int) -> int:
    """Input sets to rotate, capped so they stay under ~4 GiB."""
    elem = 2 * (p.b * p.sq * p.hq * p.d + 2 * p.b * p.skv * p.hkv * p.d)
    return max(1, min(want, int((4 << 30) // max(elem, 1))))


def _wrap_nvtx(v: bl.Variant, p: bl.Problem, fn, annotated: bool):
    """Each call inside <variant>[/attention]/<shape>; thrift entry points that annotate their own phases get
    only the variant scope (their phases then nest as <variant>/<phase>/<shape>)."""
    if annotated:
        def call():
            with variant_scope(v.nvtx, p.tag):
                return fn()
    else:
        def call():
            with variant_scope(v.nvtx, p.tag):
                with phase("attention"):
                    return fn()
    return call


def _thrift_annotates_phases() -> bool:
    """True when the kernels package declares that its entry points open their own NVTX phases."""
    try:
        import kernels

        return bool(getattr(kernels, "NVTX_PHASES", False))
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------- main

def run(args) -> int:
    t_start = time.time()
    problems = build_problems(args)
    if not problems:
        print("[bench] no shapes selected", file=sys.stderr)
        return 2
    modes = sorted({p.mode for p in problems})
    variants, skipped = bl.discover(budgets=args.budgets, modes=modes, include=args.variants, device=args.device,
                                    schedules=getattr(args, "schedules", None))
    print(f"[bench] {len(problems)} shapes x {len(variants)} variants: "
          + ", ".join(v.name for v in variants))
    if args.list:
        for v in variants:
            print(f"  {v.name:<22} {v.family:<8} modes={','.join(v.modes):<15} {v.note}")
        for s in skipped:
            print(f"  {s.name:<22} SKIP     {s.reason}")
        return 0

    out_dir = args.out or rp.results_dir()
    os.makedirs(out_dir, exist_ok=True)
    meta = {"argv": sys.argv, "started_utc": rp.utc_stamp(), "budgets": args.budgets,
            "inputs": getattr(args, "inputs", "randn"),
            "skipped_variants": [{"name": s.name, "reason": s.reason} for s in skipped]}
    rows: List[dict] = []

    def skip_rows(reason_fn):
        for p in problems:
            for v in variants:
                if p.mode in v.modes:
                    r = _base_row(p, v.name, v.family, v.budget)
                    r.update(status="skip", note=reason_fn(v))
                    rows.append(r)
            for s in skipped:
                if p.mode not in s.modes:
                    continue
                r = _base_row(p, s.name, "thrift" if s.name.startswith("thrift") else "baseline")
                r.update(status="skip", note=s.reason)
                rows.append(r)

    cuda_why = bl._cuda_reason() if args.device == "cuda" else None
    if args.dry_run or cuda_why:
        skip_rows(lambda v: "dry run" if args.dry_run else cuda_why)
        meta["device"] = None
        rp.write_all(rp.rows_from(rows), out_dir, meta, plots=False)
        if cuda_why and not args.dry_run:
            print(f"[bench] nothing measured: {cuda_why}", file=sys.stderr)
            return 1
        return 0

    import torch

    gpu = args.device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    dev_name = torch.cuda.get_device_name() if gpu else "cpu (pipeline check, not a kernel benchmark)"
    print(f"[bench] seed={seed} device={dev_name}")
    meta.update(seed=seed, device=dev_name, capability=list(torch.cuda.get_device_capability()) if gpu else None,
                torch=torch.__version__)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if not gpu:
        ceil = rf.datasheet(args.ceilings if args.ceilings in rf.DATASHEET else "h100-sxm")
    elif args.profile:  # nothing is timed: skip the ceiling kernels so a profiler sees only the variants
        ceil = rf.datasheet("h100-sxm")
    elif args.ceilings == "measured":
        ceil = rf.measure_ceilings()
    else:
        ceil = rf.datasheet(args.ceilings)
    print(f"[bench] ceilings: {ceil.name}: {ceil.bandwidth_gbs:.0f} GB/s, bf16 {ceil.bf16_tflops:.0f} TFLOP/s "
          f"({ceil.source})")
    meta["ceilings"] = ceil.as_dict()
    meta["datasheet_leads"] = {k: c.as_dict() for k, c in rf.DATASHEET.items()}
    annotated = _thrift_annotates_phases()
    flusher = None
    if args.timer == "events" and not args.profile and gpu:
        from .timing import L2Flusher

        flusher = L2Flusher()

    for p in problems:
        sets = _make_inputs(p, 1 if args.profile else _n_rotate(p, args.rotate), seed, args.device,
                            getattr(args, "inputs", "randn"))
        ref = None
        if args.ref != "none" and not args.profile:
            q, k, v = sets[0]
            if args.ref == "exact":
                from kernels.reference import attention_exact

                ref = attention_exact(q, k, v, causal=p.causal).float()
            else:
                ref = reference_fp32(q, k, v, p.causal)
        flops = rf.attention_flops(p.b, p.sq, p.skv, p.hq, p.d, p.causal)
        fa2_ms = None
        for v in variants:
            if p.mode not in v.modes:
                continue
            row = _base_row(p, v.name, v.family, v.budget)
            row["note"] = v.note
            if args.max_seconds and time.time() - t_start > args.max_seconds:
                row.update(status="skip", note=f"--max-seconds {args.max_seconds:g} reached")
                rows.append(row)
                continue
            try:
                t0 = time.time()
                fns = [v.prepare(p, s) for s in sets]
                sync()
                row["compile_s"] = round(time.time() - t0, 3)
                calls = [_wrap_nvtx(v, p, fn, annotated and v.family == "thrift") for fn in fns]
                if args.profile:
                    for i in range(args.profile_iters):
                        calls[i % len(calls)]()
                    sync()
                    row.update(status="ok", note=f"profiled {args.profile_iters} calls")
                    rows.append(row)
                    continue
                if ref is not None:
                    out = fns[0]()
                    row.update(errors(out, ref))
                    del out
                from .timing import time_calls

                t = time_calls(calls, warmup=args.warmup, rep=args.rep, method=args.timer if gpu else "wall",
                               flusher=flusher)
                nbytes = (v.bytes_fn(p) if v.bytes_fn else
                          rf.attention_bytes(p.b, p.sq, p.skv, p.hq, p.hkv, p.d, kv_elem_bytes=v.kv_elem_bytes))
                fl = rf.floor_ms(flops, nbytes, ceil, fp16_fraction=_fp16_fraction(p, v.budget))
                row.update(status="ok", ms=t.median_ms, ms_p20=t.p20_ms, ms_p80=t.p80_ms, n_timed=t.n,
                           timer=t.method, tflops=flops / (t.median_ms * 1e-3) / 1e12,
                           gbs=nbytes / (t.median_ms * 1e-3) / 1e9, floor_ms=fl["floor_ms"], bound=fl["bound"],
                           x_floor=rf.ratio(t.median_ms, fl["floor_ms"]))
                if v.name == "fa2-sdpa":
                    fa2_ms = t.median_ms
            except bl.Unsupported as e:
                row.update(status="skip", note=str(e))
            except Exception as e:  # a broken variant must not stop the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                row.update(status="error", note=msg)
                print(f"[bench] {v.name} on {p.tag}: {msg}", file=sys.stderr)
            finally:
                fns = calls = None
            rows.append(row)
        for r in rows:
            if r["shape"] == p.tag and r["mode"] == p.mode and r.get("ms") and fa2_ms:
                r["speedup_vs_fa2"] = fa2_ms / r["ms"]
        # partial results after every shape, so a crash later (e.g. a sticky CUDA error) loses nothing measured
        rp.write_json(os.path.join(out_dir, "results.json"), rp.rows_from(rows), dict(meta, partial=True))
        rp.write_csv(os.path.join(out_dir, "results.csv"), rp.rows_from(rows))
        del sets, ref
        bl.clear_caches()
        if gpu:
            torch.cuda.empty_cache()

    meta["elapsed_s"] = round(time.time() - t_start, 1)
    rp.write_all(rp.rows_from(rows), out_dir, meta, plots=not args.no_plots and not args.profile)
    n_ok = sum(r.get("status") == "ok" for r in rows)
    print(f"[bench] {n_ok} measured rows in {meta['elapsed_s']} s -> {out_dir}")
    return 0 if n_ok else 1


def main(args) -> int:
    return run(args)


if __name__ == "__main__":  # `python -m harness.bench ...` also works
    ap = argparse.ArgumentParser(prog="python -m harness.bench")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
