"""The one place where the prefill kernel's FP4 math depends on the GPU architecture.

The kernel body (kernels/prefill.py) is identical for every arch; it asks an *arch path* for:
  * ``needs_decode``      -- whether FP4 K/V stages must be decoded into 16-bit smem tiles first;
  * ``decode_q/k/v``      -- SM90 path: E2M1 codes x E4M3 scale -> fp16/bf16 (exact) into smem;
  * ``qk_fp4`` / ``pv_fp4`` -- S = Q K^T and O += P' V' in FP4 numerics.

Paths:
  * ``Sm90DecodePath`` (sm_80..sm_90a, and anything without an FP4 MMA): every FP4 tile is decoded
    to fp16/bf16 **in shared memory** (first step; the register-decode variant is future work), with
    the E4M3 scale folded in -- exact, since every E2M1*E4M3 product has <= 5 significant bits and lies
    in [2^-10, 2688] -- then ``MmaF16BF16Op`` 16x8x16 with fp32 accumulation reproduces
    dq(Q) dq(K)^T and P' dq(V) up to fp32 summation order.
  * ``Sm120BlockScaledPath`` (sm_120a/121a): ``MmaMXF4NVF4Op`` 16x8x64 straight from the packed FP4
    stages (helper module kernels/fp4_mma_sm120.py).  See its docstring for status.

Also here: the small PTX helpers (ex2, E4M3/E2M1 round-to-nearest-even, FP4x8 -> half2x4 decode)
that both paths share, and ``nvfp4_mse_scale``: the one device implementation of quant.nvfp4's "mse" scale rule
(used by the prefill quantizer, quant/quant_kernel.py, and the decode kernel's query quantization; P keeps the
amax rule everywhere).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


def _asm(ret, args, text, cons):
    return llvm.inline_asm(ret, args, text, cons, has_side_effects=False, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def ex2(x, *, loc=None, ip=None) -> Float32:
    """2^x (ex2.approx.ftz, ~2 ulp); -inf -> 0."""
    return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "ex2.approx.ftz.f32 $0, $1;", "=f,f"))


@dsl_user_op
def ceil_f32(x, *, loc=None, ip=None) -> Float32:
    """ceil(x) (cvt.rpi.f32.f32); +-inf stay +-inf. The softmax offset: the kernels take P~ = 2^(S*log2e - M) with M
    = ceil(running max * log2e) an integer, so a running max rounds P~ to 16 bit exactly as the final max does
    (kernels/reference.py: power-of-two factors commute with the rounding)."""
    return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "cvt.rpi.f32.f32 $0, $1;", "=f,f"))


@dsl_user_op
def lg2(x, *, loc=None, ip=None) -> Float32:
    return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "lg2.approx.ftz.f32 $0, $1;", "=f,f"))


@dsl_user_op
def e4m3_rne(x, *, loc=None, ip=None) -> Float32:
    """fp32 -> E4M3 (round to nearest even, saturating at 448) -> fp32.  cvt.e4m3x2 needs sm_89+."""
    return Float32(_asm(
        T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b16 e;\n\t.reg .b32 h2;\n\t.reg .f16 h;\n\t"
        "cvt.rn.satfinite.e4m3x2.f32 e, $1, $1;\n\t"
        "cvt.rn.f16x2.e4m3x2 h2, e;\n\t"
        "mov.b32 {h, _}, h2;\n\t"
        "cvt.f32.f16 $0, h;\n\t}",
        "=f,f"))


def _e2m1_rne_ptx(dst: str, src: str) -> str:
    """PTX of e2m1_rne (a scoped block): dst <- E2M1 RNE of src >= 0 (fp32 registers or $n operands)."""
    return ("{\n\t.reg .b32 c;\n\t.reg .f32 r;\n\t"
            f"max.f32 r, {src}, 0f3F800000;\n\tmov.b32 c, r;\n\tand.b32 c, c, 0x7F800000;\n\tadd.s32 c, c, 0x0B000000;\n\t"
            f"mov.b32 r, c;\n\tadd.rn.f32 r, {src}, r;\n\tsub.rn.f32 r, r, c;\n\tmin.f32 {dst}, r, 0f40C00000;\n\t}}")


@dsl_user_op
def e2m1_rne(y, *, loc=None, ip=None) -> Float32:
    """Round y >= 0 to the nearest E2M1 value {0,.5,1,1.5,2,3,4,6} (ties to even code, saturate at 6), 6 instr.

    Magic-number rounding: c = 2^22 * 2^e with 2^e the power of two of max(y, 1) (exponent bits of max(y,1)
    plus 22 in the exponent field); fp32 add.rn(y, c) then rounds y to a multiple of ulp(c) = 0.5 * 2^e --
    the E2M1 spacing (0.5 below 2, 1 in [2, 4), 2 in [4, 8)) -- with RNE, whose tie rule (even multiple) is the
    E2M1 one (even code); sub.rn(., c) is exact; min(., 6) saturates (7 -> 8 -> 6).  Checked on the CPU
    against quant's E2M1 encoder at every decision point and its fp32 neighbours (tests/test_prefill_compile.py)."""
    return Float32(_asm(T.f32(), [Float32(y).ir_value(loc=loc, ip=ip)], _e2m1_rne_ptx("$0", "$1"), "=f,f"))



