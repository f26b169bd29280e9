"""MXFP4 codec (OCP microscaling FP4; reference numerics, same API as quant.nvfp4).

Format: groups of 32 consecutive elements along `dim`, one UE8M0 (float8_e8m0fnu) power-of-two scale
per group, E2M1 values packed two per uint8 (element 2i in the low nibble).

  scale = 2^e,  e = ceil(log2(amax / 6)) in exact real arithmetic, clamped to [-127, 127]
  code  = E2M1_RNE(x / scale)   (exact: dividing by a power of two), saturating at +-6
  x'    = e2m1(code) * scale    (exact in fp32, including the fp32 subnormal range)

Why round the exponent UP: it guarantees |x/scale| <= 6, so nothing is clipped (the OCP spec's
floor(log2(amax)) - 2 rule can put amax/scale up to 8 and saturate the group's largest values, the
values that matter most in attention). The cost: when amax/6 is just above a power of two the scale is
up to 2x coarser than needed, so the E2M1 steps are up to 2x larger for that group (on Gaussian data
~0.115 relative L2 vs ~0.095 for NVFP4, whose E4M3 scales track amax/6 within 1/16 and whose groups
are 16 long).
The exponent is computed from the fp32 quotient amax/6 and then corrected with the exact comparison
amax <= 6 * 2^e, so it equals the real-arithmetic ceil even where amax/6 rounds onto a power of two.

* amax == 0 (and amax < 6*2^-127) -> e = -127, the smallest scale (code 0x00); a zero group has all
  codes 0. No group ever has a zero scale.
* Tails not a multiple of 32 are zero-padded (dequantize returns the padded length).
* Re-quantizing a dequantized tensor reproduces the VALUES exactly but not always the codes: amax in
  (3, 3.5)*2^e gives max code 3.0, so amax' = 3*2^e = 6*2^(e-1) and the second pass uses half the scale
  with doubled codes.
* Input fp16/bf16/fp32 (fp64 cast to fp32); arithmetic in fp32.

NaN/Inf policy: a group containing NaN or +-Inf gets the UE8M0 NaN scale (0xFF) and codes 0, so the
whole group dequantizes to NaN. (torch 2.13's float->float8_e8m0fnu conversion rounds to the nearest
power of two, maps 0 to 2^-127 and Inf to NaN; we do not use it: the scale bits are built directly.)

Global scale: same design as quant.nvfp4 ("auto" = amax/(448*6), returned as a third value). With
power-of-two block scales spanning 2^[-127,127] it is not needed for fp16/bf16/fp32 activations and can
hurt slightly (gs is not a power of two, so it moves values off the grid): measured relative L2 of
fake_quantize, 2^20 elements, none -> auto: Gaussian 0.1155 -> 0.1166, Gaussian*1e4 0.118 -> 0.116,
Student-t(df=1.5) 0.081 -> 0.127. Accepted for API symmetry only.
"""
from __future__ import annotations

import torch

from ._fp4common import (  # noqa: F401  (re-exported helpers)
    E2M1_MAX,
    QuantResult,
    QuantResultGS,
    dequantize_grouped,
    e2m1_decode,
    e2m1_encode,
    fake_quantize_grouped,
    pack_nibbles,
    quantize_grouped,
    unpack_nibbles,
)

NAME = "mxfp4"
GROUP = 32
SCALE_DTYPE = torch.float8_e8m0fnu
_E8M0_NAN_BITS = 0xFF
_EXP_MIN, _EXP_MAX, _EXP_BIAS = -127, 127, 127


def e8m0_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group UE8M0 scale 2^ceil(log2(amax/6)) (exact), clamped to [2^-127, 2^127]; NaN where amax is
    not finite. Returns (scales as float8_e8m0fnu, the same as fp32)."""
    amax = amax.float()
    finite = torch.isfinite(amax)
    a = torch.where(finite, amax, torch.zeros((), device=amax.device))
    r = a / E2M1_MAX
    mant, ex = torch.frexp(r)  # r = mant * 2^ex, mant in [0.5, 1) (0 for r == 0)
    e = torch.where(mant == 0.5, ex - 1, ex).to(torch.int32)  # ceil(log2 r); exact power of two: ex - 1
    e = torch.where(r == 0, _EXP_MIN, e)  # frexp(0) = (0, 0): a zero group takes the smallest scale
    e = torch.clamp(e, _EXP_MIN, _EXP_MAX)
    # fp32 rounding of amax/6 can land exactly on 2^(e) from above 6*2^e in principle; fix it exactly
    # (6 * 2^e is exact in fp32 for e >= -127 since 6*2^-127 = 1.5*2^-125 is normal).
    e = torch.where((a > torch.ldexp(torch.full_like(a, E2M1_MAX), e)) & (e < _EXP_MAX), e + 1, e)
    bits = (e + _EXP_BIAS).to(torch.uint8)
    bits = torch.where(finite, bits, torch.full((), _E8M0_NAN_BITS, dtype=torch.uint8, device=amax.device))
    s_f32 = torch.where(finite, torch.ldexp(torch.ones_like(a), e), torch.full((), float("nan"), device=amax.device))
    return bits.view(SCALE_DTYPE), s_f32


def quantize(x: torch.Tensor, dim: int = -1, *, global_scale=None):
    """MXFP4-quantize `x` in groups of 32 along `dim` (tail zero-padded).

    Returns QuantResult(packed uint8, scales float8_e8m0fnu) -- or QuantResultGS(packed, scales,
    global_scale) when `global_scale` is given. See the module docstring."""
    return quantize_grouped("mxfp4.quantize", x, dim, global_scale, group=GROUP, scale_dtype=SCALE_DTYPE,
                            scale_rule=e8m0_scale)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.float32, *,
               global_scale=None) -> torch.Tensor:
    """Inverse of quantize: `dtype` tensor with the padded length (ceil(n/32)*32) along `dim`."""
    return dequantize_grouped("mxfp4.dequantize", packed, scales, dim, dtype, global_scale, group=GROUP,
                              scale_dtype=SCALE_DTYPE)


def fake_quantize(x: torch.Tensor, dim: int = -1, *, global_scale=None) -> torch.Tensor:
    """dequantize(quantize(x)) in fp32, cut back to x's shape."""
    return fake_quantize_grouped(x, dim, global_scale, quantize, dequantize)
