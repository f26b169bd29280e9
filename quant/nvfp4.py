"""NVFP4 codec (reference numerics; kernels match these bit for bit).

Format: groups of 16 consecutive elements along `dim`, one E4M3 (float8_e4m3fn) scale per group,
E2M1 values packed two per uint8 (element 2i in the low nibble, 2i+1 in the high nibble).

  scale = E4M3_RNE(min(amax / 6, 448))        amax = max |x| over the group, fp32 division
  code  = E2M1_RNE(x / float(scale))          fp32 true division, saturating at +-6
  x'    = e2m1(code) * float(scale)           exact in fp32

* A group whose scale rounds to 0 (amax/6 <= 2^-10, half the smallest E4M3 subnormal 2^-9) stores
  scale 0 and all codes 0: it dequantizes to zeros.
* amax/6 > 448 saturates the scale at 448; values above 6*448 then saturate at +-6 codes.
  E4M3 RNE of amax/6 can also round DOWN (e.g. amax/6 = 17 -> 16), so |x/scale| may exceed 6 by up
  to 1/16 (relative); those values saturate to +-6 (a small, bounded clipping error).
* Values that round to zero keep their sign (code 0x8 = -0), like the hardware cvt.rn.satfinite.e2m1x2.
* Lengths along `dim` that are not a multiple of 16 are zero-padded at the end: `packed.shape[dim] ==
  ceil(n/16)*8`, `scales.shape[dim] == ceil(n/16)`; dequantize returns the padded length
  (fake_quantize cuts it back).
* Input fp16/bf16/fp32 (fp64 is cast to fp32 first); all arithmetic in fp32.
* Re-quantizing a dequantized tensor reproduces codes and scales bit for bit for groups with normal
  E4M3 scales (>= 2^-6: the group max always lands on code 6, so amax' = 6*scale). Not for subnormal
  scales: e.g. amax = 3.3*2^-9 -> scale 2^-9, max -> code 3.0, then amax'/6 = 2^-10 ties to scale 0
  and the group flushes (tests/test_codecs.py pins both behaviours).
* Relative L2 of fake_quantize on Gaussian data: ~0.095.

Scale rule "mse" (`scale_rule="mse"`, an encoder choice: the format and the decoder are unchanged):
  the "amax" scale above is only the first candidate. Candidates, in this order: the amax scale's E4M3 code
  c, then c-1, c+1, c+2 (MSE_SCALE_STEPS; E4M3 codes step by one mantissa ulp; codes outside [1, 126] are
  skipped).
  For each, the group is encoded as above and its squared error err = sum_i (e2m1(code_i)*scale - x_i)^2
  is accumulated in fp32 in element order, one multiply then one add per element (no FMA), so every
  implementation (CPU, CUDA, the CuTe quant kernel) picks the same candidate; the smallest err wins, the
  earlier candidate on ties. Groups whose amax scale is 0 (flushed) or NaN are
  left as they are. Why: RNE(amax/6) puts the group max on the grid's top point but can leave
  the bulk of the group between coarse grid points; a slightly larger scale often fits the bulk better
  (and 1 ulp smaller trades a clipped max for finer steps). Gaussian data: relative L2 0.095 -> 0.086.
  Candidate sets compared on SmolLM2 (2k, 3 windows, thrift 5% + Hadamard, NLL recovery of the FP4 gap;
  profiling/RESULTS.md, levers): amax only 78.3%; {+1, +2} 81.4%; {-1, +1, +2} 88.6% (the default: the
  1-ulp-smaller scale matters most); {+1..+4, -1} 87.0%; {+1..+6, -1} 87.8%; "4/6" (amax/6 or amax/4) 88.2%.

NaN/Inf policy: a group containing a NaN or +-Inf gets the E4M3 NaN scale (0x7F) and codes 0, so the
whole group dequantizes to NaN -- never silently finite, and never polluting other groups.
(Note: torch 2.13's float->float8_e4m3fn conversion itself maps Inf and anything above 448 to 448 and
NaN to NaN; we never rely on that: the scale is clamped to 448 before conversion and non-finite groups
are handled explicitly.)

Global scale (standard NVFP4 second level, off by default):
  quantize(x, global_scale="auto") -> (packed, scales, gs) where gs = amax(finite |x|)/(448*6) as a 0-dim
  fp32 tensor (1.0 if x is all zero/non-finite); x/gs (fp32) is block-quantized. A positive float or
  1-element tensor can be given instead of "auto" and is returned the same way. Pass it back:
  dequantize(packed, scales, global_scale=gs) multiplies by gs in fp32 (not exact, one rounding).
  Measured relative L2 of fake_quantize, without -> with global_scale="auto":
    Gaussian x*s, 2^20 elements:  s=1: 0.0952 -> 0.0952 (no change);  s=1e4 (amax/6 > 448, scales
    saturate): 0.799 -> 0.0952;  s=1e-4 (scales underflow, groups flush to 0): 1.000 -> 0.0952.
    Student-t(df=1.5) (heavy tail, amax ~1e4): 0.33 -> 0.036 (seed 0; varies with the tail).
    No-gs error vs Gaussian std s: 0.126 at s=1e-2, ~0.095 for s in [3e-2, 3e2], 0.10 at 1e3, 0.44 at
    3e3: the global scale matters only outside roughly [0.03, 1000] (std). Commands (from the repo root):
    PYTHONPATH=. python -c "import torch;from quant import nvfp4 as q;torch.manual_seed(0);x=torch.randn(1<<20);r=lambda y:((y-x).norm()/x.norm()).item();print([(s,round(r(q.fake_quantize(x*s)/s),4),round(r(q.fake_quantize(x*s,global_scale='auto')/s),4)) for s in (1e-4,1,1e4)])"
    PYTHONPATH=. python -c "import torch;from quant import nvfp4 as q;torch.manual_seed(0);x=torch.distributions.StudentT(1.5).sample((1<<20,));r=lambda y:((y-x).norm()/x.norm()).item();print(r(q.fake_quantize(x)),r(q.fake_quantize(x,global_scale='auto')))"
  On the demo workload (harness.workload.make_workload(2048, seed=0): 8 q / 2 kv heads, D=128, fp16; CPU,
  2026-11-22): codec relative L2 without -> with "auto": Q 0.0949 -> 0.0947, K 0.0859 -> 0.0863, V 0.0935 -> 0.0933;
  FP4 attention (budget 0, harness.hf_backend.emulated_attention with ThriftConfig(global_scale=...)) vs exact:
  0.1361 -> 0.1385. No gain: the workload's values already sit inside E4M3's range, so it stays off by default.
"""
from __future__ import annotations