@dsl_user_op
def e2m1_rne_x22(y22, *, loc=None, ip=None) -> Float32:
    """E2M1 RNE of y = y22 * 2^-22 >= 0, NOT saturated (7 -> 8): e2m1_rne's rounding in 4 instructions, for
    callers that saturate and scale later in packed 16-bit (pack_p_sat_scale).  The 2^22 is folded into the
    multiply that produces y22 (exact), so max(y22, 2^22) & exponent-mask is e2m1_rne's magic c directly (no
    integer add), and fma(y22, 2^-22, c) = add.rn(y, c) (the product is exact): same result as e2m1_rne."""
    return Float32(_asm(
        T.f32(), [Float32(y22).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 c;\n\t.reg .f32 r;\n\t"
        "max.f32 r, $1, 0f4A800000;\n\tmov.b32 c, r;\n\tand.b32 c, c, 0x7F800000;\n\tmov.b32 r, c;\n\t"
        "fma.rn.f32 $0, $1, 0f34800000, r;\n\tsub.rn.f32 $0, $0, r;\n\t}",
        "=f,f"))


@dsl_user_op
def e4m3_rne_pair(x, is_bf16: bool, *, loc=None, ip=None):
    """e4m3_rne(x) as (fp32 value, the same value as a half2 (s, s) in fp16 or bf16): both exact."""
    to_bf16 = "cvt.rn.bf16x2.f32 h2, $0, $0;\n\t" if is_bf16 else ""
    res = _asm(llvm.StructType.get_literal([T.f32(), T.i32()]), [Float32(x).ir_value(loc=loc, ip=ip)],
               "{\n\t.reg .b16 e;\n\t.reg .b32 h2;\n\t.reg .f16 h;\n\t"
               "cvt.rn.satfinite.e4m3x2.f32 e, $2, $2;\n\tcvt.rn.f16x2.e4m3x2 h2, e;\n\t"
               "mov.b32 {h, _}, h2;\n\tcvt.f32.f16 $0, h;\n\t" + to_bf16 + "mov.b32 $1, h2;\n\t}",
               "=f,=r,f")
    return (Float32(llvm.extractvalue(T.f32(), res, [0], loc=loc, ip=ip)),
            Uint32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def pack_p_sat_scale(a, b, s2, is_bf16: bool, *, loc=None, ip=None) -> Uint32:
    """(a, b) unsaturated E2M1 values (e2m1_rne_x22) -> the half2 (min(a, 6) * s, min(b, 6) * s) in fp16 or bf16
    (a in the low half): 3 instructions per pair instead of 2 fp32 min + 2 fp32 multiplies + the pack.  Exact,
    so bit-identical to packing e2m1_rne(.) * s: E2M1 values are exact in 16 bit, and every E2M1 * E4M3 product
    fits fp16 (2^-10 .. 2688) and bf16 (at most 6 significant bits)."""
    ty = "bf16x2" if is_bf16 else "f16x2"
    six = 0x40C040C0 if is_bf16 else 0x46004600
    return Uint32(_asm(T.i32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip),
                                 Uint32(s2).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .b32 w, k;\n\t"
                       f"cvt.rn.{ty}.f32 w, $2, $1;\n\tmov.b32 k, {six};\n\tmin.{ty} w, w, k;\n\t"
                       f"mul.rn.{ty} $0, w, $3;\n\t}}",
                       "=r,f,f,r"))


# ------------------------------------------------------------------------------- NVFP4 "mse" scale rule
# The one device implementation of quant.nvfp4's "mse" encoder rule (module docstring there), shared by the prefill
# quantizer (quant/quant_kernel.py: Q, K, V groups) and the decode kernel's in-register query quantization
# (kernels/decode.py). P (softmax probabilities) is never quantized with it: the kernels keep the amax rule for P.

def mse_scale_steps():
    """The candidate E4M3 code offsets after the amax code, read from quant.nvfp4.MSE_SCALE_STEPS (the kernels take
    them at construction, so a compiled kernel and its cache key follow the codec's tuple)."""
    from quant.nvfp4 import MSE_SCALE_STEPS

    steps = tuple(int(d) for d in MSE_SCALE_STEPS)
    if any(d == 0 or abs(d) > 125 for d in steps):
        raise ValueError(f"quant.nvfp4.MSE_SCALE_STEPS must hold non-zero code offsets, got {MSE_SCALE_STEPS!r}")
    return steps


@dsl_user_op
def _fabs(x, *, loc=None, ip=None) -> Float32:
    """|x| (IEEE abs.f32: subnormals kept)."""
    return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "abs.f32 $0, $1;", "=f,f"))


