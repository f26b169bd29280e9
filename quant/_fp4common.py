"""Shared machinery of the block-scaled FP4 codecs (NVFP4, MXFP4): E2M1 grid, nibble packing,
argument checks, the grouped quantize/dequantize drivers and the optional per-tensor global scale.

Pure torch, CPU or GPU, vectorized; work is chunked over rows so peak memory stays a small multiple
of the input (a [1, 32768, 32, 128] tensor does not materialize several fp32 copies at once).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# E2M1 magnitudes indexed by the 3-bit magnitude code (bit 3 is the sign):
# exponent 2 bits, mantissa 1 bit, code 0b001 is the subnormal 0.5.
E2M1_MAX = 6.0
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# RNE decision points between consecutive grid values. A tie goes to the even code (even mantissa bit):
# 0.25 -> 0 (code 0), 0.75 -> 1.0 (code 2), 1.25 -> 1.0 (code 2), 1.75 -> 2.0 (code 4),
# 2.5 -> 2.0 (code 4), 3.5 -> 4.0 (code 6), 5.0 -> 4.0 (code 6).
# (threshold, inclusive): magnitude code += 1 when m > threshold (or m >= threshold if inclusive).
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Rows of this many elements (at most) are processed at once.
_CHUNK_ELEMS = 1 << 22


class QuantResult(NamedTuple):
    """quantize() result without a global scale: unpacks as `packed, scales = ...`."""

    packed: torch.Tensor
    scales: torch.Tensor


class QuantResultGS(NamedTuple):
    """quantize(..., global_scale=...) result: `packed, scales, global_scale = ...` (0-dim fp32 tensor)."""

    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor


# --------------------------------------------------------------------------------------------- E2M1


def fdiv(a: torch.Tensor, c: float) -> torch.Tensor:
    """fp32 true division a / c by a constant, bit-identical on CPU and CUDA.

    PyTorch's CUDA kernel turns ``tensor / python_scalar`` into ``tensor * (1/scalar)`` (one extra rounding, so
    results can differ from the CPU by an ulp); a 0-dim tensor on the same device keeps the IEEE division."""
    return a / torch.tensor(c, dtype=a.dtype, device=a.device)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of `v` (already divided by its scale): round to nearest, ties to even,
    saturating at +-6 (so +-Inf -> +-6). Bit 3 is the sign and is kept for values rounding to zero
    (-0.1 -> 0x8, i.e. -0), like the hardware cvt. NaN encodes as +-6 (code 7 | sign); the codecs never
    pass NaN here, they mark the whole group through its scale instead. Computed in fp32."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"e2m1_encode: v must be a floating-point tensor, got {_describe(v)}")
    v = v.float()
    # magnitude code = number of decision points strictly below |v|; bucketize(right=False) counts exactly
    # that in one pass, and "m >= t" decision points are expressed as "m > prev_float(t)".
    code = torch.bucketize(v.abs().contiguous(), _e2m1_boundaries(v.device)).to(torch.uint8)
    code |= torch.signbit(v).to(torch.uint8) << 3
    return code


_BOUNDARIES: dict = {}


def _e2m1_boundaries(device) -> torch.Tensor:
    b = _BOUNDARIES.get(device)
    if b is None:
        t = torch.tensor([x for x, _ in _E2M1_STEPS], dtype=torch.float32)
        incl = torch.tensor([i for _, i in _E2M1_STEPS])
        t = torch.where(incl, torch.nextafter(t, torch.zeros(())), t)
        b = _BOUNDARIES[device] = t.to(device)
    return b


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (uint8, low 4 bits used; bit 3 = sign, 0x8 decodes to -0.0)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"e2m1_decode: codes must be a uint8 tensor, got {_describe(codes)}")
    table = _DECODE_TABLES.get(codes.device)
    if table is None:
        table = _DECODE_TABLES[codes.device] = torch.tensor(
            _E2M1_VALUES + tuple(-x for x in _E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).long()]


_DECODE_TABLES: dict = {}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes pairwise along the last dim: element 2i -> low nibble, 2i+1 -> high nibble."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles: codes must be a uint8 tensor, got {_describe(codes)}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: codes' last dim must be even, got shape {tuple(codes.shape)}")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: last dim doubles, low nibble first."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles: packed must be a uint8 tensor, got {_describe(packed)}")
    if packed.dim() == 0:
        raise ValueError("unpack_nibbles: packed must have at least one dim")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ------------------------------------------------------------------------------------------- checks


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def check_float_input(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{fn}: {name} must be float16/bfloat16/float32 (float64 is cast to float32), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{fn}: {name} must have at least one dim, got a 0-dim tensor")


def norm_dim(fn: str, dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: dim={dim} out of range for a {ndim}-dim tensor")
    return dim % ndim


def _resolve_global_scale(fn: str, x: torch.Tensor, global_scale) -> torch.Tensor | None:
    """None -> None; "auto" -> amax over the finite |x| / (448*6) (1.0 if that is 0 or there is none);
    a positive finite float / 1-element tensor -> that value as a 0-dim fp32 tensor."""
    if global_scale is None:
        return None
    if isinstance(global_scale, str):
        if global_scale != "auto":
            raise ValueError(f"{fn}: global_scale must be None, 'auto' or a positive float, got {global_scale!r}")
        a = x.detach().float().abs()
        a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))
        amax = a.amax() if a.numel() else torch.zeros((), device=x.device)
        gs = fdiv(amax, 448.0 * 6.0)
        return torch.where(gs > 0, gs, torch.ones((), device=gs.device))
    return _check_gs_value(fn, global_scale, x.device)


def _check_gs_value(fn: str, global_scale, device) -> torch.Tensor:
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1 or not global_scale.is_floating_point():
            raise ValueError(f"{fn}: global_scale tensor must be a 1-element float tensor, got {_describe(global_scale)}")
        gs = global_scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    elif isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        gs = torch.tensor(float(global_scale), dtype=torch.float32, device=device)
    else:
        raise TypeError(f"{fn}: global_scale must be None, 'auto', a float or a 1-element tensor, got {type(global_scale).__name__}")
    if not (bool(torch.isfinite(gs)) and float(gs) > 0):
        raise ValueError(f"{fn}: global_scale must be positive and finite, got {float(gs)}")
    return gs


# ------------------------------------------------------------------------------------------ drivers

# A scale rule maps the per-group amax (fp32, [r, ng]; NaN if the group holds a NaN, Inf if it holds an Inf)
# to (stored scales in the format's dtype, the same scales as fp32 for the division). Non-finite groups
# get the format's NaN scale; a zero fp32 scale means "all codes 0".
ScaleRule = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# A scale refiner (optional) revisits the rule's scales with the group values: (groups fp32 [r, ng, group],
# stored scales, fp32 scales, usable mask [r, ng]) -> (stored scales, fp32 scales). Used by NVFP4's "mse" rule.
ScaleRefiner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def quantize_grouped(fn: str, x, dim, global_scale, *, group: int, scale_dtype, scale_rule: ScaleRule,
                     refine: ScaleRefiner | None = None):
    check_float_input(fn, "x", x)
    d = norm_dim(fn, dim, x.dim())
    gs = _resolve_global_scale(fn, x, global_scale)
    xm = x.detach().movedim(d, -1)
    lead, n = tuple(xm.shape[:-1]), xm.shape[-1]
    ng = -(-n // group)
    npad = ng * group
    rows = 1
    for s_ in lead:
        rows *= s_
    xr = xm.reshape(rows, n)
    packed = torch.empty((rows, npad // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, ng), dtype=scale_dtype, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(npad, 1))
    for r0 in range(0, rows, step):
        xc = xr[r0:r0 + step].float()
        if gs is not None:
            xc = xc / gs
        if npad != n:  # zero-pad the tail group
            xc = torch.nn.functional.pad(xc, (0, npad - n))
        xg = xc.reshape(xc.shape[0], ng, group)
        amax = xg.abs().amax(dim=-1)  # NaN if the group has a NaN, Inf if it has an Inf
        s_store, s_f32 = scale_rule(amax)
        ok = torch.isfinite(amax) & (s_f32 > 0)
        if refine is not None:
            s_store, s_f32 = refine(xg, s_store, s_f32, ok)
        div = torch.where(ok, s_f32, torch.ones((), device=x.device))
        codes = e2m1_encode(xg / div.unsqueeze(-1))  # fp32 true division
        codes = torch.where(ok.unsqueeze(-1), codes, torch.zeros((), dtype=torch.uint8, device=x.device))
        packed[r0:r0 + step] = pack_nibbles(codes.reshape(xc.shape[0], npad))
        scales[r0:r0 + step] = s_store
    packed = packed.reshape(*lead, npad // 2).movedim(-1, d).contiguous()
    scales = scales.reshape(*lead, ng).movedim(-1, d).contiguous()
    if gs is None:
        return QuantResult(packed, scales)
    return QuantResultGS(packed, scales, gs)


def dequantize_grouped(fn: str, packed, scales, dim, dtype, global_scale, *, group: int, scale_dtype):
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be a uint8 tensor, got {_describe(packed)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != scale_dtype:
        raise TypeError(f"{fn}: scales must be a {scale_dtype} tensor, got {_describe(scales)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype, got {dtype!r}")
    if packed.dim() == 0:
        raise ValueError(f"{fn}: packed must have at least one dim")
    d = norm_dim(fn, dim, packed.dim())
    pm, sm = packed.movedim(d, -1), scales.movedim(d, -1) if scales.dim() == packed.dim() else None
    if sm is None or pm.shape[:-1] != sm.shape[:-1] or pm.shape[-1] * 2 != sm.shape[-1] * group:
        raise ValueError(
            f"{fn}: packed {tuple(packed.shape)} and scales {tuple(scales.shape)} do not match along dim={dim} "
            f"(expected packed.shape[dim]*2 == scales.shape[dim]*{group}, other dims equal)"
        )
    if isinstance(global_scale, str):
        raise ValueError(f"{fn}: global_scale must be the value quantize() returned, not {global_scale!r}")
    gs = None if global_scale is None else _check_gs_value(fn, global_scale, packed.device)
    lead, npk = tuple(pm.shape[:-1]), pm.shape[-1]
    ng = sm.shape[-1]
    rows = 1
    for s_ in lead:
        rows *= s_
    pr, sr = pm.reshape(rows, npk), sm.reshape(rows, ng)
    out = torch.empty((rows, npk * 2), dtype=dtype, device=packed.device)
    step = max(1, _CHUNK_ELEMS // max(npk * 2, 1))
    for r0 in range(0, rows, step):
        pc = pr[r0:r0 + step]
        vals = e2m1_decode(unpack_nibbles(pc)).reshape(pc.shape[0], ng, group)
        # e2m1 * e4m3 (or * 2^e) is exact in fp32: <= 7 significant bits, no underflow below 2^-149
        y = (vals * sr[r0:r0 + step].float().unsqueeze(-1)).reshape(pc.shape[0], npk * 2)
        if gs is not None:
            y = y * gs
        out[r0:r0 + step] = y
    return out.reshape(*lead, npk * 2).movedim(-1, d).contiguous()


def fake_quantize_grouped(x, dim, global_scale, quantize, dequantize, **qkw) -> torch.Tensor:
    res = quantize(x, dim, global_scale=global_scale, **qkw)
    d = dim % x.dim()
    y = dequantize(res.packed, res.scales, d, torch.float32, global_scale=res[2] if len(res) == 3 else None)
    return y.narrow(d, 0, x.shape[d]).contiguous()
