"""CPU tests of the decode selection and reference (kernels/decode_interface.py)."""
import math

import pytest
import torch

from kernels import kv_cache as kvc
from kernels.decode_interface import (default_work, plan_splits, select_decode_blocks, thrift_decode_ref,
                                      work_from_flags)
from kernels.reference import attention_exact
from kernels.selection import topk_for_budget


def _cache(lens, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lens), max(lens)
    k = torch.randn((B, T, H, D), generator=g).to(dtype)
    v = torch.randn((B, T, H, D), generator=g).to(dtype)
    c = kvc.ThriftKVCache(B, H, D, capacity=64, dtype=dtype)
    c.append(k, v, num_new=lens)
    return c


def test_selection_rule(rng_seed):
    lens, H, G, D = [64 * 20 + 5, 64 * 7, 30], 2, 3, 64
    c = _cache(lens, H, D, torch.float16, rng_seed)
    q = torch.randn((3, 1, H * G, D)).half()
    flags = select_decode_blocks(q, c, 0.25)
    for b, L in enumerate(lens):
        n = L // 64
        k = topk_for_budget(n, 0.25, causal=False) if n else 0
        assert int(flags[b].sum()) == H * k
        assert not flags[b, :, n:].any()  # partial/unused blocks never flagged (partial is always FP16)
        if k:
            qg = q[b, 0].float().reshape(H, G, D)
            s = torch.einsum("hgd,jhd->hgj", qg, c.kmean[b, :n]).amax(dim=1)  # [H, n]
            for h in range(H):
                top = set(torch.topk(s[h], k).indices.tolist())
                assert set(torch.nonzero(flags[b, h]).flatten().tolist()) == top
    assert not select_decode_blocks(q, c, 0.0).any()
    full = select_decode_blocks(q, c, 1.0)
    assert int(full[0].sum()) == H * 20 and int(full[2].sum()) == 0


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.25, 1.0])
def test_fp16_work_list(budget, rng_seed):
    """The dynamic kernel's FP16 work list (items 1..KL; kernels/decode.py DecodeConfig.work) holds exactly each head's
    flagged blocks, once each, -1 after them -- from the selection's top-k and from caller flags alike -- and KL >= 1;
    a wrong list would make the kernel skip or double a tile (its scan phase skips every flagged block)."""
    lens, H, G, D = [64 * 37 + 9, 64 * 5, 30, 0], 3, 2, 64
    c = _cache(lens, H, D, torch.float16, rng_seed)
    q = torch.randn((4, 1, H * G, D)).half()
    flags, work = select_decode_blocks(q, c, budget, return_work=True)
    assert torch.equal(flags, select_decode_blocks(q, c, budget))
    for w in (work, work_from_flags(flags)):
        assert w.dtype == torch.int32 and w.is_contiguous() and w.shape[:2] == (4, H) and w.shape[2] >= 1
        for b in range(4):
            for h in range(H):
                row = w[b, h].tolist()
                n = sum(x >= 0 for x in row)
                assert all(x >= 0 for x in row[:n]) and all(x == -1 for x in row[n:])
                assert sorted(row[:n]) == torch.nonzero(flags[b, h]).flatten().tolist()
    assert default_work(1) == "static" and default_work(4) == "dynamic"


def test_reference_budget_one_is_near_exact(rng_seed):
    """budget=1: everything FP16 -> the reference equals exact attention up to 16-bit rounding of P."""
    c = _cache([200, 64], 2, 64, torch.float16, rng_seed)
    q = torch.randn((2, 1, 4, 64)).half()
    out, lse = thrift_decode_ref(q, c, budget=1.0, return_lse=True)
    for b, L in enumerate(c.lengths):
        kk, vv = c.keys(b), c.values(b)
        ex, lex = attention_exact(q[b:b + 1], kk, vv, causal=True, return_lse=True)
        err = (out[b:b + 1].double() - ex).norm() / ex.norm()
        assert err < 2e-3
        torch.testing.assert_close(lse[b].double(), lex[0, :, 0], rtol=1e-4, atol=1e-4)


def test_plan_splits():
    ns, tps = plan_splits(2048, 1, 8, 132)
    assert ns * tps >= 2048 and (ns - 1) * tps < 2048 and 8 * ns <= 132 * 10
    ns, tps = plan_splits(3, 8, 8, 132)
    assert ns * tps >= 3 and ns <= 3
    assert plan_splits(100, 1, 1, 10, {"num_splits": 7}) == (7, 15)
    # default CTAs per SM: 8 while splits are short (B=1, 128k: 128 splits; B=8, 8k), 11 once each keeps >= 20 tiles
    assert plan_splits(2048, 1, 8, 132) == (128, 16)
    assert plan_splits(2048, 8, 8, 132) == (23, 90)
    assert plan_splits(512, 8, 8, 132) == (23, 23)  # B=8, 32k
    assert plan_splits(128, 8, 8, 132) == (16, 8)  # B=8, 8k: short splits, 8 per SM (17 planned, 8 tiles each)
    assert plan_splits(2048, 8, 8, 132, {"ctas_per_sm": 8}) == (17, 121)
    with pytest.raises(ValueError, match="schedule"):
        plan_splits(10, 1, 1, 10, {"bogus": 1})
    with pytest.raises(ValueError, match="ctas_per_sm"):
        plan_splits(10, 1, 1, 10, {"ctas_per_sm": 0})


def test_flags_checks_padding_and_config():
    """Caller-given flags are validated (a short tensor would be read out of bounds by the kernel); selection pads the
    flag rows to a multiple of 16 (16-byte loads in the split kernel), pad_flags does it for other callers; the
    schedule's DecodeConfig fields are validated with the field named."""
    from kernels.decode_interface import _check_flags, decode_config, pad_flags

    c = _cache([64 * 20 + 5, 64 * 7], 2, 64, torch.float16, 0)  # 21 blocks for the longest sequence
    q = torch.randn((2, 1, 4, 64)).half()
    flags = select_decode_blocks(q, c, 0.25)
    assert flags.shape[2] % 16 == 0 and flags.shape[2] >= c.capacity // 64 and not flags[:, :, c.capacity // 64:].any()
    _check_flags(flags, c, "t")
    _check_flags(flags[:, :, :21], c, "t")
    with pytest.raises(ValueError, match="flags must be"):
        _check_flags(flags[:, :, :20], c, "t")
    with pytest.raises(ValueError, match="flags must be"):
        _check_flags(flags[:1], c, "t")
    with pytest.raises(TypeError, match="uint8"):
        _check_flags(flags.int(), c, "t")
    p = pad_flags(flags[:, :, :21])
    assert p.shape[2] == 32 and p.is_contiguous() and torch.equal(p[:, :, :21], flags[:, :, :21])
    assert not p[:, :, 21:].any()
    assert pad_flags(flags) is flags  # already padded and contiguous: no copy
    assert decode_config().parts == 2 and decode_config(parts=1).stages == 2  # stages follow parts by default
    for kw, field in (({"parts": 3}, "parts"), ({"parts": 1, "stages": 4}, "stages"), ({"f16_cost": -2}, "f16_cost"),
                      ({"f16_depth": 3}, "f16_depth"), ({"min_ctas": 40}, "min_ctas")):
        with pytest.raises(ValueError, match=field):
            decode_config(**kw)
    with pytest.raises(ValueError, match="fp4_layout"):
        decode_config(fp4_layout="packed")
