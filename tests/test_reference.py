"""thrift_attention_ref / attention_exact: budget=1 is exact attention, budget=0 sits in the FP4 error band, the
FP16/FP4 merge matches an independent per-row brute force, error falls with the budget, LSE, fully masked rows,
GQA, odd lengths, Sq != Skv, bad inputs."""
import math

import pytest
import torch

from harness.workload import make_workload
from kernels.reference import attention_exact, thrift_attention_ref
from kernels.selection import select_blocks, selection_mask
from quant.formats import get_format


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _qkv(B, Sq, Skv, Hq, Hkv, D, dtype=torch.float32, gen=None):
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Skv, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Skv, Hkv, D, generator=gen).to(dtype)
    return q, k, v


def _lse_close(lse, ref, tol):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert (lse.double()[fin] - ref.double()[fin]).abs().max() <= tol


# (B, Sq, Skv, Hq, Hkv, D, causal)
SHAPES = [
    (1, 200, 200, 4, 2, 64, True),  # GQA, partial last block
    (2, 130, 130, 2, 2, 128, False),
    (1, 130, 300, 3, 1, 64, True),  # MQA, Sq < Skv (bottom-right causal)
    (1, 300, 130, 2, 1, 32, True),  # Sq > Skv: leading rows fully masked
    (1, 100, 257, 2, 1, 48, False),  # D not a power of two
]


@pytest.mark.parametrize("shape", SHAPES)
def test_budget_one_equals_exact_fp32(shape, rng_seed):
    B, Sq, Skv, Hq, Hkv, D, causal = shape
    g = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(B, Sq, Skv, Hq, Hkv, D, gen=g)
    out = torch.full((B, Sq, Hq, D), float("nan"))  # poisoned: the reference must write every element
    rot = "hadamard" if D & (D - 1) == 0 else "none"  # the rotation needs a power-of-two head_dim
    o, lse = thrift_attention_ref(q, k, v, budget=1.0, causal=causal, return_lse=True, qk_rotation=rot)
    out.copy_(o)
    e, el = attention_exact(q, k, v, causal=causal, return_lse=True)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    assert not out.isnan().any()
    assert rel_l2(out, e) <= 1e-5
    _lse_close(lse, el, 1e-5)


def test_exact_matches_sdpa_and_custom_scale(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(1, 150, 150, 2, 2, 64, gen=g)
    e = attention_exact(q, k, v, causal=True, softmax_scale=0.3)
    s = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), is_causal=True,
        scale=0.3).transpose(1, 2)
    assert rel_l2(e, s) <= 1e-12
    o = thrift_attention_ref(q, k, v, budget=1.0, softmax_scale=0.3)
    assert rel_l2(o, e) <= 1e-5


def test_fully_masked_rows():
    q, k, v = _qkv(1, 200, 72, 2, 1, 64)
    for budget in (0.0, 0.5, 1.0):
        o, lse = thrift_attention_ref(q, k, v, budget=budget, return_lse=True)
        assert torch.equal(o[:, :128], torch.zeros_like(o[:, :128]))  # rows i < Sq - Skv see no key
        assert torch.isneginf(lse[:, :, :128]).all()
        assert torch.isfinite(lse[:, :, 128:]).all() and torch.isfinite(o).all()
        assert o[:, 128:].abs().sum() > 0
    e, el = attention_exact(q, k, v, return_lse=True)
    assert torch.equal(e[:, :128], torch.zeros_like(e[:, :128])) and torch.isneginf(el[:, :, :128]).all()


def test_budget_zero_in_fp4_band(rng_seed):
    """Pure FP4: not exact (a reference that skipped quantization would be ~1e-7) and not broken."""
    g = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(1, 256, 256, 2, 1, 64, gen=g)
    e = attention_exact(q, k, v)
    err = rel_l2(thrift_attention_ref(q, k, v, budget=0.0), e)
    assert 0.05 < err < 0.35, err  # Gaussian q, k, v: ~0.17
    err_mx = rel_l2(thrift_attention_ref(q, k, v, budget=0.0, fmt="mxfp4"), e)
    assert 0.05 < err_mx < 0.6, err_mx
    qw, kw, vw = make_workload(1024, heads_q=2, heads_kv=1, head_dim=64, seed=rng_seed % 1000)
    ew = attention_exact(qw[:, -256:], kw, vw)
    errw = rel_l2(thrift_attention_ref(qw[:, -256:], kw, vw, budget=0.0), ew)
    assert 0.03 < errw < 0.3, errw


