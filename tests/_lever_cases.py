"""GPU cases shared by the lever tests (tests/test_rotation.py, tests/test_scale_rule.py): the prefill and decode
kernels against the reference with one FP4-path option set (qk_rotation=... or scale_rule=...), outputs poisoned
first. Each returns (relative L2 of O vs the reference, max |LSE difference|, O)."""
from __future__ import annotations

import math

import torch

from kernels.reference import thrift_attention_ref


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def prefill_case(dtype, D, budget, seed, *, Sq=333, Skv=517, causal=True, outlier_channel=None, **opts):
    """B=2, GQA 8/2 prefill through kernels.interface._run_prefill vs thrift_attention_ref, both with **opts.
    outlier_channel: K channel scaled by 8 (a channel a rotation should spread)."""
    from kernels.interface import _run_prefill
    from kernels.schedules import get_schedule
    from kernels.selection import select_blocks

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, Sq, 8, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(2, Skv, 2, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(2, Skv, 2, D, device="cuda", dtype=dtype, generator=g)
    if outlier_channel is not None:
        k[..., outlier_channel] *= 8
    sel = select_blocks(q, k, budget=budget, causal=causal)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 8, Sq), float("nan"), device="cuda")
    _run_prefill(q, k, v, sel.to(torch.int32).contiguous(), causal, 1 / math.sqrt(D), get_schedule(None), "nvfp4",
                 out=out, lse=lse, **opts)
    ref, ref_lse = thrift_attention_ref(q, k, v, selected=sel, return_lse=True, causal=causal, **opts)
    assert not out.isnan().any() and not lse.isnan().any()
    fin = torch.isfinite(ref_lse)
    return rel_l2(out, ref), (lse[fin] - ref_lse[fin]).abs().max().item(), out


def decode_case(lens, H, HQ, D, dtype, budget, seed, *, outlier_channel=None, **cache_opts):
    """thrift_decode over a ThriftKVCache(**cache_opts) with ragged lengths vs thrift_decode_ref, same flags."""
    from kernels.decode_interface import select_decode_blocks, thrift_decode, thrift_decode_ref
    from kernels.kv_cache import ThriftKVCache

    g = torch.Generator(device="cuda").manual_seed(seed)
    B, T = len(lens), max(lens)
    k = torch.randn((B, T, H, D), generator=g, device="cuda")
    if outlier_channel is not None:
        k[..., outlier_channel] *= 8
    v = torch.randn((B, T, H, D), generator=g, device="cuda")
    c = ThriftKVCache(B, H, D, capacity=64, dtype=dtype, device="cuda", **cache_opts)
    c.append(k.to(dtype), v.to(dtype), num_new=lens)
    q = (torch.randn((B, 1, HQ, D), generator=g, device="cuda") * 1.5).to(dtype)
    flags = select_decode_blocks(q, c, budget)
    x = torch.full((1 << 26,), float("nan"), device="cuda")  # poison the allocator's free blocks
    del x
    out, lse = thrift_decode(q, c, budget=budget, return_lse=True, flags=flags)
    ref, lse_ref = thrift_decode_ref(q, c, return_lse=True, flags=flags)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    return rel_l2(out, ref), (lse - lse_ref).abs().max().item(), out
