"""GPU tests of kernels/select_topk.py: select_and_mask == (select_blocks, selection_bitmask) bit for bit.

Fresh random inputs, outputs poisoned before the kernel writes them, lengths that are not multiples of 64, Sq != Skv
both ways (bottom-right causal alignment), GQA, every selection method, budgets 0 .. 1 and top_k, rows with tied
scores (repeated and zero key blocks), -0.0 / +0.0 ties, a NaN score, and > 1024 key blocks (several bitmask words
per lane).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

POISON = 0x5EADBEEF


def _check(q, k, **kw):
    from kernels.interface import selection_bitmask
    from kernels.select_topk import select_and_mask
    from kernels.selection import select_blocks

    ref = select_blocks(q, k, **kw)
    nkb = -(-k.shape[1] // kw.get("block_size", 64))
    ref_mask = selection_bitmask(ref, nkb)
    sel = torch.full_like(ref, POISON)
    mask = torch.full_like(ref_mask, POISON)
    got, got_mask = select_and_mask(q, k, out=(sel, mask), **kw)
    assert got.data_ptr() == sel.data_ptr() and got_mask.data_ptr() == mask.data_ptr()
    assert torch.equal(got, ref), f"selection differs: {(got != ref).sum().item()} entries ({kw})"
    assert torch.equal(got_mask, ref_mask), f"bitmask differs ({kw})"
    return ref


def _qkv(seed, B, Sq, Skv, Hq, Hkv, D=64, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Skv, Hkv, D, device="cuda", dtype=dtype, generator=g)
    return q, k


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 2), (1, 300, 1100, 4, 4), (1, 1100, 300, 4, 1),
                                   (1, 4097, 4097, 2, 2)], ids=["gqa_1000", "sq_lt_skv", "sq_gt_skv", "4097"])
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.25, 1.0])
def test_topk_matches_select_blocks(shape, causal, budget, rng_seed):
    B, Sq, Skv, Hq, Hkv = shape
    q, k = _qkv(rng_seed, B, Sq, Skv, Hq, Hkv)
    _check(q, k, budget=budget, causal=causal)


@pytest.mark.parametrize("method", ["quest", "local", "random"])
def test_topk_methods(method, rng_seed):
    q, k = _qkv(rng_seed, 1, 900, 900, 4, 2, dtype=torch.bfloat16)
    _check(q, k, budget=0.25, causal=True, method=method, seed=rng_seed % 1000)
    _check(q, k, causal=False, method=method, top_k=5, seed=rng_seed % 1000)


def test_topk_ties_signed_zero_nan(rng_seed):
    q, k = _qkv(rng_seed, 1, 1500, 1500, 2, 2)
    k[:, 64:128] = k[:, 0:64]        # key blocks 0 and 1 equal: equal scores, the lower index first
    k[:, 640:704] = k[:, 0:64]
    k[:, 256:320] = 0                # a zero block: score 0 in every row; -0.0 where the mean q is 0 too
    q[:, 192:256] = 0                # query block 3: all scores +-0 -> every visible block ties
    _check(q, k, budget=0.25, causal=True)
    _check(q, k, top_k=40, causal=False)
    qn = q.clone()
    qn[:, 130, 1, 5] = float("nan")  # one query block of head 1 scores NaN everywhere (sorts first, by index)
    kn = k.clone()
    kn[:, 900, 0, 3] = float("nan")  # one key block scores NaN for head 0
    _check(qn, kn, budget=0.05, causal=True)


def test_topk_many_words(rng_seed):
    # 2100 key blocks: 66 bitmask words (lanes hold up to 3), k up to 2100 (budget 1: every visible block, sorted)
    q, k = _qkv(rng_seed, 1, 64 * 2100 - 17, 64 * 2100 - 17, 1, 1, D=16)
    _check(q, k, budget=0.05, causal=True)
    _check(q, k, top_k=300, causal=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 2, 128), (1, 300, 1100, 4, 4, 64), (1, 1100, 300, 4, 1, 128)],
                         ids=["gqa_1000", "sq_lt_skv", "sq_gt_skv"])
def test_topk_with_quantizer_means(shape, causal, rng_seed):
    """select_and_mask(means=) with the quantizer kernel's Q / K block means (with_qmean) == select_blocks."""
    from kernels.interface import quantize_for_prefill
    from kernels.select_topk import select_and_mask

    B, Sq, Skv, Hq, Hkv, D = shape
    q, k = _qkv(rng_seed, B, Sq, Skv, Hq, Hkv, D=D, dtype=torch.bfloat16 if D == 128 else torch.float16)
    qo = quantize_for_prefill(q, k, k.clone(), rotate=True, with_qmean=True)
    ref = _check(q, k, budget=0.25, causal=causal)
    sel, _ = select_and_mask(q, k, budget=0.25, causal=causal, means=(qo[-1], qo[6]))
    assert torch.equal(sel, ref), f"selection from the quantizer's means differs: {(sel != ref).sum().item()}"


def test_public_op_with_topk_kernel(rng_seed):
    """kernels.interface.SELECT_TOPK_KERNEL: the public op gives bit for bit what it gives with select_blocks' torch
    top-k, on the side stream (normal and high priority) and in order, and with the block means from the quantizer
    (SELECT_FUSED_MEANS)."""
    import kernels
    from kernels import interface as iface

    g = torch.Generator(device="cuda").manual_seed(rng_seed)
    q = torch.randn(1, 1234, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 1234, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 1234, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    saved = (iface.SELECT_TOPK_KERNEL, iface.SELECT_SIDE_STREAM, iface.SELECT_STREAM_PRIORITY,
             iface.SELECT_FUSED_MEANS)
    try:
        iface.SELECT_TOPK_KERNEL, iface.SELECT_FUSED_MEANS = False, False
        ref = kernels.thrift_attention(q, k, v, budget=0.25)
        iface.SELECT_TOPK_KERNEL = True
        for side, prio, fused in ((True, 0, False), (True, -1, False), (False, 0, False), (True, 0, True)):
            iface.SELECT_SIDE_STREAM, iface.SELECT_STREAM_PRIORITY, iface.SELECT_FUSED_MEANS = side, prio, fused
            out = kernels.thrift_attention(q, k, v, budget=0.25)
            assert torch.equal(out, ref), f"side stream {side}, priority {prio}, fused means {fused}: differs"
        iface.SELECT_FUSED_MEANS = True  # on a caller's stream, and the other budgets
        user = torch.cuda.Stream()
        user.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(user):
            o2 = kernels.thrift_attention(q, k, v, budget=0.25)
        torch.cuda.current_stream().wait_stream(user)
        assert torch.equal(o2, ref), "fused means on a user stream: differs"
        for b in (0.0, 0.05, 1.0):
            iface.SELECT_FUSED_MEANS = False
            r = kernels.thrift_attention(q, k, v, budget=b, causal=False)
            iface.SELECT_FUSED_MEANS = True
            assert torch.equal(kernels.thrift_attention(q, k, v, budget=b, causal=False), r), f"budget {b}: differs"
    finally:
        (iface.SELECT_TOPK_KERNEL, iface.SELECT_SIDE_STREAM, iface.SELECT_STREAM_PRIORITY,
         iface.SELECT_FUSED_MEANS) = saved
