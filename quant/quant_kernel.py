"""One-launch CuTe DSL quantization of Q, K, V into the packed NVFP4 layouts of the prefill kernel,
plus the fp32 K block means (selection), bit-identical to quant.nvfp4.

Outputs (contract layouts, see layouts/prefill.py):
    Qp [B,Sq,Hq,D/2] u8, Qs [B,Sq,Hq,D/16] u8 (E4M3 bits)      = nvfp4.quantize(q, dim=-1, scale_rule=rule)
    Kp [B,Skv,Hkv,D/2], Ks [B,Skv,Hkv,D/16]                      = nvfp4.quantize(k, dim=-1, scale_rule=rule)
    Vp [B,Hkv,D,Skv_pad/2], Vs [B,Hkv,D,Skv_pad/16] (Skv_pad = round_up(Skv, 64), zero padded)
                                          = nvfp4.quantize(pad(v).permute(0,2,3,1), dim=-1, scale_rule=rule)
    Kmean [B, nkb, Hkv, D] fp32: mean of each 64-key block over its valid keys (always of the UNrotated K).
    Qmean [B, nqb, Hq, D] fp32 (with_qmean=True): the same for the 64-query blocks of the unrotated Q.
    Both are kernels.selection.block_means bit for bit: an fp32 sum in token order from +0.0 (add.rn), then div.rn by
    the block's valid-token count. With them the public op's selection needs no pass of its own over Q and K.
    fp4_layout="bits": Qp, Kp, Vp hold the same codes with every 32-bit word in kernels/kv_cache.py's BITS_POS order
    (what the SM90 prefill's fp16 decode reads; kernels.prefill.fp4_word_layout) instead of nvfp4's nibble order.
    rotate=True (qk_rotation="hadamard"): Q and K are rotated first, Qp/Qs = nvfp4.quantize(hadamard_rotate(q)),
    Kp/Ks likewise (and Kd = dq of the rotated K); see "Rotation" below.
    with_dq=True (the SM90 prefill's "dq16" K/V source, see kernels/prefill.py):
    Kd, Vd [B,Skv,Hkv,D] in the input dtype: dq(K), dq(V) = E2M1 value * E4M3 scale of every element, exact in
    fp16/bf16 (<= 5 significant bits, |x| in [2^-10, 2688]), i.e. nvfp4.dequantize of the outputs above.

Work split of the 1-D launch (one thread per item, 128 threads per CTA):
    items [0, nQ)            one 16-element Q group (b, s, h, g)
    items [nQ, nQ+nK)        one 16-element K group
    items [nQ+nK, +nV)       one (b, hkv, d, key block): the 4 V groups of 16 keys of that block at dim d
                             (threads adjacent in d -> coalesced reads of V), and the K mean at (b, kb, hkv, d).
    with_qmean: a second launch (qmean_kernel), one thread per (b, query block, hq, d): the Q mean at (b, qb, hq, d).
    Its own launch keeps its register count out of the quantizing kernel's (72 vs 96 registers on sm_90a with the Q
    means as the first launch's tail). (Interleaving them among the quantizing CTAs was slower: RESULTS session 15.)
Rotation (rotate=True; quant/rotation.py defines the numerics, this reproduces them bit for bit): a row's D/16 Q or K
groups are D/16 consecutive items, starting at an item index that is a multiple of D/16 (nQ = rows*D/16), and D/16
(4 or 8) divides 32, so a row's groups sit in adjacent lanes of one warp, group g in lane (lane % (D/16)) == g.
Each thread loads its 16 values -> fp32, runs the strides 1, 2, 4, 8 butterflies in registers, then strides 16, 32
(, 64) with shfl.xor over lane masks 1, 2 (, 4): for the pair (lower lane a, upper lane b) the lower lane keeps
a + b and the upper one computes partner - mine = a - b (torch's operands in torch's order). Then * fp32(1/sqrt(D)),
cvt.rn to the input dtype and back to fp32, then the NVFP4 code below. Every thread of the launch runs the
shuffles with the full mask (V items and the past-the-end items of the last warp with zeros: loads and stores are
predicated, the shuffles are not); a V lane is never the partner of a Q/K lane (nQ + nK is a multiple of D/16).

Numerics (fp32): scale = E4M3_RNE(amax/6) with saturation at 448 (cvt.rn.satfinite), code = E2M1_RNE(x/scale)
by true division (kernels/arch_paths.div16: div.rn's fast path, one reciprocal per group and divisor), sign kept for
values rounding to 0; scale 0 -> codes 0; a group with NaN/Inf gets scale 0x7F (NaN) and codes 0.
Scale rule (scale_rule, static): "mse" (the default) replaces the amax scale of every finite, non-flushed Q, K (after
the rotation) and V group by the best of it and its E4M3 neighbours quant.nvfp4.MSE_SCALE_STEPS (read at construction)
under the fixed-order fp32 squared error -- kernels/arch_paths.nvfp4_mse_scale, the device twin of
quant.nvfp4.mse_refine, so the outputs equal nvfp4.quantize(..., scale_rule="mse") bit for bit; the codes are then
encoded with the chosen scale as above. "amax" keeps E4M3_RNE(amax/6). Cost of "mse": 16 * (1 + len(steps)) extra
true divisions (~3 instructions each) and E2M1 roundings per group. (P, quantized inside the prefill kernel, always
uses the amax rule.)
"""
from __future__ import annotations

