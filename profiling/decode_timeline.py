"""Per-CTA timeline of the split-KV decode kernel (where the B=1 fixed cost goes) -- GPU only.

python -m profiling.decode_timeline [--batch 1] [--len 131072] [--budgets 0 0.05] [--schedule k=v,...]
    [--out FILE.json]

Runs the kernel built with DecodeConfig(trace=True) once per budget (after a warm-up launch): every CTA records
%globaltimer at entry and %clock64 at the end of its prologue (split range + FP4 ballots), when its first tile's
bytes have landed, at the end of its tile loop and at the end of its epilogue (kernels/decode.py TRACE_FIELDS).
Prints, in microseconds from the first CTA's entry: the spread of CTA starts, each phase's percentiles, the
spread of CTA ends, the whole span; a least-squares fit of the loop time on the split's FP4 / FP16 tile counts;
and, for the untraced default kernel on the same inputs, do_bench medians (L2 flushed) of the split kernel alone,
the combine alone and the pair. The traced launch's outputs are not attention (the trace overwrites them).
Occupancy caveat: the trace build takes more registers than the kernel it traces (sm_90a, D=128, G=4: 203 vs 168),
so at most 8 one-warp CTAs fit an SM (the untraced kernel: 12). A schedule of more than 8 CTAs per SM runs in two
waves here only (late CTA starts, a long tail), so its timeline is not the untraced kernel's; trust the do_bench
figures for those, and read timelines of <= 8 CTAs per SM.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _pct(x, qs=(0, 10, 50, 90, 100)):
    import numpy as np

    return {f"p{q}": round(float(np.percentile(x, q)), 2) for q in qs}


def analyse(tr, n_sms: int):
    """tr: float tensor [NCTA, TRACE_SLOTS] -> dict of timeline statistics (microseconds)."""
    import numpy as np

    from kernels.decode import TRACE_FIELDS

    a = {f: tr[:, i].astype(np.int64) for i, f in enumerate(TRACE_FIELDS)}
    g0 = (a["g0_hi"] << 16) | a["g0_lo"]
    start = ((g0 - g0.min()) % (1 << 32)) / 1e3  # us
    ghz = a["c_end"] / np.maximum(a["g_span_ns"], 1)  # cycles per ns
    clk = float(np.median(ghz))
    pro = a["c_prologue"] / clk / 1e3
    first = np.where(a["c_first_tile"] > 0, a["c_first_tile"] - a["c_prologue"], 0) / clk / 1e3
    loop_start = np.where(a["c_first_tile"] > 0, a["c_first_tile"], a["c_prologue"])
    loop = (a["c_loop_end"] - loop_start) / clk / 1e3
    epi = (a["c_end"] - a["c_loop_end"]) / clk / 1e3
    end = start + a["g_span_ns"] / 1e3
    n16 = a["n_f16"]
    n4 = a["n_tiles"] - n16
    # loop time ~ x0 + x4 * n_fp4 + x16 * n_f16 (per-warp time of a tile while the SM is shared as it was)
    X = np.stack([np.ones_like(n4), n4, n16], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(X, loop, rcond=None)
    resid = loop - X @ coef
    per_sm = np.bincount(a["smid"], minlength=n_sms)
    out = dict(
        ctas=int(len(start)), sm_clock_GHz=round(clk, 3), span_us=round(float(end.max()), 2),
        start_us=_pct(start), prologue_us=_pct(pro), first_tile_wait_us=_pct(first), loop_us=_pct(loop),
        epilogue_us=_pct(epi), end_us=_pct(end),
        loop_fit_us=dict(const=round(float(coef[0]), 3), per_fp4_tile=round(float(coef[1]), 3),
                         per_f16_tile=round(float(coef[2]), 3), resid_rms=round(float(np.sqrt((resid ** 2).mean())), 3)),
        tiles=dict(fp4=_pct(n4), f16=_pct(n16)),
        ctas_per_sm=dict(min=int(per_sm.min()), max=int(per_sm.max()), mean=round(float(per_sm.mean()), 2)),
        # where the SM-time goes: the mean over CTAs of each phase as a share of the span
        share=dict(start=round(float(start.mean() / end.max()), 3), prologue=round(float(pro.mean() / end.max()), 3),
                   first_tile=round(float(first.mean() / end.max()), 3), loop=round(float(loop.mean() / end.max()), 3),
                   epilogue=round(float(epi.mean() / end.max()), 3),
                   idle_after_end=round(float((end.max() - end).mean() / end.max()), 3)),
    )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--len", type=int, default=131072)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--schedules", nargs="*", default=[""],
                    help="k=v,... (DecodeConfig fields and ctas_per_sm | num_splits), one run each; '' = default")
    ap.add_argument("--same-flags", action="store_true",
                    help="also time every KV head reading the same selected blocks (head 0's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import dataclasses

    from triton.testing import do_bench

    from kernels.decode import TRACE_SLOTS, DecodeConfig
    from kernels.decode_interface import (_arch, _get_kernels, plan_splits, prequantize_query, select_decode_blocks,
                                          work_counters, work_from_flags)
    from kernels.kv_cache import BLOCK, ThriftKVCache

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    B, L, H, HQ, D, dt = args.batch, args.len, args.hkv, args.hq, args.d, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn((B, L, H, D), generator=g, device=dev).to(dt)
    v = torch.randn((B, L, H, D), generator=g, device=dev).to(dt)
    q = torch.randn((B, 1, HQ, D), generator=g, device=dev).to(dt)
    cache = ThriftKVCache(B, H, D, capacity=L, dtype=dt, device=dev)
    cache.append(k, v)
    del k, v
    q16 = q[:, 0].contiguous()
    q_rot = prequantize_query(q16, cache.qk_rotation, cache.scale_rule)
    lens = cache.lengths_tensor(dev)
    o_out = torch.empty((B, 1, HQ, D), dtype=dt, device=dev)
    l_out = torch.empty((B, HQ), dtype=torch.float32, device=dev)
    sl2 = 1.0 / math.sqrt(D) * math.log2(math.e)
    res = dict(device=props.name, B=B, L=L, Hq=HQ, Hkv=H, D=D,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs=[])
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}

    def bench(fn):
        return round(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3, 2)

    def run_budgets(args, text, ns, tps, cfg, kd, kc, kt, o_part, lse_part):
        for bud in args.budgets:
            flag_sets = [("per-head", select_decode_blocks(q, cache, bud))]
            if args.same_flags and bud > 0:
                f0 = flag_sets[0][1]
                flag_sets.append(("same-as-head-0", f0[:, :1].expand_as(f0).contiguous()))
            cnt = work_counters(dev, B, H)
            for name, flags in flag_sets:
                work = work_from_flags(flags)

                def split():
                    kd(cache.tiles, cache.k16, cache.v16, q16, q_rot, flags, work, cnt, lens, o_part, lse_part, sl2, tps)

                def comb():
                    kc(o_part, lse_part, o_out, l_out)

                def pair():
                    split()
                    comb()
                row = dict(schedule=text, splits=ns, tiles_per_split=tps, config=repr(cfg), budget=bud, flags=name,
                           split_us=bench(split), combine_us=bench(comb), pair_us=bench(pair))
                for _ in range(3):  # warm-up, then the recorded launch (L2 flushed like do_bench does)
                    torch.empty(256 << 20, dtype=torch.uint8, device=dev).zero_()
                    kt(cache.tiles, cache.k16, cache.v16, q16, q_rot, flags, work, cnt, lens, o_part, lse_part, sl2, tps)
                torch.cuda.synchronize()
                tr = o_part[:, ::HQ // H, :, :TRACE_SLOTS].reshape(-1, TRACE_SLOTS).cpu().numpy()
                row["timeline"] = analyse(tr, props.multi_processor_count)
                res["runs"].append(row)
                print(json.dumps(row), flush=True)

    for text in args.schedules:
        sched = {}
        for item in filter(None, text.split(",")):
            k_, v_ = item.split("=")
            sched[k_.strip()] = v_.strip() if k_.strip() == "work" else int(v_)
        bad = set(sched) - fields - {"ctas_per_sm", "num_splits"}
        if bad:
            raise ValueError(f"--schedules: unknown keys {sorted(bad)}")
        ns, tps = plan_splits(-(-L // BLOCK), B, H, props.multi_processor_count,
                              {k_: v_ for k_, v_ in sched.items() if k_ in ("ctas_per_sm", "num_splits")})
        cfg = dataclasses.replace(DecodeConfig(fp4_layout=cache.fp4_layout),
                                  **{k_: v_ for k_, v_ in sched.items() if k_ in fields})
        kd, kc = _get_kernels(D, H, HQ // H, dt, _arch(dev), cfg)
        kt, _ = _get_kernels(D, H, HQ // H, dt, _arch(dev), dataclasses.replace(cfg, trace=True))
        o_part = torch.empty((B, HQ, ns, D), dtype=torch.float32, device=dev)
        lse_part = torch.empty((B, HQ, ns), dtype=torch.float32, device=dev)
        run_budgets(args, text, ns, tps, cfg, kd, kc, kt, o_part, lse_part)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
