"""Bit-faithful PyTorch reference of ThriftAttention, and exact (fp64) attention.

`thrift_attention_ref` computes, with every rounding step of the fused kernels, for each (batch, query head):

    S16 = (q . k^T) * scale                     fp32 math on the input-dtype values
    S4  = (dq(Q) . dq(K)^T) * scale             Q, K fake-quantized along head_dim (FP4 groups of 16 / 32); with
                                                qk_rotation="hadamard" (the default) Q and K are first rotated by
                                                quant.rotation.hadamard_rotate (x H_D / sqrt(D), fixed fp32
                                                butterfly order, rounded to the input dtype): dq(rot(Q)).dq(rot(K))^T
                                                approximates q.k^T since H is orthogonal; scale_rule="mse" (the
                                                default) picks each NVFP4 group scale of Q, K (and V below) by
                                                quant.nvfp4's "mse" encoder rule, "amax" is E4M3_RNE(amax/6)
    S   = S16 on selected (query block, key block) pairs, S4 elsewhere; -inf where causally masked
    m   = max_j S (over all visible keys)       one softmax per row, shared by both paths
    M   = ceil(m * log2(e))                     the softmax offset: an integer in log2 units
    P~  = 2^(S * log2(e) - M)                   fp32, in (0, 1] (the max key's is in (1/2, 1])
    l   = sum_j P~                              fp32, unquantized, over all visible keys
    num = P~[sel].to(input dtype) . v           FP16 path: the MMA multiplies 16-bit P~ by 16-bit V, fp32 accumulate
        + quantize_p(P~[~sel]) . dq(V)          FP4 path: SageAttention3 two-level P (per-row, per-p_tile-key-tile
                                                scale; always the amax rule), V fake-quantized along the sequence in
                                                groups starting at key 0 (with scale_rule)
    O   = (num / l).to(input dtype);  LSE = M * ln(2) + log(l)  (fp32, [B, Hq, Sq])

Why an integer offset M rather than m itself: O = num / l does not depend on the offset, except through the 16-bit
rounding of P~ on the FP16 path, and a power-of-two factor commutes with that rounding (no overflow; bf16 has no
subnormals to lose, fp16's lie below 2^-14 of the max). So a kernel that keeps a running max, and with it a running
integer M' <= M, rounds 2^(S log2e - M') to exactly the bits of 2^(S log2e - M) times 2^(M - M'): one pass over the
FP16 keys in any order (and any split of the keys) reproduces the final-max rounding, where with m as the offset a
running max differs by ~1e-3 relative in bf16. The FP4 path is offset-invariant anyway (P's scale is relative).

Fully masked rows (causal with Sq > Skv) give O = 0 and LSE = -inf. budget = 0 is pure FP4 (SageAttention3
numerics, no smoothing; plus the Hadamard rotation by default), budget = 1 is plain attention (up to the 16-bit rounding of P~ that FP16 MMA does).

P tiles when p_tile != block_size: the P~ handed to quantize_p is zero on selected (FP16) keys and on masked keys,
so a tile's row scale s1 is the max over that tile's FP4 keys only (what a kernel that quantizes only its FP4
keys computes). With p_tile == block_size (the default, 64) a tile is wholly FP4 or wholly FP16 for a query block,
so this is the only possible definition.

Memory: work is per (batch, KV head, query head) and per query block: one [block_size, keys] fp32 score tile at a
time (64 queries x 128k keys = 32 MB), and causal blocks stop at their last visible key (rounded up to a whole P
tile), so 32k-128k sequences run on a CPU. Only the fp32 copies of one KV head's K, V, dq(K), dq(V) and one query
head's q, dq(q) are held at once.
"""
from __future__ import annotations

import math

import torch

from ._validate import (
    SELECTION_METHODS,
    check_bool,
    check_budget,
    check_scale_rule,
    check_choice,
    check_fmt,
    check_int,
    check_qkv,
    softmax_scale_or_default,
)
from .selection import select_blocks, selection_mask