@dsl_user_op
def _e4m3_code_of(s, *, loc=None, ip=None) -> Uint32:
    """E4M3 code (0..126) of an fp32 that is an E4M3 value (exact conversion)."""
    return Uint32(_asm(T.i32(), [Float32(s).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .b16 e;\n\tcvt.rn.satfinite.e4m3x2.f32 e, $1, $1;\n\tcvt.u32.u16 $0, e;\n\t"
                       "and.b32 $0, $0, 255;\n\t}", "=r,f"))


@dsl_user_op
def _e4m3_candidate(code, step: int, *, loc=None, ip=None):
    """(code + step as u32, the fp32 E4M3 value of that code clamped to [1, 126]). Out-of-range codes are never
    taken by _mse_take; the clamp only keeps their (discarded) SSE off the NaN / zero divisors of div.rn's slow
    path."""
    res = _asm(llvm.StructType.get_literal([T.i32(), T.f32()]), [Uint32(code).ir_value(loc=loc, ip=ip)],
               "{\n\t.reg .b16 e;\n\t.reg .b32 h2, w;\n\t.reg .f16 h;\n\t"
               f"add.s32 $0, $2, {int(step)};\n\tmax.s32 w, $0, 1;\n\tmin.s32 w, w, 126;\n\tcvt.u16.u32 e, w;\n\t"
               "cvt.rn.f16x2.e4m3x2 h2, e;\n\tmov.b32 {h, _}, h2;\n\tcvt.f32.f16 $1, h;\n\t}",
               "=r,=f,r")
    return (Uint32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Float32(llvm.extractvalue(T.f32(), res, [1], loc=loc, ip=ip)))


# --------------------------------------------------------------- true division by a shared divisor
# x / s for the 16 values of a group with one divisor: ptxas's own div.rn.f32 fast path (MUFU.RCP, one Newton step
# r = r0 + r0 (1 - s r0), q0 = x r, remainder t = x - s q0 by FMA, q = q0 + r t) with the reciprocal computed once
# per divisor instead of once per division, and without div.rn's FCHK range check + slow-path call.  FCHK diverts
# only operands with extreme exponents (zero / denormal / inf / nan, or near the ends of the fp32 range); here s is
# an E4M3 value in [2^-9, 448] (or 1.0), so such an x has |x / s| far below 0.25 or far above 6 (or is not finite:
# its group keeps scale NaN and zero codes), where the E2M1 code (0 or the saturated 6) and the squared error
# m*s - |x| do not depend on the last ulp of the quotient.  So the codes and errors equal div.rn's, at ~3
# instructions per division instead of ~10.  The dv_ register names make the FMAs recognisable in the PTX (the
# quantizer's numerics have no other FMA; tests/test_prefill_compile.py checks it).

def _rcp_ptx(s: str) -> str:
    """PTX (inside a scope declaring dv_r, dv_nb, dv_t) setting dv_r = refined 1/s, dv_nb = -s."""
    return (f"neg.f32 dv_nb, {s};\n\trcp.approx.ftz.f32 dv_r, {s};\n\t"
            "fma.rn.f32 dv_t, dv_nb, dv_r, 0f3F800000;\n\tfma.rn.f32 dv_r, dv_r, dv_t, dv_r;\n\t")


def _div_ptx(dst: str, x: str) -> str:
    """PTX: dst = x / s (see above; needs dv_r, dv_nb from _rcp_ptx, and scratch dv_q, dv_t)."""
    return (f"mul.rn.f32 dv_q, {x}, dv_r;\n\tfma.rn.f32 dv_t, dv_nb, dv_q, {x};\n\t"
            f"fma.rn.f32 {dst}, dv_r, dv_t, dv_q;\n\t")


@dsl_user_op
def div16(xs, s, *, loc=None, ip=None):
    """[x / s for x in xs] (16 fp32, one divisor s: an E4M3 scale or 1.0), equal to IEEE div.rn (see above)."""
    args = [Float32(a).ir_value(loc=loc, ip=ip) for a in xs] + [Float32(s).ir_value(loc=loc, ip=ip)]
    n = len(xs)
    body = "{\n\t.reg .f32 dv_r, dv_nb, dv_q, dv_t;\n\t" + _rcp_ptx(f"${2 * n}")
    for i in range(n):
        body += _div_ptx(f"${i}", f"${n + i}")
    res = _asm(llvm.StructType.get_literal([T.f32()] * n), args, body + "}",
               ",".join(["=f"] * n) + "," + ",".join(["f"] * (n + 1)))
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(n)]


