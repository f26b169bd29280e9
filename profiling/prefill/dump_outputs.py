"""Dump the prefill's outputs on fixed inputs, for bit-for-bit A/B of two trees (numerics-preserving kernel changes
must give identical O and LSE).  Cases: fp16/bf16, D 64/128, causal/full, budgets 0/0.05/0.25, lengths that are not
multiples of 64, GQA 4:1, for the default schedule; named schedules (argv) run the first shape only.

  PYTHONPATH=<tree> python profiling/prefill/dump_outputs.py OUT.pt [schedule ...]
  python profiling/prefill/dump_outputs.py --compare A.pt B.pt       # prints each case: identical or max |diff|
"""
import math
import sys

import torch


def dump(path, scheds):
    import kernels
    from kernels.interface import _run_prefill
    from kernels.schedules import get_schedule
    from kernels.selection import select_blocks

    res = {}
    for sc in [None] + scheds:
        for dt in (torch.float16, torch.bfloat16):
            shapes = ((128, 1000, 8, 2, True), (64, 777, 4, 4, False), (128, 4096, 4, 1, True))
            for D, S, Hq, Hkv, causal in shapes if sc is None else shapes[:1]:
                for b in (0.0, 0.05, 0.25):
                    g = torch.Generator(device="cuda").manual_seed(1234 + S + D)
                    q = torch.randn(1, S, Hq, D, device="cuda", dtype=dt, generator=g)
                    k = torch.randn(1, S, Hkv, D, device="cuda", dtype=dt, generator=g)
                    v = torch.randn(1, S, Hkv, D, device="cuda", dtype=dt, generator=g)
                    sel = select_blocks(q, k, budget=b, causal=causal).to(torch.int32).contiguous()
                    o = torch.full_like(q, float("nan"))
                    lse = torch.full((1, Hq, S), float("nan"), device="cuda")
                    _run_prefill(q, k, v, sel, causal, 1 / math.sqrt(D), get_schedule(sc), "nvfp4", out=o, lse=lse)
                    res[f"{sc or 'default'} {str(dt)[6:]} D={D} S={S} {Hq}:{Hkv} causal={causal} b={b}"] = (o.cpu(), lse.cpu())
    torch.save(res, path)
    print(f"dump_outputs: {len(res)} cases -> {path}")


def compare(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    same = 0
    for key in a:
        if key not in b:
            print(f"{key}: missing in {b_path}")
            continue
        (oa, la), (ob, lb) = a[key], b[key]
        eq = torch.equal(oa.view(torch.int16), ob.view(torch.int16)) and torch.equal(la.view(torch.int32), lb.view(torch.int32))
        same += eq
        if not eq:
            d = (oa.float() - ob.float()).abs().max().item()
            r = ((oa.double() - ob.double()).norm() / oa.double().norm()).item()
            print(f"{key}: DIFFERENT  max|dO| {d:.3e}  rel L2 {r:.3e}  max|dLSE| {(la - lb).abs().max().item():.3e}")
    print(f"compare: {same}/{len(a)} cases bit-identical")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        dump(sys.argv[1], sys.argv[2:])