def check_rotation_for(qk_rotation, D: int, where: str) -> str:
    """Validate qk_rotation ("hadamard" | "none") and, for "hadamard", that head_dim is a power of two in [16, 256]."""
    from quant.rotation import check_qk_rotation

    check_qk_rotation(qk_rotation, where)
    if qk_rotation == "hadamard" and not (16 <= D <= 256 and D & (D - 1) == 0):
        raise ValueError(f"{where}: qk_rotation='hadamard' needs head_dim a power of two in [16, 256], got {D} "
                         f"(pass qk_rotation='none')")
    return qk_rotation


def _block_chunks(Sq: int, Skv: int, block_size: int, causal: bool, p_tile: int):
    """Yields (i, r0, r1, kend) per query block i: rows [r0, r1) and the keys [0, kend) that can be visible
    (causal: up to the block's last visible key, rounded up to a whole P tile; 0 if the block sees nothing)."""
    for i in range(-(-Sq // block_size)):
        r0, r1 = i * block_size, min(Sq, (i + 1) * block_size)
        if causal:
            last = r1 - 1 + (Skv - Sq)  # last key visible to the block's last row (bottom-right alignment)
            kend = min(Skv, -(-(last + 1) // p_tile) * p_tile) if last >= 0 else 0
        else:
            kend = Skv
        yield i, r0, r1, kend


LN2 = math.log(2.0)
LOG2E = math.log2(math.e)


def softmax_numerator_(s: torch.Tensor):
    """In place on fp32 scores s [..., keys]: P~ = 2^(s log2e - M) with M = ceil(max_j s * log2e) per row (the
    module docstring: an integer offset, so 16-bit rounding of P~ does not depend on where a kernel's running max
    stood). Returns (P~, M * ln 2): the offset in natural-log units, for LSE = offset + log(sum P~). A fully
    masked row (max = -inf) uses M = 0 (P~ = 0, LSE = -inf)."""
    m = s.amax(dim=-1)
    M = torch.where(torch.isfinite(m), torch.ceil(m * LOG2E), torch.zeros_like(m))
    p = s.mul_(LOG2E).sub_(M[..., None]).exp2_()
    return p, M * LN2


def _mask_causal_(s: torch.Tensor, r0: int, r1: int, Sq: int, Skv: int) -> None:
    """In place: s[rows r0..r1, keys 0..kend] = -inf where key j > row i + Skv - Sq (only the block's diagonal
    band can be partially masked; keys before r0 + Skv - Sq are visible to every row)."""
    kend = s.shape[1]
    lo = max(0, r0 + (Skv - Sq) + 1)  # first key invisible to the block's first row
    if lo >= kend:
        return
    rows = torch.arange(r0, r1, device=s.device)
    keys = torch.arange(lo, kend, device=s.device)
    s[:, lo:].masked_fill_(keys[None, :] > (rows + (Skv - Sq))[:, None], float("-inf"))


def _check_selected(selected, B: int, Hq: int, nqb: int, nkb: int, device) -> torch.Tensor:
    where = "thrift_attention_ref"
    if not isinstance(selected, torch.Tensor):
        raise TypeError(f"{where}: selected must be a torch.Tensor (a select_blocks result), got "
                        f"{type(selected).__name__}")
    if selected.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: selected must be int32 (a select_blocks result), got {selected.dtype}")
    if selected.dim() != 4 or tuple(selected.shape[:3]) != (B, Hq, nqb):
        raise ValueError(f"{where}: selected must have shape [B, Hq, n_q_blocks, k] = [{B}, {Hq}, {nqb}, k], got "
                         f"{tuple(selected.shape)}")
    if selected.numel() and (int(selected.min()) < -1 or int(selected.max()) >= nkb):
        raise ValueError(f"{where}: selected entries must be -1 or a key block in [0, {nkb})")
    return selected.to(device)


def thrift_attention_ref(q, k, v, *, budget=0.05, causal=True, selection="block_mean", fmt="nvfp4",
                         block_size=64, softmax_scale=None, return_lse=False, p_tile=64, selected=None,
                         top_k=None, qk_rotation="hadamard", scale_rule="mse"):
    """ThriftAttention reference (see the module docstring for the exact numerics).

    q: [B, Sq, Hq, D]; k, v: [B, Skv, Hkv, D]; fp16/bf16/fp32, D a multiple of 16, Hq % Hkv == 0.
    budget/selection/block_size/top_k choose the FP16 blocks via select_blocks, unless `selected` (a precomputed
    select_blocks result, so kernels and reference share one selection) is given. fmt: "nvfp4" | "mxfp4".
    p_tile: key-tile width of P's per-row scale (a multiple of the format's group).
    qk_rotation: "hadamard" (default) rotates Q and K along head_dim before FP4 quantization (FP4 path only; the
    FP16 path and the selection use the unrotated values); "none" quantizes them as they are.
    scale_rule: "mse" (default) or "amax", the NVFP4 encoder rule of Q, K and V (quant.nvfp4 module docstring; the
    kernels use the same rule bit for bit). P keeps the amax rule (the kernels quantize it per tile in registers).
    With fmt="mxfp4" the rule does not apply (MXFP4 has one scale rule, UE8M0 rounded up): "mse" falls back to it.
    Returns O [B, Sq, Hq, D] in q's dtype, and with return_lse=True also LSE fp32 [B, Hq, Sq].
    """
    where = "thrift_attention_ref"
    B, Sq, Hq, D, Skv, Hkv = check_qkv(q, k, v, where=where)
    f = check_budget(budget, where=where)
    check_bool("causal", causal, where=where)
    check_bool("return_lse", return_lse, where=where)
    check_choice("selection", selection, SELECTION_METHODS, where=where)
    fq = check_fmt(fmt, where=where)
    check_int("block_size", block_size, minimum=1, where=where)
    check_int("p_tile", p_tile, minimum=1, where=where)
    if p_tile % fq.group:
        raise ValueError(f"{where}: p_tile must be a multiple of {fmt}'s group size {fq.group}, got {p_tile}")
    scale = softmax_scale_or_default(softmax_scale, D, where=where)
    check_rotation_for(qk_rotation, D, where)
    check_scale_rule(scale_rule, where)
    # the "mse" rule is an NVFP4 encoder option; MXFP4's codec has no scale_rule argument (documented fallback)
    qkw = {"scale_rule": scale_rule} if fq.name == "nvfp4" else {}
    nqb, nkb = -(-Sq // block_size), -(-Skv // block_size)
    if selected is None:
        selected = select_blocks(q, k, budget=f, causal=causal, method=selection, block_size=block_size,
                                 top_k=top_k)
    else:
        selected = _check_selected(selected, B, Hq, nqb, nkb, q.device)
    blk = selection_mask(selected, nkb)  # [B, Hq, nqb, nkb]

    from quant.rotation import maybe_rotate
    from quant.softmax_p import quantize_p  # lazy: the codecs live in their own package

    dev, dt = q.device, q.dtype
    out = torch.empty((B, Sq, Hq, D), dtype=dt, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    group = Hq // Hkv
    chunks = list(_block_chunks(Sq, Skv, block_size, causal, p_tile))
    key_blk = torch.arange(Skv, device=dev) // block_size
    neg_inf = float("-inf")
    for b in range(B):
        for hk in range(Hkv):
            kf, vf = k[b, :, hk].float(), v[b, :, hk].float()  # exact copies of the input-dtype values
            # [Skv, D], FP4 groups along head_dim (of the rotated K with qk_rotation="hadamard")
            kq = fq.fake_quantize(maybe_rotate(k[b, :, hk], qk_rotation), dim=-1, **qkw)
            vq = fq.fake_quantize(v[b, :, hk], dim=0, **qkw)  # [Skv, D], FP4 groups along the sequence from key 0
            for h in range(hk * group, (hk + 1) * group):
                qf = q[b, :, h].float()
                qq = fq.fake_quantize(maybe_rotate(q[b, :, h], qk_rotation), dim=-1, **qkw)
                for i, r0, r1, kend in chunks:
                    if kend == 0:  # every row of the block is fully masked
                        out[b, r0:r1, h] = 0
                        lse[b, h, r0:r1] = neg_inf
                        continue
                    # FP16 (selected) key columns of this query block; the rest of [0, kend) is FP4.
                    cols = torch.nonzero(blk[b, h, i][key_blk[:kend]]).flatten()
                    n16 = cols.numel()
                    if n16 < kend:
                        s = torch.matmul(qq[r0:r1], kq[:kend].T).mul_(scale)  # S4
                        if n16:
                            s[:, cols] = torch.matmul(qf[r0:r1], kf[cols].T).mul_(scale)  # S16
                    else:
                        s = torch.matmul(qf[r0:r1], kf[:kend].T).mul_(scale)
                    if causal:
                        _mask_causal_(s, r0, r1, Sq, Skv)
                    p, off = softmax_numerator_(s)  # P~ (fp32) in place; masked keys: 0
                    l = p.sum(dim=-1)  # denominator: unquantized P~ over all visible keys
                    num = torch.zeros((r1 - r0, D), dtype=torch.float32, device=dev)
                    if n16:
                        # FP16 path: the MMA multiplies P~ rounded to 16 bits by V, accumulating in fp32.
                        num += torch.matmul(p[:, cols].to(dt).float(), vf[cols])
                    if n16 < kend:
                        # FP4 path: selected (and masked) keys are zero in the P~ given to quantize_p, so each
                        # p_tile's row scale covers the tile's FP4 keys only.
                        if n16:
                            p[:, cols] = 0.0
                        num += torch.matmul(quantize_p(p, fmt=fmt, p_tile=p_tile), vq[:kend])
                    pos = l > 0
                    o = torch.where(pos[:, None], num / torch.where(pos, l, 1.0)[:, None], 0.0)
                    out[b, r0:r1, h] = o.to(dt)
                    lse[b, h, r0:r1] = off + torch.log(l)  # l == 0 -> -inf
    return (out, lse) if return_lse else out


def attention_exact(q, k, v, *, causal=True, softmax_scale=None, return_lse=False):
    """Exact softmax attention in fp64 math (the accuracy yardstick): O float64 [B, Sq, Hq, D] and, with
    return_lse=True, LSE float64 [B, Hq, Sq]. Same layout, GQA, bottom-right causal mask and fully masked row
    convention (O = 0, LSE = -inf) as thrift_attention_ref; chunked over query blocks like it."""
    where = "attention_exact"
    B, Sq, Hq, D, Skv, Hkv = check_qkv(q, k, v, where=where)
    check_bool("causal", causal, where=where)
    check_bool("return_lse", return_lse, where=where)
    scale = softmax_scale_or_default(softmax_scale, D, where=where)
    dev = q.device
    out = torch.empty((B, Sq, Hq, D), dtype=torch.float64, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float64, device=dev)
    group = Hq // Hkv
    chunks = list(_block_chunks(Sq, Skv, 64, causal, 64))
    for b in range(B):
        for hk in range(Hkv):
            kd, vd = k[b, :, hk].double(), v[b, :, hk].double()
            for h in range(hk * group, (hk + 1) * group):
                qd = q[b, :, h].double()
                for _, r0, r1, kend in chunks:
                    if kend == 0:
                        out[b, r0:r1, h] = 0
                        lse[b, h, r0:r1] = float("-inf")
                        continue
                    s = torch.matmul(qd[r0:r1], kd[:kend].T).mul_(scale)
                    if causal:
                        _mask_causal_(s, r0, r1, Sq, Skv)
                    m = s.amax(dim=-1)
                    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                    p = s.sub_(m_safe[:, None]).exp_()
                    l = p.sum(dim=-1)
                    num = torch.matmul(p, vd[:kend])
                    pos = l > 0
                    out[b, r0:r1, h] = torch.where(pos[:, None], num / torch.where(pos, l, 1.0)[:, None], 0.0)
                    lse[b, h, r0:r1] = m_safe + torch.log(l)
    return (out, lse) if return_lse else out
