"""Benchmark of thrift_decode vs SDPA bf16 decode and FA4 (flash_attn.cute) -- issue 4.

python -m kernels.decode_bench [--lens 8192 32768 131072] [--batches 1 8] [--out FILE]
    [--ctas-per-sm 8 10] [--sweep 96 128 158 200] [--fp4-layout nibble bits]
    [--schedules "parts=1,stages=2,f16_cost=0" "min_ctas=15,ctas_per_sm=15" ...]
    (variants of budget 0.05, kernels only; --fp4-layout: the same cache's tiles re-laid out in each FP4 word
    layout of kernels/kv_cache.py, timed at the default splits and, with --sweep, at every swept split count;
    --schedules: thrift_decode schedule dicts written k=v,k=v (DecodeConfig fields + ctas_per_sm | num_splits),
    each timed at budgets 0 and 0.05, with the max |difference| of its output and LSE from the default schedule's
    (another split plan only reorders the fp32 merge: ~1e-4 on O in bf16))
Median of triton do_bench (L2 flushed between reps). GB/s = bytes the kernel must read (FP4 tiles of the FP4
blocks, FP16 K+V of the selected and partial blocks) / time. Also a device-to-device copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.05, 0.25])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", type=int, nargs="*", default=[],
                    help="also time B=1, L=max(lens), budget 0.05 with these num_splits (kernels only)")
    ap.add_argument("--ctas-per-sm", type=int, nargs="*", default=[],
                    help="also time budget 0.05 of every shape with the splits planned for these CTAs per SM")
    ap.add_argument("--schedules", nargs="*", default=[],
                    help="also time budgets 0 and 0.05 of every shape with these schedules (k=v,k=v: DecodeConfig "
                         "fields parts/stages/f16_cost/min_ctas/f16_depth and ctas_per_sm or num_splits)")
    ap.add_argument("--no-fa4", action="store_true", help="skip the FA4 baseline (its compiles take a while)")
    ap.add_argument("--fp4-layout", nargs="*", default=[], choices=["nibble", "bits"],
                    help="also time budget 0.05 of every shape with the tiles in these FP4 word layouts")
    args = ap.parse_args(argv)

    from kernels.decode_interface import (CONFIG_KEYS, _arch, _get_kernels, decode_config, decode_fwd, plan_splits,
                                          prequantize_query, select_decode_blocks, thrift_decode, work_counters,
                                          work_from_flags, default_work)
    from kernels.kv_cache import BLOCK, ThriftKVCache, relayout_tiles, tile_bytes
    from quant.rotation import maybe_rotate

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    rows = []

    def parse_schedule(text):  # "parts=2,stages=3,ctas_per_sm=15,work=dynamic" -> dict (ints, work a string)
        out = {}
        for item in filter(None, text.split(",")):
            k_, v_ = item.split("=")
            out[k_.strip()] = v_.strip() if k_.strip() == "work" else int(v_)
        return out

    def cfg_of(sched, layout=None, tps_=None):  # the DecodeConfig thrift_decode runs for a schedule dict
        return decode_config(layout or cache.fp4_layout, "pre", *(sched.get(k_, -1) for k_ in CONFIG_KEYS),
                             work=sched.get("work") or default_work(tps if tps_ is None else tps_))

    def time_pair(flags, ns_, tps_, cfg=None, tiles=None):
        kd_, kc_ = _get_kernels(D, H, HQ // H, dt, _arch(dev), cfg or cfg_of({}, tps_=tps_))
        tiles = cache.tiles if tiles is None else tiles
        work_ = work_from_flags(flags)
        cnt_ = work_counters(dev, B, H)
        op_ = torch.empty((B, HQ, ns_, D), dtype=torch.float32, device=dev)
        lp_ = torch.empty((B, HQ, ns_), dtype=torch.float32, device=dev)
        oo_ = torch.empty((B, 1, HQ, D), dtype=dt, device=dev)
        lo_ = torch.empty((B, HQ), dtype=torch.float32, device=dev)

        def fn():
            kd_(tiles, cache.k16, cache.v16, q16, q_rot, flags, work_, cnt_, lens, op_, lp_, scale * math.log2(math.e), tps_)
            kc_(op_, lp_, oo_, lo_)
        return _bench(fn)

    def dump(partial):
        if args.out:
            res = dict(device=props.name, sms=props.multi_processor_count, copy_GBs=copy_gbs, rows=rows,
                       default_config=repr(decode_config()), partial=partial,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            with open(args.out, "w") as fh:
                json.dump(res, fh, indent=1)
    # device-to-device copy bandwidth (read + write bytes)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / (t * 1e-3) / 1e9
    del src, dst
    print(f"device {props.name}, {props.multi_processor_count} SMs; d2d copy {copy_gbs:.0f} GB/s", flush=True)
    fa4 = None
    try:
        if not args.no_fa4:
            from flash_attn.cute import flash_attn_func as fa4
    except Exception as e:  # noqa: BLE001
        print("FA4 unavailable:", repr(e))
    D, H, HQ, dt = args.d, args.hkv, args.hq, torch.bfloat16
    scale = 1.0 / math.sqrt(D)
    for B in args.batches:
        for L in args.lens:
            torch.cuda.empty_cache()
            g = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn((B, L, H, D), generator=g, device=dev).to(dt)
            v = torch.randn((B, L, H, D), generator=g, device=dev).to(dt)
            q = torch.randn((B, 1, HQ, D), generator=g, device=dev).to(dt)
            t0 = time.time()
            cache = ThriftKVCache(B, H, D, capacity=L, dtype=dt, device=dev)
            cache.append(k, v)
            torch.cuda.synchronize()
            build_s = time.time() - t0
            row = dict(B=B, L=L, cache_build_s=round(build_s, 2))
            kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            del k, v
            qt = q.transpose(1, 2).contiguous()
            f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
            row["sdpa_ms"] = _bench(f)
            bf16_bytes = 2 * B * L * H * D * 2
            row["sdpa_GBs"] = bf16_bytes / (row["sdpa_ms"] * 1e-3) / 1e9
            if fa4 is not None:
                try:
                    kk, vv = kt.transpose(1, 2), vt.transpose(1, 2)
                    kk, vv = kk.contiguous(), vv.contiguous()
                    row["fa4_ms"] = _bench(lambda: fa4(q, kk, vv, causal=True))
                    del kk, vv
                except Exception as e:  # noqa: BLE001
                    row["fa4_err"] = repr(e)[:200]
            del kt, vt, qt
            q16 = q[:, 0].contiguous()
            # the FP4 tiles' query, quantized once per call as thrift_decode does (its time is reported separately)
            q_rot = prequantize_query(q16, cache.qk_rotation, cache.scale_rule)
            row["q_prequantize_ms"] = _bench(lambda: prequantize_query(q16, cache.qk_rotation, cache.scale_rule))
            ns, tps = plan_splits(-(-L // BLOCK), B, H, props.multi_processor_count)
            lens = cache.lengths_tensor(dev)
            for bud in args.budgets:
                flags, work = select_decode_blocks(q, cache, bud, return_work=True)
                cnt = work_counters(dev, B, H)
                nsel = int(flags.sum())
                nblk = B * H * (L // BLOCK)
                part = B * H * (1 if L % BLOCK else 0)
                must = (nblk - nsel) * tile_bytes(D) + (nsel + part) * BLOCK * D * 2 * 2
                # kernel time: the two compiled kernels called directly (no custom-op dispatch, no selection)
                o_part = torch.empty((B, HQ, ns, D), dtype=torch.float32, device=dev)
                lse_part = torch.empty((B, HQ, ns), dtype=torch.float32, device=dev)
                o_out = torch.empty((B, 1, HQ, D), dtype=dt, device=dev)
                l_out = torch.empty((B, HQ), dtype=torch.float32, device=dev)
                kd, kc = _get_kernels(D, H, HQ // H, dt, _arch(dev), cfg_of({}))

                def fk():
                    kd(cache.tiles, cache.k16, cache.v16, q16, q_rot, flags, work, cnt, lens, o_part, lse_part,
                       scale * math.log2(math.e), tps)
                    kc(o_part, lse_part, o_out, l_out)
                fk()
                ref_o, ref_l = decode_fwd(q16, q_rot, cache.tiles, cache.k16, cache.v16, flags, work, lens, scale, ns,
                                          tps, cache.fp4_layout, "pre")
                # the op and the direct call agree up to the merge order (work="dynamic" reorders the fp32 merge per
                # run; in bf16 that flips output roundings, ~1e-3): a lost or doubled 64-key tile moves LSE by ~5e-4
                assert ((ref_o.float() - o_out.float()).norm() / o_out.float().norm()).item() < 4e-3
                assert (ref_l - l_out).abs().max().item() < 5e-5
                fo = lambda: decode_fwd(q16, q_rot, cache.tiles, cache.k16, cache.v16, flags, work, lens, scale, ns, tps,  # noqa: E731
                                        cache.fp4_layout, "pre")
                fe = lambda: thrift_decode(q, cache, budget=bud)  # noqa: E731
                tk = _bench(fk)
                te = _bench(fe)
                if bud == 0.05:  # where the time goes: split-KV kernel alone, combine alone
                    row["b0.05_decode_only_ms"] = _bench(lambda: kd(cache.tiles, cache.k16, cache.v16, q16, q_rot, flags, work, cnt, lens,
                                                                    o_part, lse_part, scale * math.log2(math.e), tps))
                    row["b0.05_combine_only_ms"] = _bench(lambda: kc(o_part, lse_part, o_out, l_out))
                    # A/B: the query quantized in every CTA with the cache's rule (the path before "pre")
                    kd_in, _ = _get_kernels(D, H, HQ // H, dt, _arch(dev),
                                            decode_config(cache.fp4_layout, cache.scale_rule))
                    q_r = maybe_rotate(q16, cache.qk_rotation).contiguous()
                    row["b0.05_decode_only_inkernel_q_ms"] = _bench(
                        lambda: kd_in(cache.tiles, cache.k16, cache.v16, q16, q_r, flags, work, cnt, lens, o_part, lse_part,
                                      scale * math.log2(math.e), tps))
                row[f"b{bud}_kernel_ms"] = tk
                row[f"b{bud}_op_ms"] = _bench(fo)
                row[f"b{bud}_e2e_ms"] = te
                row[f"b{bud}_GBs"] = must / (tk * 1e-3) / 1e9
                row[f"b{bud}_MB"] = must / 1e6
            row["splits"] = ns
            if args.ctas_per_sm:
                flags = select_decode_blocks(q, cache, 0.05)
                for c_ in args.ctas_per_sm:
                    n2, t2 = plan_splits(-(-L // BLOCK), B, H, props.multi_processor_count, {"ctas_per_sm": c_})
                    row[f"b0.05_cps{c_}_ns{n2}_kernel_ms"] = time_pair(flags, n2, t2)
            for text in args.schedules:
                sch = parse_schedule(text)
                n2, t2 = plan_splits(-(-L // BLOCK), B, H, props.multi_processor_count,
                                     {k_: v_ for k_, v_ in sch.items() if k_ in ("ctas_per_sm", "num_splits")})
                cfg = cfg_of(sch, tps_=t2)
                for bud in (0.0, 0.05):
                    flags = select_decode_blocks(q, cache, bud)
                    row[f"sched[{text}]_ns{n2}_b{bud}_kernel_ms"] = time_pair(flags, n2, t2, cfg)
                    o_s = thrift_decode(q, cache, budget=bud, schedule=sch, return_lse=True)
                    o_d = thrift_decode(q, cache, budget=bud, return_lse=True)
                    # the same math in another order of tiles per split -> equal up to fp32 rounding of the merge
                    row[f"sched[{text}]_b{bud}_max_abs_diff_vs_default"] = max(
                        (o_s[0].float() - o_d[0].float()).abs().max().item(), (o_s[1] - o_d[1]).abs().max().item())
            lay_tiles = {}
            if args.fp4_layout:  # same codes, other word layouts; outputs must agree bit for bit
                flags = select_decode_blocks(q, cache, 0.05)
                outs = {}
                for lay in args.fp4_layout:
                    lay_tiles[lay] = relayout_tiles(cache.tiles, cache.fp4_layout, lay)
                    for c_ in (args.ctas_per_sm or [None]):
                        n2, t2 = (ns, tps) if c_ is None else plan_splits(
                            -(-L // BLOCK), B, H, props.multi_processor_count, {"ctas_per_sm": c_})
                        row[f"b0.05_{lay}_ns{n2}_kernel_ms"] = time_pair(flags, n2, t2, cfg_of({}, lay, t2),
                                                                          lay_tiles[lay])
                    outs[lay] = decode_fwd(q16, q_rot, lay_tiles[lay], cache.k16, cache.v16, flags,
                                           work_from_flags(flags), lens, scale, ns, tps,
                                           lay, "pre", work_mode="static")  # static: a deterministic merge
                ref_lay = outs[args.fp4_layout[0]]
                row["fp4_layouts_bit_identical"] = all(torch.equal(o[0], ref_lay[0]) and torch.equal(o[1], ref_lay[1])
                                                       for o in outs.values())
            if args.sweep and B == 1 and L == max(args.lens):
                flags = select_decode_blocks(q, cache, 0.05)
                for n in args.sweep:
                    n2, t2 = plan_splits(-(-L // BLOCK), B, H, props.multi_processor_count, {"num_splits": n})
                    row[f"sweep_ns{n2}_ms"] = time_pair(flags, n2, t2)
                    for lay, tl in lay_tiles.items():
                        row[f"sweep_ns{n2}_{lay}_ms"] = time_pair(flags, n2, t2, cfg_of({}, lay, t2), tl)
            del lay_tiles
            rows.append(row)
            print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
            dump(partial=True)
            del cache
    dump(partial=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