def _sse16_ptx() -> str:
    """PTX of the squared error of one 16-element group at scale $17 (inputs $1..$16 = |x|): per element in order
    y = |x| / s (IEEE true division: div.rn's fast path with the reciprocal shared, see above), m = E2M1_RNE(y),
    e' = |x| - m*s as ONE fma (m*s is exact in fp32 -- <= 6 significant bits in [2^-10, 2688] -- so the fma rounds
    exactly where the codec's mul-then-sub rounds, and e'^2 = e^2), acc = acc + e'*e' with the square and the sum
    each an explicit .rn instruction, which ptxas never contracts into an FMA (the codec's fixed order). The mse_e /
    mse_acc names make the steps countable in the PTX (tests/test_prefill_compile.py, tests/test_decode_compile.py)."""
    body = ("{\n\t.reg .f32 mse_y, mse_m, mse_e, mse_acc, dv_r, dv_nb, dv_q, dv_t;\n\tmov.b32 mse_acc, 0f00000000;\n\t"
            + _rcp_ptx("$17"))
    for i in range(1, 17):
        body += (_div_ptx("mse_y", f"${i}") + _e2m1_rne_ptx("mse_m", "mse_y") + "\n\t"
                 f"fma.rn.f32 mse_e, mse_m, dv_nb, ${i};\n\t"
                 "mul.rn.f32 mse_e, mse_e, mse_e;\n\tadd.rn.f32 mse_acc, mse_acc, mse_e;\n\t")
    return body + "mov.b32 $0, mse_acc;\n\t}"


_SSE16 = _sse16_ptx()


@dsl_user_op
def _sse16(ax, s, *, loc=None, ip=None) -> Float32:
    """Squared NVFP4 error of a group (ax: 16 fp32 |x|) at the fp32 scale s > 0 (see _sse16_ptx)."""
    args = [Float32(a).ir_value(loc=loc, ip=ip) for a in ax] + [Float32(s).ir_value(loc=loc, ip=ip)]
    return Float32(_asm(T.f32(), args, _SSE16, "=f," + ",".join(["f"] * 17)))


@dsl_user_op
def _mse_take(err, best_err, ok, code, *, loc=None, ip=None) -> Int32:
    """1 iff the candidate wins: ok != 0, 1 <= code <= 126 and err < best_err (strictly: earlier candidates win
    ties; a NaN err never wins), else 0."""
    args = [Float32(err).ir_value(loc=loc, ip=ip), Float32(best_err).ir_value(loc=loc, ip=ip),
            Int32(ok).ir_value(loc=loc, ip=ip), Uint32(code).ir_value(loc=loc, ip=ip)]
    return Int32(_asm(T.i32(), args,
                      "{\n\t.reg .pred p, q;\n\tsetp.lt.f32 p, $1, $2;\n\tsetp.ne.s32 q, $3, 0;\n\tand.pred p, p, q;\n\t"
                      "setp.ge.s32 q, $4, 1;\n\tand.pred p, p, q;\n\tsetp.le.s32 q, $4, 126;\n\tand.pred p, p, q;\n\t"
                      "selp.b32 $0, 1, 0, p;\n\t}",
                      "=r,f,f,r,r"))