def test_error_falls_with_budget_on_workload():
    q, k, v = make_workload(2048, heads_q=2, heads_kv=1, head_dim=128, seed=0)
    qe = q[:, -256:]
    e = attention_exact(qe, k, v)
    errs = [rel_l2(thrift_attention_ref(qe, k, v, budget=b), e) for b in (0.0, 0.05, 0.25, 1.0)]
    print("errors at budget 0/5%/25%/1:", errs)
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-3  # fp16 rounding of P~ and O only
    assert errs[2] < 0.8 * errs[0]


def _brute(q, k, v, blk_mask, *, causal, fmt, p_tile, block_size=64):
    """Per-row loop, written independently of the reference: per key the FP16 or FP4 score, one softmax (offset: the
    integer M = ceil(max * log2 e)), FP16 keys' P~ rounded to the input dtype, FP4 keys' P~ quantized tile by tile
    with an explicit s1 = max/(448*6)."""
    f = get_format(fmt)
    # Q, K, V with the reference's default NVFP4 scale rule "mse" (MXFP4 has one rule); P always with amax
    qkw = {"scale_rule": "mse"} if fmt == "nvfp4" else {}
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D)
    out = torch.zeros(B, Sq, Hq, D)
    lse = torch.full((B, Hq, Sq), float("-inf"))
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            K, V = k[b, :, hk].float(), v[b, :, hk].float()
            Kd, Vd = f.fake_quantize(k[b, :, hk], dim=-1, **qkw), f.fake_quantize(v[b, :, hk], dim=0, **qkw)
            for i in range(Sq):
                n_vis = min(Skv, i + Skv - Sq + 1) if causal else Skv
                if n_vis <= 0:
                    continue
                qi, qid = q[b, i, h].float(), f.fake_quantize(q[b, i, h], dim=-1, **qkw)
                is16 = blk_mask[b, h, i // block_size][torch.arange(n_vis) // block_size]
                s = torch.where(is16, (K[:n_vis] @ qi) * scale, (Kd[:n_vis] @ qid) * scale)
                # the contract's softmax offset: an integer M >= max * log2(e), P~ = 2^(s log2e - M)
                M = math.ceil(float(s.max()) * math.log2(math.e))
                p = torch.exp2(s * math.log2(math.e) - M)
                num = (p[is16].to(q.dtype).float()[:, None] * V[:n_vis][is16]).sum(0)
                for t0 in range(0, n_vis, p_tile):
                    t1 = min(n_vis, t0 + p_tile)
                    x = torch.where(is16[t0:t1], 0.0, p[t0:t1])
                    s1 = x.max() / (448.0 * 6.0)
                    if s1 > 0:
                        xq = f.fake_quantize(x / s1, dim=0) * s1
                        num += (xq[:, None] * Vd[t0:t1]).sum(0)
                out[b, i, h] = num / p.sum()
                lse[b, h, i] = M * math.log(2.0) + torch.log(p.sum())
    return out.to(q.dtype), lse


@pytest.mark.parametrize("fmt,p_tile,dtype,causal,Hq", [
    ("nvfp4", 64, torch.float16, True, 2),
    ("nvfp4", 32, torch.bfloat16, True, 1),
    ("nvfp4", 128, torch.float32, False, 2),  # tiles span an FP16 and an FP4 block: s1 over the FP4 keys only
    ("mxfp4", 64, torch.float16, True, 1),
])
def test_mixed_path_matches_brute_force(fmt, p_tile, dtype, causal, Hq, rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    B, S, Hkv, D = 1, 200, 1, 32
    q, k, v = _qkv(B, S, S, Hq, Hkv, D, dtype=dtype, gen=g)
    q = (q.float() * 2).to(dtype)  # a less flat softmax
    # Hand-made selection: block 0 and the diagonal block in FP16, the rest FP4; both kinds in rows of blocks 2, 3.
    sel = torch.full((B, Hq, 4, 2), -1, dtype=torch.int32)
    for i in range(4):
        sel[:, :, i, 0] = i
        sel[:, :, i, 1] = 0 if i else -1
    if not causal:
        sel[:, -1, :, 1] = 2  # last head: block 2 instead of block 0
    # the brute force quantizes unrotated Q/K: compare with qk_rotation="none" (tests/test_rotation.py covers the rotation)
    o, lse = thrift_attention_ref(q, k, v, causal=causal, fmt=fmt, p_tile=p_tile, selected=sel, return_lse=True,
                                  qk_rotation="none")
    ob, lseb = _brute(q, k, v, selection_mask(sel, 4), causal=causal, fmt=fmt, p_tile=p_tile)
    assert o.dtype == dtype
    # Same math in another order: only rare 16-bit rounding flips of P~ or O (measured ~1e-5 in fp16/bf16).
    tol = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 5e-4}[dtype]
    print(f"rel L2 vs brute force {rel_l2(o, ob):.2e}")
    assert rel_l2(o, ob) <= tol
    _lse_close(lse, lseb, 1e-5)
    # The merge is real: the result differs from both pure paths by far more than the tolerance.
    e = attention_exact(q, k, v, causal=causal)
    o0 = thrift_attention_ref(q, k, v, causal=causal, fmt=fmt, p_tile=p_tile, budget=0.0, qk_rotation="none")
    o1 = thrift_attention_ref(q, k, v, causal=causal, fmt=fmt, p_tile=p_tile, budget=1.0, qk_rotation="none")
    assert rel_l2(o, o0) > max(0.02, 3 * tol) and rel_l2(o, o1) > max(0.02, 3 * tol)
    assert rel_l2(o1, e) < rel_l2(o, e) < rel_l2(o0, e)


def test_selected_argument_and_methods_agree(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(1, 150, 150, 2, 1, 32, dtype=torch.float16, gen=g)
    for method in ("block_mean", "quest", "local", "random"):
        sel = select_blocks(q, k, budget=0.3, method=method)
        a = thrift_attention_ref(q, k, v, budget=0.3, selection=method)
        b = thrift_attention_ref(q, k, v, selected=sel)
        assert torch.equal(a, b)
    c = thrift_attention_ref(q, k, v, top_k=2)
    assert torch.equal(c, thrift_attention_ref(q, k, v, selected=select_blocks(q, k, top_k=2)))


def test_fp16_budget_one_close_to_exact(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        q, k, v = _qkv(1, 160, 160, 2, 1, 64, dtype=dtype, gen=g)
        o = thrift_attention_ref(q, k, v, budget=1.0)
        assert o.dtype == dtype
        assert rel_l2(o, attention_exact(q, k, v)) < tol


def test_bad_inputs():
    q, k, v = _qkv(1, 128, 128, 4, 2, 64)
    ref = thrift_attention_ref
    with pytest.raises(TypeError, match="q"):
        ref(q.to(torch.int32), k, v)
    with pytest.raises(TypeError, match="v"):
        ref(q, k, v.double())
    with pytest.raises(TypeError, match="q"):
        ref(q.numpy(), k, v)
    with pytest.raises(ValueError, match="device"):
        ref(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="rank-4"):
        ref(q[0], k, v)
    with pytest.raises(ValueError, match="batch"):
        ref(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="v must have k's shape"):
        ref(q, k, v[:, :100])
    with pytest.raises(ValueError, match="head_dim"):
        ref(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="head_dim"):
        ref(q[..., :40], k[..., :40], v[..., :40])
    with pytest.raises(ValueError, match="multiple"):
        ref(q[:, :, :3], k, v)
    for b in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            ref(q, k, v, budget=b)
    with pytest.raises(TypeError, match="budget"):
        ref(q, k, v, budget=None)
    with pytest.raises(ValueError, match="selection"):
        ref(q, k, v, selection="topk")
    with pytest.raises(ValueError, match="fmt"):
        ref(q, k, v, fmt="int4")
    with pytest.raises(ValueError, match="empty"):
        ref(q[:, :0], k, v)
    with pytest.raises(ValueError, match="empty"):
        ref(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="p_tile"):
        ref(q, k, v, p_tile=24)
    with pytest.raises(ValueError, match="softmax_scale"):
        ref(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="selected"):
        ref(q, k, v, selected=torch.zeros(1, 4, 3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="selected"):
        ref(q, k, v, selected=torch.full((1, 4, 2, 1), 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="causal"):
        ref(q, k, v, causal=1)
    with pytest.raises(TypeError, match="q"):
        attention_exact(q.to(torch.int64), k, v)
    with pytest.raises(ValueError, match="multiple"):
        attention_exact(q[:, :, :3], k, v)
