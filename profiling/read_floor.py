"""The floor under a memory-bound kernel's time on this GPU: an empty launch, and the fastest plain read of N bytes.

python -m profiling.read_floor [--mb 170 1361] [--out FILE]

A kernel that must read N bytes cannot beat the fastest kernel that only reads them, timed the same way. Timed like
kernels.decode_bench (median of triton do_bench, L2 flushed between reps, CUDA events), so the figures compare
directly with the decode benchmark's: e.g. the decode goal at B=1, 128k, budget 0.05 (issue 4) asks for 170 MB in
<= 69.1 us. Candidates: torch reductions (sum of int32, amax of bf16) and a triton read-and-xor kernel swept over
grid shape, warps and loads in flight; the best of them is the floor. Also: an empty launch (the event-to-event
cost of any kernel) and a device-to-device copy of the same bytes (read + write).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[170.0, 1361.0], help="MB (1e6 bytes) to read")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import triton
    import triton.language as tl
    from triton.testing import do_bench

    @triton.jit
    def empty(x_ptr):
        if tl.program_id(0) < 0:
            tl.store(x_ptr, 1)

    @triton.jit
    def read_xor(x_ptr, out_ptr, n_per, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * n_per
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(0, n_per, BLOCK * UNROLL):
            for u in tl.static_range(UNROLL):  # UNROLL independent 16-byte-per-thread loads in flight
                acc ^= tl.load(x_ptr + base + i + u * BLOCK + tl.arange(0, BLOCK))
        tl.store(out_ptr + pid, tl.xor_sum(acc, 0))

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    nsm = props.multi_processor_count
    res = dict(device=props.name, sms=nsm, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sizes=[])
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    res["empty_launch_us"] = {f"{g}x{w}": round(bench(lambda: empty[(g,)](flag, num_warps=w)), 2)
                              for g, w in ((1, 1), (nsm, 8), (8 * nsm, 1), (16 * nsm, 4))}
    print(f"{props.name}: empty launch {res['empty_launch_us']} us", flush=True)
    out = torch.empty(64 * nsm, dtype=torch.int32, device=dev)
    for mb in args.mb:
        n_int = int(mb * 1e6) // 4
        buf = torch.randint(-2**31, 2**31 - 1, (n_int,), dtype=torch.int32, device=dev)
        row = dict(MB=mb, runs={})
        row["runs"]["torch_sum_int32"] = bench(lambda: buf.sum())
        row["runs"]["torch_amax_bf16"] = bench(lambda: buf.view(torch.bfloat16).amax())
        for ctas_per_sm, warps, vec, unroll in ((8, 1, 4, 2), (8, 1, 4, 4), (16, 4, 4, 2), (4, 8, 4, 2),
                                                (2, 8, 8, 2), (8, 4, 4, 4), (32, 4, 4, 1), (1, 16, 8, 2)):
            grid = ctas_per_sm * nsm
            block = 32 * warps * vec
            step = block * unroll
            n_per = n_int // grid // step * step
            if n_per == 0:
                continue
            t = bench(lambda: read_xor[(grid,)](buf, out, n_per, BLOCK=block, UNROLL=unroll, num_warps=warps))
            row["runs"][f"triton_{grid}x{warps}w_v{vec}_u{unroll}"] = t * (n_int / (grid * n_per))  # scaled to N
        row["copy_us"] = bench(lambda: buf[: n_int // 2].clone())  # n/2 read + n/2 written
        best = min(row["runs"], key=row["runs"].get)
        row["best"] = best
        row["floor_us"] = round(row["runs"][best], 2)
        row["floor_GBs"] = round(mb * 1e6 / (row["runs"][best] * 1e-6) / 1e9, 1)
        row["runs"] = {k: round(v, 2) for k, v in row["runs"].items()}
        row["copy_us"] = round(row["copy_us"], 2)
        res["sizes"].append(row)
        print(json.dumps(row), flush=True)
        del buf
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