@dsl_user_op
def _select_u32(pred, a, b, *, loc=None, ip=None) -> Uint32:
    """a if pred != 0 else b."""
    return Uint32(_asm(T.i32(), [Int32(pred).ir_value(loc=loc, ip=ip), Uint32(a).ir_value(loc=loc, ip=ip),
                                 Uint32(b).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .pred p;\n\tsetp.ne.s32 p, $1, 0;\n\tselp.b32 $0, $2, $3, p;\n\t}", "=r,r,r,r"))


@dsl_user_op
def _select_f32(pred, a, b, *, loc=None, ip=None) -> Float32:
    """a if pred != 0 else b."""
    return Float32(_asm(T.f32(), [Int32(pred).ir_value(loc=loc, ip=ip), Float32(a).ir_value(loc=loc, ip=ip),
                                  Float32(b).ir_value(loc=loc, ip=ip)],
                        "{\n\t.reg .pred p;\n\tsetp.ne.s32 p, $1, 0;\n\tselp.f32 $0, $2, $3, p;\n\t}", "=f,r,f,f"))


def nvfp4_mse_scale(xs, s, ok, steps=None):
    """The NVFP4 "mse" scale rule on one group, in registers: xs = the group's 16 fp32 values, s = its amax scale
    (E4M3_RNE(min(amax/6, 448)) as fp32), ok = the group is finite and s > 0 (Int32/Boolean; else s is kept).
    Candidates: the amax code c, then c + d for d in `steps` (default quant.nvfp4.MSE_SCALE_STEPS), codes outside
    [1, 126] skipped; the strictly smallest fixed-order fp32 squared error wins, the earlier on ties -- exactly
    quant.nvfp4.mse_refine. Returns (E4M3 code as Uint32, scale as Float32). Straight-line (no branches), so every
    lane of a warp may call it; cost (1 + len(steps)) * 16 true divisions (div16's ~3-instruction form)."""
    steps = mse_scale_steps() if steps is None else tuple(steps)
    ax = [_fabs(x) for x in xs]
    if len(ax) != 16:
        raise ValueError(f"nvfp4_mse_scale: a group has 16 values, got {len(ax)}")
    okw = Int32(ok)
    code = _e4m3_code_of(s)
    # groups that keep their scale anyway (!ok: flushed, NaN) evaluate at 1.0, not at 0 / NaN: their results are
    # discarded, and a zero or NaN divisor would send all 16 divisions into div.rn's slow path (e.g. the decode
    # kernel's zero-padded query heads)
    s_eval = _select_f32(okw, s, Float32(1.0))
    best_err, best_code, best_s = _sse16(ax, s_eval), code, Float32(s)
    for d in steps:
        cd, sd = _e4m3_candidate(code, d)
        err = _sse16(ax, sd)
        take = _mse_take(err, best_err, okw, cd)
        best_err = _select_f32(take, err, best_err)
        best_code = _select_u32(take, cd, best_code)
        best_s = _select_f32(take, sd, best_s)
    return best_code, best_s


# E2M1 magnitude code (0..7) -> the two bytes of its fp16 / bf16 value, as prmt lookup tables
# (low table: codes 0..3, high table: codes 4..7).
_LUT = {
    # fp16: 0, .5, 1, 1.5 | 2, 3, 4, 6  -> 0x0000 0x3800 0x3C00 0x3E00 | 0x4000 0x4200 0x4400 0x4600
    "f16": dict(hi_lo=0x3E3C3800, hi_hi=0x46444240, lo_lo=0x00000000, lo_hi=0x00000000),
    # bf16: 0x0000 0x3F00 0x3F80 0x3FC0 | 0x4000 0x4040 0x4080 0x40C0
    "bf16": dict(hi_lo=0x3F3F3F00, hi_hi=0x40404040, lo_lo=0xC0800000, lo_hi=0xC0804000),
}


@dsl_user_op
def e4m3_half2(sc_byte, is_bf16: bool, *, loc=None, ip=None) -> Uint32:
    """The E4M3 scale in the low byte of sc_byte as a half2 (s, s) in fp16 or bf16 (exact)."""
    to_bf16 = ("mov.b32 {sh, _}, s2;\n\tcvt.f32.f16 sf, sh;\n\tcvt.rn.bf16x2.f32 s2, sf, sf;\n\t"
               if is_bf16 else "")  # e4m3 -> f16x2 -> f32 -> bf16x2 (all exact)
    return Uint32(_asm(T.i32(), [Uint32(sc_byte).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .b32 s2, sbw;\n\t.reg .b16 sb, sh;\n\t.reg .f32 sf;\n\t"
                       # replicate the scale byte into both bytes of a b16, convert
                       "and.b32 sbw, $1, 255;\n\tprmt.b32 sbw, sbw, 0, 0x0000;\n\tcvt.u16.u32 sb, sbw;\n\t"
                       "cvt.rn.f16x2.e4m3x2 s2, sb;\n\t" + to_bf16 + "mov.b32 $0, s2;\n\t}",
                       "=r,r"))


@dsl_user_op
def fp4x8_decode_s2(w, s2, is_bf16: bool, *, loc=None, ip=None):
    """Decode 8 packed E2M1 codes (element i in nibble i of w) times the half2 scale s2 (e4m3_half2) into 4 half2
    words (element 2k in the low half of word k).  Exact in fp16 and bf16.  The prefill's "nibble" decode and the
    decode kernel's (kernels/decode.py, fp16 only: 19 instructions per word, the scale converted once per group)."""
    t = _LUT["bf16" if is_bf16 else "f16"]
    if not is_bf16:  # every fp16 E2M1 value has a zero low byte: the high bytes are interleaved with zeros (ptxas
        # does not fold a prmt of two zero tables, so there are no low-byte lookups: 2 instructions fewer per word)
        text = (
            "{\n\t.reg .b32 m, x, h0, h1, se, so, g0, g1;\n\t"
            "and.b32 m, $4, 0x77777777;\n\t"
            f"prmt.b32 h0, 0x{t['hi_lo']:08X}, 0x{t['hi_hi']:08X}, m;\n\t"
            "shr.b32 x, m, 16;\n\t"
            f"prmt.b32 h1, 0x{t['hi_lo']:08X}, 0x{t['hi_hi']:08X}, x;\n\t"
            # sign bits: even nibbles (bit 3 of each byte, shifted to bit 7) and odd nibbles (bit 7)
            "shl.b32 se, $4, 4;\n\tand.b32 se, se, 0x80808080;\n\tand.b32 so, $4, 0x80808080;\n\t"
            "prmt.b32 g0, se, so, 0x5140;\n\tprmt.b32 g1, se, so, 0x7362;\n\t"
            "or.b32 h0, h0, g0;\n\tor.b32 h1, h1, g1;\n\t"
            "prmt.b32 $0, h0, 0, 0x1404;\n\tprmt.b32 $1, h0, 0, 0x3424;\n\t"
            "prmt.b32 $2, h1, 0, 0x1404;\n\tprmt.b32 $3, h1, 0, 0x3424;\n\t"
            "mul.rn.f16x2 $0, $0, $5;\n\tmul.rn.f16x2 $1, $1, $5;\n\tmul.rn.f16x2 $2, $2, $5;\n\t"
            "mul.rn.f16x2 $3, $3, $5;\n\t}"
        )
    else:  # low bytes from their own table, interleaved with the high bytes: word k = (elem 2k, elem 2k+1)
        text = (
            "{\n\t.reg .b32 m, se, so, h0, h1, l0, l1, g0, g1, x;\n\t"
            "and.b32 m, $4, 0x77777777;\n\tshr.b32 x, m, 16;\n\t"
            # high and low bytes of the 16-bit values of codes 0..3 (h0, l0) and 4..7 (h1, l1)
            f"prmt.b32 h0, {t['hi_lo']}, {t['hi_hi']}, m;\n\t"
            f"prmt.b32 h1, {t['hi_lo']}, {t['hi_hi']}, x;\n\t"
            f"prmt.b32 l0, {t['lo_lo']}, {t['lo_hi']}, m;\n\tprmt.b32 l1, {t['lo_lo']}, {t['lo_hi']}, x;\n\t"
            # sign bits: even nibbles (bit 3 of each byte) and odd nibbles (bit 7) -> bit 7 of a byte
            "and.b32 se, $4, 0x08080808;\n\tshl.b32 se, se, 4;\n\tand.b32 so, $4, 0x80808080;\n\t"
            "prmt.b32 g0, se, so, 0x5140;\n\tprmt.b32 g1, se, so, 0x7362;\n\t"
            "or.b32 h0, h0, g0;\n\tor.b32 h1, h1, g1;\n\t"
            "prmt.b32 $0, l0, h0, 0x5140;\n\tprmt.b32 $1, l0, h0, 0x7362;\n\t"
            "prmt.b32 $2, l1, h1, 0x5140;\n\tprmt.b32 $3, l1, h1, 0x7362;\n\t"
            "mul.rn.bf16x2 $0, $0, $5;\n\tmul.rn.bf16x2 $1, $1, $5;\n\tmul.rn.bf16x2 $2, $2, $5;\n\t"
            "mul.rn.bf16x2 $3, $3, $5;\n\t}"
        )
    res = _asm(llvm.StructType.get_literal([T.i32()] * 4),
               [Uint32(w).ir_value(loc=loc, ip=ip), Uint32(s2).ir_value(loc=loc, ip=ip)],
               text, "=r,=r,=r,=r,r,r")
    return tuple(Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


# "bits" FP4 word layout (kernels/kv_cache.py BITS_POS: the decode cache, and the SM90 prefill's packed Q/K/V on its
# fp16 decode path): decoded values are E2M1 * scale * 2^(FP4_EXP - 14) in fp16 (exact: the product's last bit is
# >= 2^-10 * 2^-7 = 2^-17 > 2^-24, and 6 * 448 * 2^-7 < 65504); the 2^(14 - FP4_EXP) goes into the fp32 factors
# (softmax scale of S, s1 of O), which makes the result bit-identical to the "nibble" path. 7 rather than 0 keeps
# most products fp16-normal (subnormal only below 2^-7), at 1 extra HMUL2 per 16-group.
FP4_EXP = 7


@dsl_user_op
def fp4x8_f16_bits(w, s2, *, loc=None, ip=None):
    """8 E2M1 codes in the "bits" word layout (kernels/kv_cache.py: BITS_POS) times a half2 s2 -> 4 f16x2 words
    (elements 2k, 2k+1 in word k). Each half is placed, not looked up: s<<15 | (e1 e0 m)<<9 is E2M1 * 2^-14 in
    fp16 exactly (e = 0 gives the subnormal m * 2^-15), so pair k is a shift and a mask of w (pairs 2, 3 take
    the sign from a second shift): 5 shifts + 6 logic ops, then the 4 exact multiplies (no .ftz: fp16
    subnormals are kept). The caller passes s2 = scale * 2^FP4_EXP and folds 2^(14 - FP4_EXP) into fp32."""
    text = (
        "{\n\t.reg .b32 a, b;\n\t"
        "and.b32 $0, $4, 0x8E008E00;\n\t"
        "shl.b32 a, $4, 3;\n\tand.b32 $1, a, 0x8E008E00;\n\t"
        "shl.b32 a, $4, 6;\n\tshl.b32 b, $4, 1;\n\tand.b32 a, a, 0x0E000E00;\n\tand.b32 b, b, 0x80008000;\n\t"
        "or.b32 $2, a, b;\n\t"
        "shl.b32 a, $4, 9;\n\tshl.b32 b, $4, 2;\n\tand.b32 a, a, 0x0E000E00;\n\tand.b32 b, b, 0x80008000;\n\t"
        "or.b32 $3, a, b;\n\t"
        "mul.rn.f16x2 $0, $0, $5;\n\tmul.rn.f16x2 $1, $1, $5;\n\tmul.rn.f16x2 $2, $2, $5;\n\t"
        "mul.rn.f16x2 $3, $3, $5;\n\t}"
    )
    res = _asm(llvm.StructType.get_literal([T.i32()] * 4),
               [Uint32(w).ir_value(loc=loc, ip=ip), Uint32(s2).ir_value(loc=loc, ip=ip)],
               text, "=r,=r,=r,=r,r,r")
    return tuple(Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def e4m3_bcast_f16_pow2(word, i: int, exp2: int, *, loc=None, ip=None) -> Uint32:
    """Byte i of `word` (an E4M3 code) times 2^exp2 as an f16x2 (s, s); exact for exp2 <= 7 (448 * 2^7 < 65504)."""
    sel = 0x4400 | (i << 4) | i
    f = 0x3C00 + (exp2 << 10)  # fp16 bits of 2^exp2
    return Uint32(_asm(T.i32(), [Uint32(word).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .b32 t, f;\n\t.reg .b16 h;\n\t"
                       f"prmt.b32 t, $1, 0, {sel};\n\tcvt.u16.u32 h, t;\n\tcvt.rn.f16x2.e4m3x2 t, h;\n\t"
                       f"mov.b32 f, {(f << 16) | f};\n\tmul.rn.f16x2 $0, t, f;\n\t}}",
                       "=r,r"))


class Sm90DecodePath:
    """FP4 via decode-to-16-bit in shared memory, then the 16-bit warp MMA (sm_80+ incl. sm_90a)."""

    name = "sm90_decode"
    needs_decode = True
    block_scaled = False
    tile = None

    def __init__(self, arch: int):
        self.arch = arch

    @cute.jit
    def decode_rows(self, dst: cute.Tensor, tiled_copy: cute.TiledCopy, tidx: Int32, src32: cute.Tensor,
                    scales: cute.Tensor, row_limit: Int32, is_bf16: cutlass.Constexpr,
                    bits: cutlass.Constexpr = False, check_rows: cutlass.Constexpr = True):
        """dst (rows x cols, 16-bit, swizzled) <- decode(src32 (rows x cols/8 u32), scales (rows x cols/16 u8)).

        The tiled copy gives each thread 8 or 16 consecutive columns per step; with 16 (the prefill kernel's decode
        copies) they are exactly one scale group, so its scale is loaded and converted once for the two code words.
        bits: the code words are in the "bits" layout and dst is fp16; the values written are dq * 2^(FP4_EXP - 14)
        (the caller folds the factor back in fp32). Rows >= row_limit are written as zeros (sequence tail /
        padding); check_rows=False: the caller knows every row is valid (no per-step test)."""
        thr = tiled_copy.get_slice(tidx)
        tD = thr.partition_D(dst)
        cD = thr.partition_D(cute.make_identity_tensor((cute.size(dst, mode=[0]), cute.size(dst, mode=[1]))))
        nv = cute.size(tD, mode=[0])  # values per thread and step: 8 (one code word) or 16 (one scale group)
        frag = cute.make_rmem_tensor((nv,), dst.element_type)
        frag32 = cute.recast_tensor(frag, Uint32)
        if const_expr(check_rows):
            for m in cutlass.range_constexpr(cute.size(tD, mode=[1])):
                for k in cutlass.range_constexpr(cute.size(tD, mode=[2])):
                    row = cD[0, m, k][0]
                    col = cD[0, m, k][1]
                    if row < row_limit:
                        self.decode_group(frag32, src32, scales, row, col, nv, is_bf16, bits)
                    else:
                        for i in cutlass.range_constexpr(nv // 2):
                            frag32[i] = Uint32(0)
                    cute.autovec_copy(frag, tD[None, m, k])
        else:
            # every row valid: all of this thread's code words and scales are loaded first, then decoded and
            # stored -- ptxas does not move a load of src above a store to dst (it cannot tell they do not alias),
            # so loading inside the store loop exposed each load's latency (short scoreboard stalls in the profile)
            loaded = []
            for m in cutlass.range_constexpr(cute.size(tD, mode=[1])):
                for k in cutlass.range_constexpr(cute.size(tD, mode=[2])):
                    row = cD[0, m, k][0]
                    col = cD[0, m, k][1]
                    words = [src32[row, col // 8 + h] for h in range(nv // 8)]
                    loaded.append((Uint32(scales[row, col // 16]), words))
            i_mk = 0
            for m in cutlass.range_constexpr(cute.size(tD, mode=[1])):
                for k in cutlass.range_constexpr(cute.size(tD, mode=[2])):
                    sc, words = loaded[i_mk]
                    i_mk += 1
                    self.decode_words(frag32, sc, words, is_bf16, bits)
                    cute.autovec_copy(frag, tD[None, m, k])

    @cute.jit
    def decode_group(self, frag32: cute.Tensor, src32: cute.Tensor, scales: cute.Tensor, row: Int32, col: Int32,
                     nv: cutlass.Constexpr, is_bf16: cutlass.Constexpr, bits: cutlass.Constexpr):
        """frag32[0 : nv/2] <- the nv (8 or 16) decoded values at (row, col..col+nv-1) as 16-bit pairs."""
        self.decode_words(frag32, Uint32(scales[row, col // 16]), [src32[row, col // 8 + h] for h in range(nv // 8)],
                          is_bf16, bits)

    @cute.jit
    def decode_words(self, frag32: cute.Tensor, sc: Uint32, words: list, is_bf16: cutlass.Constexpr,
                     bits: cutlass.Constexpr):
        """frag32[0 : 4 * len(words)] <- the code words (8 E2M1 codes each) times the E4M3 scale in sc's low byte."""
        if const_expr(bits):
            s2 = e4m3_bcast_f16_pow2(sc, 0, FP4_EXP)
        else:
            s2 = e4m3_half2(sc, is_bf16)
        for h in cutlass.range_constexpr(len(words)):
            if const_expr(bits):
                d = fp4x8_f16_bits(words[h], s2)
            else:
                d = fp4x8_decode_s2(words[h], s2, is_bf16)
            for i in cutlass.range_constexpr(4):
                frag32[4 * h + i] = d[i]


def make_arch_path(arch: int, head_dim: int = 128):
    """The arch path for sm_<arch> (arch = 10*major + minor).  ValueError below sm_80."""
    if arch < 80:
        raise ValueError(f"ThriftAttention prefill needs sm_80 or newer; got sm_{arch}")
    if arch in (120, 121):
        return Sm120BlockScaledPath(arch, head_dim)
    return Sm90DecodePath(arch)


class Sm120BlockScaledPath(Sm90DecodePath):
    """sm_120a/121a: FP4 tiles stay packed in shared memory; QK^T and P'V' run on MmaMXF4NVF4Op (16x8x64,
    E4M3 scale per 16) through the helper ``kernels.fp4_mma_sm120.Sm120Fp4AttnTile``:
        qf  = tile.load_q(sQ_fp4, sQs, tidx)            once per CTA (Q A-fragments + scale registers)
        S   = tile.qk(qf, sK_fp4, sKs, tidx)            per FP4 key tile, m16n8 C layout, natural key order
        pf  = tile.quantize_p_natural(P~, tidx)         two-level P -> FP4 A fragment + scales (contract numerics)
        tile.pv(acc_O, pf, sV_fp4, sVs, tidx)           acc_O += P'V' (s1 folded by the kernel into its rescale)
    The FP4 stages use the helper's swizzled byte layouts (Swizzle<B,4,3> rows; stage offsets are multiples of
    1024 B so the swizzle commutes with the stage index).  K stays in natural key order (contract layout), so
    the quad-transposing ``quantize_p_natural`` is used, not the permuted-K variant.
    """

    name = "sm120_block_scaled"
    needs_decode = False
    block_scaled = True

    def __init__(self, arch: int, head_dim: int):
        Sm90DecodePath.__init__(self, arch)
        from kernels.fp4_mma_sm120 import Sm120Fp4AttnTile

        self.tile = Sm120Fp4AttnTile(head_dim, "nvfp4")