import math
import struct

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint8, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from kernels._validate import check_scale_rule
from kernels.arch_paths import div16, e2m1_rne, mse_scale_steps, nvfp4_mse_scale
from kernels.kv_cache import BITS_POS

THREADS = 128
BLOCK = 64
QM_BATCH = 16  # Q-mean loads in flight per thread (q_mean)


def _asm(ret, args, text, cons):
    return llvm.inline_asm(ret, args, text, cons, has_side_effects=False, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def _e4m3_byte(x, *, loc=None, ip=None):
    """(E4M3 RNE satfinite code of x as u32, its fp32 value)."""
    res = _asm(llvm.StructType.get_literal([T.i32(), T.f32()]), [Float32(x).ir_value(loc=loc, ip=ip)],
               "{\n\t.reg .b16 e;\n\t.reg .b32 h2;\n\t.reg .f16 h;\n\t"
               "cvt.rn.satfinite.e4m3x2.f32 e, $2, $2;\n\t"
               "cvt.u32.u16 $0, e;\n\tand.b32 $0, $0, 255;\n\t"
               "cvt.rn.f16x2.e4m3x2 h2, e;\n\tmov.b32 {h, _}, h2;\n\tcvt.f32.f16 $1, h;\n\t}",
               "=r,=f,f")
    return (Uint32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Float32(llvm.extractvalue(T.f32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def _e2m1_code_of(m, x, *, loc=None, ip=None) -> Uint32:
    """E2M1 code (0..15) of the rounded magnitude m in {0, .5, 1, 1.5, 2, 3, 4, 6} (an E2M1_RNE result) with x's
    sign bit: m * 2^-14 is exact in fp16 with the code's magnitude bits at [11:9] (0.5 -> the subnormal 2^-15 =
    0x0200, 6 -> 0x0E00), so the code is one conversion and a shift. With m = E2M1_RNE(|x| / s): the codec's code of
    x / s (RNE, ties to the even code, saturating at 6, the sign kept for values that round to 0)."""
    return Uint32(_asm(
        T.i32(), [Float32(m).ir_value(loc=loc, ip=ip), Float32(x).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .f32 t;\n\t.reg .b16 h;\n\t.reg .b32 c, s;\n\t"
        "mul.rn.f32 t, $1, 0f38800000;\n\tcvt.rn.f16.f32 h, t;\n\tcvt.u32.u16 c, h;\n\tshr.u32 c, c, 9;\n\t"
        "mov.b32 s, $2;\n\tshr.u32 s, s, 28;\n\tand.b32 s, s, 8;\n\tor.b32 $0, c, s;\n\t}",
        "=r,f,f"))


@dsl_user_op
def _fma(a, b, c, *, loc=None, ip=None) -> Float32:
    """a * b + c, one rounding (fma.rn.f32; the rot_ register name marks it in the PTX: the rotation's butterflies)."""
    return Float32(_asm(T.f32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip),
                                  Float32(c).ir_value(loc=loc, ip=ip)],
                        "{\n\t.reg .f32 rot_t;\n\tfma.rn.f32 rot_t, $1, $2, $3;\n\tmov.b32 $0, rot_t;\n\t}", "=f,f,f,f"))


@dsl_user_op
def _add_rn(a, b, *, loc=None, ip=None) -> Float32:
    """a + b, one IEEE rounding (add.rn.f32: never contracted or reassociated; the block means' fixed order; the bm_
    register name makes the steps countable in the PTX, tests/test_prefill_compile.py)."""
    return Float32(_asm(T.f32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
                        "{\n\t.reg .f32 bm_s;\n\tadd.rn.f32 bm_s, $1, $2;\n\tmov.b32 $0, bm_s;\n\t}", "=f,f,f"))


@dsl_user_op
def _div_rn(a, b, *, loc=None, ip=None) -> Float32:
    """a / b, IEEE division (div.rn.f32), as torch's tensor division computes it."""
    return Float32(_asm(T.f32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
                        "div.rn.f32 $0, $1, $2;", "=f,f,f"))


@dsl_user_op
def _e2m1_value(code, *, loc=None, ip=None) -> Float32:
    """fp32 value of an E2M1 code (0..15): magnitude bits placed at f16 bits [11:9] give 2^-14 * value
    (codes 0/1 land in the f16 subnormals: 0, 2^-15), so value = f16(bits) * 2^14; sign from bit 3."""
    return Float32(_asm(
        T.f32(), [Uint32(code).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 m;\n\t.reg .b16 h;\n\t.reg .f32 a;\n\t"
        "and.b32 m, $1, 7;\n\tshl.b32 m, m, 9;\n\tcvt.u16.u32 h, m;\n\tcvt.f32.f16 a, h;\n\t"
        "mul.f32 a, a, 0f46800000;\n\tand.b32 m, $1, 8;\n\tshl.b32 m, m, 28;\n\t"
        "mov.b32 $0, a;\n\tor.b32 $0, $0, m;\n\t}",
        "=f,r"))


class QuantKernel:
    """Static config: dtype (Float16/BFloat16), head_dim, with_dq (also write dq(K), dq(V) in 16 bit), rotate
    (Hadamard-rotate Q and K along head_dim before quantizing them) and scale_rule ("mse", the default: the NVFP4
    group scales of Q, K and V chosen by quant.nvfp4's "mse" encoder rule, candidates quant.nvfp4.MSE_SCALE_STEPS read
    here at construction; "amax": the standard E4M3_RNE(amax/6)).
    fp4_layout: bit order of the 8 codes in each 32-bit word of Qp, Kp, Vp: "nibble" (the contract's, element e in
    bits 4e..4e+3, what nvfp4.quantize returns) or "bits" (kernels/kv_cache.py BITS_POS: what the SM90 prefill's fp16
    decode reads, kernels.prefill.fp4_word_layout); the same codes and scales either way.
    with_qmean: also write the Q block means (mQm), for the public op's selection (a second launch, qmean_kernel)."""

    def __init__(self, dtype, head_dim: int, with_dq: bool = False, rotate: bool = False, scale_rule: str = "mse",
                 fp4_layout: str = "nibble", with_qmean: bool = False):
        if fp4_layout not in ("nibble", "bits"):
            raise ValueError(f"QuantKernel: fp4_layout must be 'nibble' or 'bits', got {fp4_layout!r}")
        self.fp4_layout = fp4_layout
        self.with_qmean = bool(with_qmean)
        self.dtype = dtype
        self.D = head_dim
        self.with_dq = with_dq
        self.rotate = bool(rotate)
        self.scale_rule = check_scale_rule(scale_rule, "QuantKernel")
        self.mse_steps = mse_scale_steps() if scale_rule == "mse" else ()
        if self.rotate and not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
            raise ValueError(f"QuantKernel: rotate needs head_dim a power of two in [16, 256], got {head_dim}")
        # fp32(1/sqrt(D)), the constant of quant.rotation (a Python float holding the exact fp32 value)
        self.inv_sqrt_d = float(struct.unpack("f", struct.pack("f", 1.0 / math.sqrt(head_dim)))[0])

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mQp: cute.Tensor, mQs: cute.Tensor,
                 mKp: cute.Tensor, mKs: cute.Tensor, mVp: cute.Tensor, mVs: cute.Tensor, mKm: cute.Tensor,
                 mKd: cute.Tensor, mVd: cute.Tensor, mQm: cute.Tensor, stream):
        """mKd / mVd: dq(K) / dq(V) outputs [B,Skv,Hkv,D] (written only with with_dq; else any tensor);
        mQm: the Q block means [B,nqb,Hq,D] fp32 (written only with with_qmean; else any tensor)."""
        D = self.D
        G = D // 16
        nQ = mQ.shape[0] * mQ.shape[1] * mQ.shape[2] * G
        nK = mK.shape[0] * mK.shape[1] * mK.shape[2] * G
        nkb = cute.ceil_div(mK.shape[1], BLOCK)
        nV = mK.shape[0] * mK.shape[2] * D * nkb
        self.kernel(mQ, mK, mV, mQp, mQs, mKp, mKs, mVp, mVs, mKm, mKd, mVd, nQ, nK, nV).launch(
            grid=(cute.ceil_div(nQ + nK + nV, THREADS), 1, 1), block=(THREADS, 1, 1), stream=stream)
        if const_expr(self.with_qmean):
            # a launch of its own: its unconditional loads (q_mean) would otherwise raise the register count of the
            # quantizing kernel, whose occupancy it sets
            nQm = mQ.shape[0] * mQ.shape[2] * D * cute.ceil_div(mQ.shape[1], BLOCK)
            self.qmean_kernel(mQ, mQm, nQm).launch(grid=(cute.ceil_div(nQm, THREADS), 1, 1), block=(THREADS, 1, 1),
                                                   stream=stream)

    @cute.jit
    def quant16(self, vals: cute.Tensor, pk: cute.Tensor, sc: cute.Tensor):
        """Quantize 16 fp32 values -> pk[0..7] packed bytes, sc[0] E4M3 scale byte; with_dq: vals <- dq(vals)."""
        amax = Float32(0.0)
        for i in cutlass.range_constexpr(16):
            v = vals[i]
            amax = cute.arch.fmax(amax, cute.arch.fmax(v, -v), nan=True)
        finite = amax < Float32.inf  # False for NaN / Inf
        code, s = _e4m3_byte(amax / Float32(6.0))
        ok = finite & (s > Float32(0.0))
        if const_expr(self.scale_rule == "mse"):
            # best of the amax scale and its E4M3 neighbours (kernels/arch_paths.nvfp4_mse_scale); keeps ok: the
            # candidates are codes in [1, 126], so the chosen scale is finite and > 0 whenever the amax one is.
            # (Keeping the winner's 16 rounded magnitudes from the search instead of dividing again below took 128
            # registers and timed 2.33 ms against this version's 1.89 ms at 32k on an H100: RESULTS.md, session 10.)
            code, s = nvfp4_mse_scale([vals[i] for i in range(16)], s, ok, self.mse_steps)
        div = s if ok else Float32(1.0)
        quo = div16([vals[i] for i in range(16)], div)  # == vals[i] / div (IEEE), one reciprocal per group
        # E2M1_RNE of |quo| (kernels/arch_paths.e2m1_rne: 6 instructions), then its code with quo's sign
        codes = [_e2m1_code_of(e2m1_rne(cute.arch.fmax(quo[i], -quo[i])), quo[i]) for i in range(16)]
        if const_expr(self.fp4_layout == "bits"):
            # each 32-bit word (8 codes) in the "bits" order (kernels/kv_cache.py BITS_POS)
            for h in cutlass.range_constexpr(2):
                w = Uint32(0)
                for e in cutlass.range_constexpr(8):
                    c = codes[8 * h + e]
                    w = w | ((c & Uint32(7)) << Uint32(BITS_POS[e][0])) | ((c >> Uint32(3)) << Uint32(BITS_POS[e][1]))
                w = w if ok else Uint32(0)
                for j in cutlass.range_constexpr(4):
                    pk[4 * h + j] = Uint8((w >> Uint32(8 * j)) & Uint32(255))
        for i in cutlass.range_constexpr(8):
            lo = codes[2 * i]
            hi = codes[2 * i + 1]
            if const_expr(self.fp4_layout == "nibble"):
                pk[i] = Uint8(lo | (hi << Uint32(4))) if ok else Uint8(0)
            if const_expr(self.with_dq):
                # decode exactly what was stored (codes 0 when !ok; scale NaN for a non-finite group)
                lo = lo if ok else Uint32(0)
                hi = hi if ok else Uint32(0)
                sf = s if finite else Float32(float("nan"))
                vals[2 * i] = _e2m1_value(lo) * sf
                vals[2 * i + 1] = _e2m1_value(hi) * sf
        sc[0] = Uint8(code) if finite else Uint8(0x7F)

    @cute.jit
    def rotate16(self, vals: cute.Tensor, tidx: Int32):
        """In place: this lane's 16 values of a row -> the same entries of hadamard_rotate(row) (fp32, before the
        rounding to the input dtype). Must be executed by every lane of the warp (full-mask shuffles)."""
        for s in cutlass.range_constexpr(4):  # strides 1, 2, 4, 8 inside the group, in registers
            st = 1 << s
            for i in cutlass.range_constexpr(16):
                if const_expr((i & st) == 0):
                    a = vals[i]
                    b = vals[i + st]
                    vals[i] = a + b
                    vals[i + st] = a - b
        for j in cutlass.range_constexpr((self.D // 16).bit_length() - 1):  # strides 16, 32, ...: partner group
            m = 1 << j  # g ^ m sits in lane ^ m
            sgn = Float32(-1.0) if (tidx & Int32(m)) != Int32(0) else Float32(1.0)
            for i in cutlass.range_constexpr(16):
                mine = vals[i]
                other = cute.arch.shuffle_sync_bfly(mine, offset=m)
                # lower lane: a + b (mine + partner); upper lane: a - b (partner - mine): both are
                # fma(sgn, mine, partner) -- sgn * mine is exact, so the one rounding is the add's / the sub's
                vals[i] = _fma(sgn, mine, other)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mQp: cute.Tensor, mQs: cute.Tensor,
               mKp: cute.Tensor, mKs: cute.Tensor, mVp: cute.Tensor, mVs: cute.Tensor, mKm: cute.Tensor,
               mKd: cute.Tensor, mVd: cute.Tensor, nQ: Int32, nK: Int32, nV: Int32):
        D = self.D
        G = D // 16
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        item = bidx * THREADS + tidx
        vals = cute.make_rmem_tensor((16,), Float32)
        raw = cute.make_rmem_tensor((16,), self.dtype)
        pk = cute.make_rmem_tensor((8,), Uint8)
        sc = cute.make_rmem_tensor((1,), Uint8)
        isqk = item < nQ + nK
        isq = item < nQ
        it = item if isq else item - nQ
        S = mQ.shape[1] if isq else mK.shape[1]
        H = mQ.shape[2] if isq else mK.shape[2]
        g = it % G
        r = it // G
        h = r % H
        r = r // H
        s = r % S
        b = r // S
        if isqk:
            if isq:
                cute.autovec_copy(cute.local_tile(mQ[b, s, h, None], (16,), (g,)), raw)
            if not isq:
                cute.autovec_copy(cute.local_tile(mK[b, s, h, None], (16,), (g,)), raw)
            vals.store(raw.load().to(Float32))
        if const_expr(self.rotate):
            if not isqk:  # V / past-the-end items: zeros through the shuffles (results unused)
                vals.fill(0.0)
            self.rotate16(vals, tidx)
            # * fp32(1/sqrt(D)), round to the input dtype (cvt.rn), back to fp32: quant.rotation's numerics
            raw.store((vals.load() * Float32(self.inv_sqrt_d)).to(self.dtype))
            vals.store(raw.load().to(Float32))
        if isqk:
            self.quant16(vals, pk, sc)
            if isq:
                cute.autovec_copy(pk, cute.local_tile(mQp[b, s, h, None], (8,), (g,)))
                mQs[b, s, h, g] = sc[0]
            if not isq:
                cute.autovec_copy(pk, cute.local_tile(mKp[b, s, h, None], (8,), (g,)))
                mKs[b, s, h, g] = sc[0]
                if const_expr(self.with_dq):
                    raw.store(vals.load().to(self.dtype))
                    cute.autovec_copy(raw, cute.local_tile(mKd[b, s, h, None], (16,), (g,)))
        if item >= nQ + nK and item < nQ + nK + nV:
            it = item - nQ - nK
            Skv = mK.shape[1]
            Hkv = mK.shape[2]
            nkb = cute.ceil_div(Skv, BLOCK)
            d = it % D
            r = it // D
            kb = r % nkb
            r = r // nkb
            h = r % Hkv
            b = r // Hkv
            key0 = kb * BLOCK
            n_valid = cutlass.min(Skv - key0, BLOCK)
            ksum = Float32(0.0)
            # the block's 32 code bytes and 4 scale bytes of channel d are contiguous in Vp / Vs: gathered here,
            # stored once (vector stores) instead of 36 scattered byte stores (lanes differ in d: one row each)
            pkv = cute.make_rmem_tensor((BLOCK // 2,), Uint8)
            scv = cute.make_rmem_tensor((BLOCK // 16,), Uint8)
            vraw = cute.make_rmem_tensor((16,), self.dtype)
            for grp in cutlass.range_constexpr(BLOCK // 16):
                # unconditional loads (keys past Skv clamped to the last one, in bounds), 16 issued before their
                # use: loads under the `key < Skv` branch would each wait out a memory latency (see q_mean); in
                # halves of 8 keys, which keeps the kernel at 72 registers (108 with all 32 at once)
                for half in cutlass.range_constexpr(2):
                    for j in cutlass.range_constexpr(8):
                        kc = cutlass.min(key0 + grp * 16 + half * 8 + j, Skv - 1)
                        vraw[j] = mV[b, kc, h, d]
                        raw[j] = mK[b, kc, h, d]
                    for j in cutlass.range_constexpr(8):
                        i = half * 8 + j
                        key = key0 + grp * 16 + i
                        vals[i] = Float32(0.0)
                        if key < Skv:
                            vals[i] = Float32(vraw[j])
                            ksum = _add_rn(ksum, Float32(raw[j]))
                if const_expr(self.with_dq):  # (no gathering here: the dq stores below keep vals live, and the
                    # 32 gathered bytes on top made ptxas spill)
                    self.quant16(vals, pk, sc)
                    for i in cutlass.range_constexpr(8):
                        mVp[b, h, d, kb * (BLOCK // 2) + grp * 8 + i] = pk[i]
                    mVs[b, h, d, kb * (BLOCK // 16) + grp] = sc[0]
                else:
                    self.quant16(vals, cute.local_tile(pkv, (8,), (grp,)), cute.local_tile(scv, (1,), (grp,)))
                if const_expr(self.with_dq):
                    # threads adjacent in d write adjacent 16-bit elements of one key row (coalesced)
                    for i in cutlass.range_constexpr(16):
                        key = key0 + grp * 16 + i
                        if key < Skv:
                            mVd[b, key, h, d] = vals[i].to(self.dtype)
            if const_expr(not self.with_dq):
                cute.autovec_copy(pkv, cute.local_tile(mVp[b, h, d, None], (BLOCK // 2,), (kb,)))
                cute.autovec_copy(scv, cute.local_tile(mVs[b, h, d, None], (BLOCK // 16,), (kb,)))
            mKm[b, kb, h, d] = _div_rn(ksum, Float32(n_valid))

    @cute.kernel
    def qmean_kernel(self, mQ: cute.Tensor, mQm: cute.Tensor, nQm: Int32):
        """with_qmean: one thread per Q-mean item (q_mean)."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        item = bidx * THREADS + tidx
        if item < nQm:
            self.q_mean(mQ, mQm, item)

    @cute.jit
    def q_mean(self, mQ: cute.Tensor, mQm: cute.Tensor, it: Int32):
        """Item it = ((b * nqb + qb) * Hq + h) * D + d: mQm[b, qb, h, d] = the block's token-order fp32 sum / its
        valid-token count. Threads adjacent in d read adjacent 16-bit elements of one query row (coalesced), and the
        Hq CTAs of a query block are adjacent in the launch, so together they read its 64 whole rows of Q."""
        Sq = mQ.shape[1]
        Hq = mQ.shape[2]
        nqb = cute.ceil_div(Sq, BLOCK)
        d = it % self.D
        r = it // self.D
        h = r % Hq
        r = r // Hq
        qb = r % nqb
        b = r // nqb
        s0 = qb * BLOCK
        last = Sq - 1
        acc = Float32(0.0)
        # The loads are unconditional (rows past Sq clamped to the last one, in bounds), written QM_BATCH at a time
        # before their adds: a load under the `s0 + i < Sq` branch is not hoisted by ptxas, so the 64 loads of a
        # thread would each wait out a full memory latency (the ~0.4 ms tail of RESULTS session 14; 0.13 ms now,
        # session 15). The adds keep the token order and skip the clamped rows, so the bits are unchanged. (In the
        # quantizing kernel's launch ptxas hoisted further than a batch: 114 registers there; here, its own: 32.)
        buf = cute.make_rmem_tensor((QM_BATCH,), self.dtype)
        for c in cutlass.range_constexpr(BLOCK // QM_BATCH):
            for i in cutlass.range_constexpr(QM_BATCH):
                buf[i] = mQ[b, cutlass.min(s0 + c * QM_BATCH + i, last), h, d]
            for i in cutlass.range_constexpr(QM_BATCH):
                if s0 + c * QM_BATCH + i < Sq:
                    acc = _add_rn(acc, Float32(buf[i]))
        mQm[b, qb, h, d] = _div_rn(acc, Float32(cutlass.min(Sq - s0, BLOCK)))


def fake_args(dtype, head_dim: int):
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    D = head_dim
    B, Sq, Skv, Hq, Hkv, nkb, nqb = (cute.sym_int() for _ in range(7))
    skp2, skp16 = cute.sym_int(divisibility=32), cute.sym_int(divisibility=4)

    def t(dt, shape, align=16):
        return make_fake_compact_tensor(dt, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)), assumed_align=align)

    u8 = cutlass.Uint8
    return (t(dtype, (B, Sq, Hq, D)), t(dtype, (B, Skv, Hkv, D)), t(dtype, (B, Skv, Hkv, D)),
            t(u8, (B, Sq, Hq, D // 2)), t(u8, (B, Sq, Hq, D // 16)),
            t(u8, (B, Skv, Hkv, D // 2)), t(u8, (B, Skv, Hkv, D // 16)),
            t(u8, (B, Hkv, D, skp2)), t(u8, (B, Hkv, D, skp16)),
            t(Float32, (B, nkb, Hkv, D)), t(dtype, (B, Skv, Hkv, D)), t(dtype, (B, Skv, Hkv, D)),
            t(Float32, (B, nqb, Hq, D)), make_fake_stream())


def compile_quant(dtype, head_dim: int, with_dq: bool = False, rotate: bool = False, scale_rule: str = "mse",
                  fp4_layout: str = "nibble", with_qmean: bool = False):
    kern = QuantKernel(dtype, head_dim, with_dq, rotate, scale_rule, fp4_layout, with_qmean)
    return cute.compile(kern, *fake_args(dtype, head_dim))