import torch

from ._fp4common import (  # noqa: F401  (re-exported helpers)
    fdiv,
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

NAME = "nvfp4"
GROUP = 16
SCALE_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
_E4M3_NAN_BITS = 0x7F


def e4m3_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group E4M3 scale from the group amax (fp32): RNE(min(amax/6, 448)); NaN where amax is not finite.
    Returns (scales as float8_e4m3fn, the same as fp32)."""
    r = torch.clamp(fdiv(amax.float(), E2M1_MAX), max=E4M3_MAX)  # fp32 division; clamp so torch never sees > 448
    s8 = r.to(SCALE_DTYPE)  # torch's fp32 -> e4m3fn conversion is RNE incl. subnormals (tested vs a grid)
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        bits = s8.view(torch.uint8).clone()
        bits[bad] = _E4M3_NAN_BITS
        s8 = bits.view(SCALE_DTYPE)
    return s8, s8.float()


# Candidate E4M3 code offsets of the "mse" scale rule after the amax scale itself, in tie-break order.
MSE_SCALE_STEPS = (-1, 1, 2)
SCALE_RULES = ("amax", "mse")


def group_sse(xg: torch.Tensor, s_f32: torch.Tensor) -> torch.Tensor:
    """Squared NVFP4 encoding error of each group [..., 16] at scale s_f32 [...] (> 0): sum over the group, in
    element order, of (e2m1(RNE(x/s)) * s - x)^2 with one fp32 multiply and one add per element (the order the
    kernels use, so all implementations agree bit for bit)."""
    q = e2m1_decode(e2m1_encode(xg / s_f32.unsqueeze(-1))) * s_f32.unsqueeze(-1)  # exact products
    e = q - xg
    err = torch.zeros_like(s_f32)
    for i in range(xg.shape[-1]):
        ei = e[..., i]
        err = err + ei * ei
    return err


def mse_refine(xg, s8, sf, ok):
    """The "mse" scale rule (module docstring): best of the amax scale and its E4M3 neighbours per group."""
    base = s8.view(torch.uint8).to(torch.int32)
    one = torch.ones((), device=xg.device)
    best_err = group_sse(xg, torch.where(ok, sf, one))
    best8, bestf = s8, sf
    for d in MSE_SCALE_STEPS:
        c = base + d
        valid = ok & (c >= 1) & (c <= 126)
        c8 = c.clamp(1, 126).to(torch.uint8).view(SCALE_DTYPE)
        cf = c8.float()
        err = group_sse(xg, torch.where(valid, cf, one))
        take = valid & (err < best_err)
        best_err = torch.where(take, err, best_err)
        best8 = torch.where(take, c8.view(torch.uint8), best8.view(torch.uint8)).view(SCALE_DTYPE)
        bestf = torch.where(take, cf, bestf)
    return best8, bestf


def _check_rule(fn: str, scale_rule) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"{fn}: scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")


def quantize(x: torch.Tensor, dim: int = -1, *, global_scale=None, scale_rule: str = "amax"):
    """NVFP4-quantize `x` in groups of 16 along `dim` (tail zero-padded).

    scale_rule: "amax" (E4M3_RNE(amax/6), the standard encoder) or "mse" (the best of that scale and its E4M3
    neighbours MSE_SCALE_STEPS per group; module docstring). Returns QuantResult(packed uint8, scales float8_e4m3fn) -- or
    QuantResultGS(packed, scales, global_scale) when `global_scale` is given ("auto" or a positive float)."""
    _check_rule("nvfp4.quantize", scale_rule)
    return quantize_grouped("nvfp4.quantize", x, dim, global_scale, group=GROUP, scale_dtype=SCALE_DTYPE,
                            scale_rule=e4m3_scale, refine=mse_refine if scale_rule == "mse" else None)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.float32, *,
               global_scale=None) -> torch.Tensor:
    """Inverse of quantize: `dtype` tensor with the padded length (ceil(n/16)*16) along `dim`."""
    return dequantize_grouped("nvfp4.dequantize", packed, scales, dim, dtype, global_scale, group=GROUP,
                              scale_dtype=SCALE_DTYPE)


def fake_quantize(x: torch.Tensor, dim: int = -1, *, global_scale=None, scale_rule: str = "amax") -> torch.Tensor:
    """dequantize(quantize(x)) in fp32, cut back to x's shape."""
    return fake_quantize_grouped(x, dim, global_scale, quantize, dequantize, scale_rule=scale_rule)
