"""SageAttention3-style two-level FP4 quantization of unnormalized softmax probabilities P~ = exp(S - m).

Along the last dim (keys), per row and per key tile of width `p_tile` (tiles aligned at key 0; the last
tile may be partial and is zero-padded):

  s1 = rowmax(P~ over the tile) / (448 * 6)     fp32 (rowmax taken of |P~|; P~ >= 0 so it is the max)
  x  = P~ / s1                                   fp32 true division; the tile max maps to ~2688 = 6*448
  P_deq = s1 * dequant(FP4(x))                   FP4 = NVFP4 (groups of 16 keys) or MXFP4 (groups of 32)

Why: after dividing by s1 the whole E4M3 scale range is used (the tile max gets scale 448 and code 6), so
tiny probabilities are not flushed by the scale underflowing, and the quantized values do not depend on
the running row max m (an online-softmax kernel reproduces them tile by tile).
What is exact (NVFP4): the tile max always gets E4M3 scale 448 and E2M1 code 6 (|x_max/448 - 6| is at most
a few ulps and rounds or saturates to 6), so it dequantizes to fl(s1 * 2688), within 1 ulp of rowmax
(not always equal: fl(fl(r/2688)*2688) != r for some r).
rowmax == 0 (or so small that s1 underflows to 0 in fp32, rowmax < ~2^-138) -> the tile is all zeros.
NaN/Inf follow the codec policy: a NaN or Inf anywhere in a tile makes that whole tile NaN
(s1 becomes NaN/Inf), never silently finite.

Measured (scores ~ N(0, sd^2), P~ = exp(S - rowmax), 64x1024): relative L2 0.092 / 0.057 / 0.033 for
sd = 1 / 2 / 3 with NVFP4 (0.154 with MXFP4 at sd = 1). Row sums of the result are biased LOW by 0.9% /
4.2% / 2.4%: many small probabilities fall below 0.25*scale of their group and round to 0. With l summed
from the unquantized P~ (the contract), the FP4 part of O is scaled down by about that much.

Groups never straddle tiles because p_tile must be a multiple of the format's group size.
Work is chunked over rows, so [B, H, 64, 32768] inputs stay within a few hundred MB of temporaries.
"""
from __future__ import annotations

import math

import torch

from ._fp4common import _CHUNK_ELEMS, check_float_input, fdiv
from .formats import get_format

P_SCALE_DEN = 448.0 * 6.0  # E4M3 max * E2M1 max


def _check(fn: str, p_tilde, fmt, p_tile):
    check_float_input(fn, "p_tilde", p_tilde)
    f = get_format(fmt)
    if isinstance(p_tile, bool) or not isinstance(p_tile, int):
        raise TypeError(f"{fn}: p_tile must be an int, got {type(p_tile).__name__}")
    if p_tile <= 0 or p_tile % f.group:
        raise ValueError(f"{fn}: p_tile must be a positive multiple of {f.name}'s group size {f.group}, got {p_tile}")
    return f


def _tiles(pc: torch.Tensor, p_tile: int):
    """fp32 [r, N] chunk -> (x [r, T*p_tile] divided by s1, s1 [r, T])."""
    r, n = pc.shape
    t = -(-n // p_tile)
    if t * p_tile != n:
        pc = torch.nn.functional.pad(pc, (0, t * p_tile - n))
    pt = pc.reshape(r, t, p_tile)
    s1 = fdiv(pt.abs().amax(dim=-1), P_SCALE_DEN)  # NaN/Inf propagate into s1 (see module docstring)
    div = torch.where(s1 == 0, torch.ones((), device=pc.device), s1)  # rowmax 0: x = P~ = 0 anyway
    x = (pt / div.unsqueeze(-1)).reshape(r, t * p_tile)
    return x, s1


def quantize_p(p_tilde: torch.Tensor, *, fmt="nvfp4", p_tile: int = 64) -> torch.Tensor:
    """Fake-quantized P~ (fp32, same shape) with per-(row, key tile) scale s1 and FP4 `fmt` along keys."""
    f = _check("quantize_p", p_tilde, fmt, p_tile)
    n = p_tilde.shape[-1]
    pr = p_tilde.detach().reshape(math.prod(p_tilde.shape[:-1]), n)
    out = torch.empty(pr.shape, dtype=torch.float32, device=p_tilde.device)
    if n == 0 or pr.shape[0] == 0:
        return out.reshape(p_tilde.shape)
    step = max(1, _CHUNK_ELEMS // (-(-n // p_tile) * p_tile))
    for r0 in range(0, pr.shape[0], step):
        x, s1 = _tiles(pr[r0:r0 + step].float(), p_tile)
        packed, scales = f.quantize(x, -1)
        deq = f.dequantize(packed, scales, -1).reshape(s1.shape[0], s1.shape[1], p_tile)
        y = torch.where(s1.unsqueeze(-1) == 0, torch.zeros((), device=deq.device), deq * s1.unsqueeze(-1))
        out[r0:r0 + step] = y.reshape(s1.shape[0], -1)[:, :n]
    return out.reshape(p_tilde.shape)


def quantize_p_parts(p_tilde: torch.Tensor, *, fmt="nvfp4", p_tile: int = 64):
    """The pieces behind quantize_p, for kernels' bit-level tests:
    (packed codes uint8 [..., ceil(N/g)*g/2], scales [..., ceil(N/g)] in the format's scale dtype,
    s1 fp32 [..., ceil(N/p_tile)]), g = the format's group. Keys past N are zero-padded (code 0).
    quantize_p == s1 (repeated over each tile's keys) * dequantize(packed, scales), with 0 where s1 == 0."""
    f = _check("quantize_p_parts", p_tilde, fmt, p_tile)
    lead, n = tuple(p_tilde.shape[:-1]), p_tilde.shape[-1]
    t = -(-n // p_tile)
    ng = -(-n // f.group)
    pr = p_tilde.detach().reshape(math.prod(lead), n)
    rows = pr.shape[0]
    packed = torch.zeros((rows, ng * f.group // 2), dtype=torch.uint8, device=p_tilde.device)
    scales = torch.empty((rows, ng), dtype=f.scale_dtype, device=p_tilde.device)
    s1_all = torch.empty((rows, t), dtype=torch.float32, device=p_tilde.device)
    step = max(1, _CHUNK_ELEMS // max(t * p_tile, 1))
    for r0 in range(0, rows if n else 0, step):
        x, s1 = _tiles(pr[r0:r0 + step].float(), p_tile)
        pk, sc = f.quantize(x, -1)
        packed[r0:r0 + step] = pk[:, : ng * f.group // 2]
        scales[r0:r0 + step] = sc[:, :ng]
        s1_all[r0:r0 + step] = s1
    return (packed.reshape(*lead, -1), scales.reshape(*lead, ng), s1_all.reshape(*lead, t))
