"""ThriftPrefillKernel: the fused mixed-precision (FP4 + FP16) attention prefill, one CuTe DSL kernel.

One CTA = one 64-query block of one (batch, query head); grid (n_q_blocks, Hq, B), causal q-blocks
heaviest-first.  Per CTA:

  Phase 1 (FP4): for every causally visible key tile NOT selected for this query block (descending
      order, skipping the bits set in the selection bitmask), packed E2M1 K/V tiles + E4M3 scales go
      through a ``schedule.stages``-deep cp.async ring (tile j+1 loads while tile j computes).
      S = dq(Q) dq(K)^T (exact FP4 products, fp32 accumulation), online softmax in fp32 (exp2 with
      log2(e) folded into the scale), then P~ is quantized with the two-level scheme of the contract:
      s1 = rowmax_tile(P~)/2688, x = P~/s1, E4M3 scale per 16 keys (amax via quad shuffles; P always
      uses this amax rule -- the "mse" scale rule of Q, K, V is the quantizer's, quant/quant_kernel.py),
      E2M1 values; P' = e2m1*e4m3 (exact in 16 bit) feeds the MMA, and s1 is applied in fp32 by
      keeping the O accumulator in units of the last tile's s1 (``c``): acc <- acc*alpha*c_old/s1 + P'V'.
  Phase 2 (FP16): only if the CTA has selected tiles: the real fp16/bf16 Q is loaded now (over the
      decoded FP4 Q), then the selected key tiles in fp16/bf16 through a 2-stage cp.async ring that
      aliases the phase-1 buffers (see layouts/prefill.py for the byte map); the same m / l / acc
      registers continue (acc converted to true units once: acc *= c), one pass in either dtype.
  Softmax offset (both phases): P~ = 2^(S*scale*log2e - M) with M = ceil(running max * scale*log2e), an
      integer, as the reference defines it: the rescale factors are powers of two, which commute with the
      16-bit rounding of P~, so phase 2 rounds P~ against its running max to exactly the bits the final max
      gives (with the max itself as offset they would differ by ~1e-3 relative in bf16).
  Finalize: O = acc*c/l in the input dtype (through smem, coalesced stores), LSE = (M + log2 l) * ln 2.

Fully masked rows give O = 0 and LSE = -inf.  Keys past Skv inside a tile are masked (-inf), and the
16-bit V rows past Skv are zero-filled so 0*garbage never reaches the accumulator.

Shared memory byte map (D = head_dim, kv16 = 64*D*2 bytes; see layouts.prefill.PrefillSmemMap):
    [0, 64*D*2)                      sQ (decoded FP4 Q in phase 1, FP16 Q in phase 2, O in the epilogue)
    R = round_up(64*D*2, 1024):
      phase 1: R+0 kdec (decoded K, 16 bit) | R+kv16 vdec (decoded V^T) | R+2*kv16 + s*stage: FP4 stage s
               (kp 64xD/2, ks 64xD/16, vp Dx32, vs Dx4 bytes)
      phase 2: R + t*kv16: FP16 K stage t (t<2) | R + 2*kv16 + t*kv16: FP16 V stage t
    i.e. the phase-2 K stages overwrite kdec/vdec, the V stages overwrite the FP4 stages.

SM90 K/V source (default, FP4 memory traffic): packed FP4 stages decoded into the 16-bit kdec / vdec smem
tiles each tile (dq(Q) is decoded into sQ); each thread decodes 16 consecutive values, one E4M3 group, so a scale
is read and converted once per two code words. On the wgmma path phase 1 runs in fp16 whatever the input dtype
(p1_dtype: the decoded tiles, P' and the phase-1 wgmmas): dq(Q), dq(K), dq(V) and P' = E2M1 * E4M3 are exact in
fp16, and the fp16 decode is shorter than the bf16 one (no low-byte table, a 4-instruction scale conversion).
Where phase 1 decodes to fp16 the quantizer writes the code words in the "bits" order (fp4_word_layout; the decode
cache's layout, kernels/kv_cache.py BITS_POS): each fp16 pair is one shift and mask of the word (s<<15 | e1e0m<<9
is E2M1 * 2^-14, fp16 subnormals for e = 0) times the scale * 2^FP4_EXP, so dq(Q), dq(K), dq(V) land in smem
scaled by 2^(FP4_EXP-14) (exact, some fp16 subnormal) and the kernel folds S_FOLD into the softmax max / exp
argument and V_FOLD into the O scale c -- bit-identical to the unscaled decode, ~25% fewer decode instructions.
Opt-in experiment (schedule.kv_dq16, schedule m64_w4_s2_dq16): the quantizer also writes dq(K), dq(V)
[B,Skv,Hkv,D] in the input dtype (exact E2M1*E4M3 values), and phase 1 streams those through the phase-2 16-bit
stage ring (FP16 K/V stages t < 2 of the byte map): the same numbers without the ~530 decode instructions per
warp and tile that the ncu profile showed, at the price of 16-bit K/V traffic and an extra 16-bit K/V copy (see
profiling/RESULTS.md) -- it measures what the decode costs.
The SM120 path ignores kv_dq16 (its MMA reads the packed FP4 stages).

16-bit MMAs (schedule.mma).  "sync": mma.sync m16n8k16, each warp ldmatrix-loads its Q rows and the whole K / V^T
tile (the sm_120a FP16 phase, and any arch without wgmma).  "wgmma" (sm_90a: m64_wg_s2_f1, and the warp-specialized
kernels/prefill_ws.py schedules, the default there):
the 4 warps are one warpgroup and the 64-row block one m64 wgmma -- S = Q K^T is m64n64k16 with sQ and kdec / the
FP16 K stage read as shared-memory descriptors, O += P V is m64nDk16 with P in registers (the accumulator re-viewed
as A fragments) and B = vdec (K-major) or the FP16 V stage (MN-major view).  The 16-bit tiles then use the
canonical wgmma 128 B-swizzle atom (swizzle on the pointer), every generic-proxy write that a wgmma reads (the
decode's st.shared, completed cp.async) is followed by fence.proxy.async before the CTA barrier, and each wgmma
group is waited for before its accumulator is read (overlapping them with the decode measured no gain: the kernel
waits on ALU work, profiling/RESULTS.md "Session 5").  The C layout per warp equals mma.sync's (rows lane/4 and
lane/4 + 8 of the warp's 16), so softmax, P quantization, masking and the epilogue are shared through mn_view.
schedule.fp16_stages = 1 keeps a single FP16 K/V stage in phase 2 (no look-ahead; region = max(2*kv16 +
S*fp4_stage, 2*kv16): 66 KB at D=128), so that 3 CTAs share an SM (at <= 168 registers).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warp, warpgroup
import cutlass.utils.hopper_helpers as sm90_helpers

from kernels.arch_paths import (FP4_EXP, ceil_f32, e2m1_rne_x22, e4m3_rne_pair, ex2, lg2, make_arch_path,
                                pack_p_sat_scale)
from kernels.schedules import PrefillSchedule
from layouts.prefill import PrefillSmemMap, smem_tile_layout_16b, wgmma_tile_layout_16b
from layouts.sm120_fp4 import swizzle_bits as sm120_swizzle_bits
from kernels.fp4_mma_sm120 import QFragments

LOG2E = math.log2(math.e)
P_SCALE_MAX = 448.0 * 6.0  # two-level P: s1 = rowmax / (448*6)
# A tile whose largest P~ (relative to the running offset 2^M, M >= max) is below 2^-60 contributes < 64*2^-60 of
# the row sum: its FP4 numerator is dropped (keeps acc = O/c bounded in fp32).
P_TILE_MIN = 2.0 ** -60
# "bits" word layout (SM90 fp16 decode path, see fp4_word_layout): decoded dq(.) * 2^(FP4_EXP - 14); folded back in fp32
V_FOLD = float(2 ** (14 - FP4_EXP))      # on the O accumulator (dq(V))
S_FOLD = float(2 ** (2 * (14 - FP4_EXP)))  # on S = dq(Q) dq(K)^T


def fp4_word_layout(schedule: PrefillSchedule, arch: int, is_bf16: bool) -> str:
    """Bit order of the packed Q/K/V code words the prefill kernel reads, which the quantizer must write
    (kernels/interface.py asks here): "bits" (kernels/kv_cache.py BITS_POS) where phase 1 decodes to fp16 (the SM90
    decode path: wgmma, or mma.sync with fp16 inputs; one shift + mask per fp16 pair instead of table lookups),
    else the contract's "nibble" (the sm_120a block-scaled MMA reads the codes as they are; the bf16 decode and the
    dq16 experiment keep it)."""
    if arch in (120, 121) or schedule.uses_dq16(arch):
        return "nibble"
    if schedule.uses_wgmma(arch) or not is_bf16:
        return "bits"
    return "nibble"


class ThriftPrefillKernel:
    """Static configuration of one compiled prefill kernel (see module docstring)."""

    # kernels/prefill_ws.py: a producer warpgroup decodes phase 1's FP4 tiles into a staged 16-bit ring (the step
    # then neither decodes nor syncs the CTA, and reads ring stage `stage`)
    ws = False

    def __init__(self, dtype, head_dim: int, causal: bool, schedule: PrefillSchedule, arch: int,
                 fmt: str = "nvfp4", has_lse: bool = True):
        if dtype not in (cutlass.Float16, cutlass.BFloat16):
            raise TypeError(f"dtype: expected Float16 or BFloat16, got {dtype}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim: expected 64 or 128, got {head_dim}")
        if fmt != "nvfp4":
            raise ValueError(f"fmt: the CuTe kernel implements 'nvfp4' only, got {fmt!r}")
        self.dtype = dtype
        self.is_bf16 = dtype is cutlass.BFloat16
        self.D = head_dim
        self.causal = causal
        self.sch = schedule
        self.arch = arch
        self.fmt = fmt
        self.has_lse = has_lse
        self.Tm = schedule.tile_m
        self.Tn = schedule.tile_n
        self.S = schedule.stages
        self.nthr = schedule.num_threads
        self.smap = PrefillSmemMap(head_dim, self.Tm, self.Tn, self.S, fp16_stages=schedule.fp16_stages)
        self.path = make_arch_path(arch, head_dim)
        # SM90: phase 1 streams dq(K)/dq(V) (16 bit, written by the quantizer) instead of decoding FP4 stages
        self.dq16 = schedule.uses_dq16(arch) and self.path.needs_decode
        # sm_90a, schedule.mma == "wgmma": the 16-bit MMAs are warpgroup MMAs (one warpgroup = the 64-row block)
        self.wg = schedule.uses_wgmma(arch) and not self.path.block_scaled
        # 16-bit type of the FP4 phase's decoded tiles, P' and MMAs on the wgmma decode path: fp16 for either input
        # dtype -- dq(Q), dq(K), dq(V) and P' = E2M1 * E4M3 are exact in fp16 (|x| in [2^-10, 2688]) -- because the
        # fp16 decode is cheaper (no low-byte lookups, a shorter scale conversion). Phase 2 stays in the input dtype.
        self.p1_dtype = cutlass.Float16 if (self.wg and self.path.needs_decode and not self.dq16) else dtype
        self.p1_bf16 = self.p1_dtype is cutlass.BFloat16
        # phase 1 decodes "bits" code words (fp16 only): dq(Q), dq(K), dq(V) land scaled by 2^(FP4_EXP - 14)
        self.bits = fp4_word_layout(schedule, arch, self.is_bf16) == "bits"
        if self.bits and (self.p1_bf16 or not self.path.needs_decode):
            raise AssertionError("fp4_word_layout 'bits' needs the fp16 decode path")

    # ------------------------------------------------------------------------------------------
    # host side
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mQp: cute.Tensor, mQs: cute.Tensor, mKp: cute.Tensor, mKs: cute.Tensor,
                 mVp: cute.Tensor, mVs: cute.Tensor, mMask: cute.Tensor, mSel: cute.Tensor,
                 mO: cute.Tensor, mLSE: cute.Tensor, mKd: cute.Tensor, mVd: cute.Tensor,
                 softmax_scale_log2: Float32, qhead_per_kv: Int32, stream):
        """Q/K/V/O [B,S,H,D] 16-bit; Qp/Kp [B,S,H,D/2] u8, Qs/Ks [B,S,H,D/16] u8 (E4M3 bits);
        Vp [B,Hkv,D,Skv_pad/2] u8, Vs [B,Hkv,D,Skv_pad/16] u8; mMask [B,Hq,nqb,nwords] i32 selection
        bitmask; mSel [B,Hq,nqb,k] i32 selected key blocks (-1 padded); mLSE [B,Hq,Sq] f32;
        mKd/mVd [B,Skv,Hkv,D] 16-bit dq(K)/dq(V) (read only by the SM90 dq16 schedules; else any such tensor)."""
        D, Tm, Tn, T = self.D, self.Tm, self.Tn, self.nthr
        dt = self.dtype
        # 16-bit tiles: 128B-swizzled K-major (wgmma: the canonical wgmma atom, read by the MMA descriptors)
        tile16 = smem_tile_layout_16b
        if const_expr(self.wg):
            def tile16(r, c):
                return wgmma_tile_layout_16b(dt, r, c)
        sQ_layout = tile16(Tm, D)
        sKV_layout = tile16(Tn, D)
        sVt_layout = tile16(D, Tn)  # decoded V^T (keys contiguous)

        h = self.copies_and_mmas()
        nqb = cute.ceil_div(mQ.shape[1], Tm)
        grid = (nqb, cute.size(mQ.shape[2]), cute.size(mQ.shape[0]))
        self.kernel(mQ, mK, mV, mQp, mQs, mKp, mKs, mVp, mVs, mMask, mSel, mO, mLSE, mKd, mVd,
                    softmax_scale_log2, qhead_per_kv,
                    sQ_layout, sKV_layout, sVt_layout,
                    h.copy_kv16, h.copy_kp, h.copy_ks, h.copy_vp, h.copy_vs, h.copy_rows16, h.copy_dec16, h.copy_vt16,
                    h.tiled_mma, h.mma_qk, h.mma_qk1, h.mma_pvk, h.mma_pvmn).launch(
                        grid=grid, block=[T, 1, 1], smem=self.smap.total_bytes, stream=stream,
                        min_blocks_per_mp=self.sch.min_ctas,
                        preferred_smem_carveout=100 if self.sch.min_ctas > 1 else None)  # (None queries the GPU)

    def copies_and_mmas(self) -> SimpleNamespace:
        """The gmem <-> smem tiled copies (for one 128-thread warpgroup) and the tiled MMAs; traced inside the
        host-side @cute.jit."""
        D, Tm, Tn, T = self.D, self.Tm, self.Tn, self.nthr
        dt = self.dtype
        # --- gmem -> smem copies -------------------------------------------------------------
        def tv(atom, rows_per_pass_threads, cols_threads, vals):
            return cute.make_tiled_copy_tv(
                atom, cute.make_layout((rows_per_pass_threads, cols_threads), stride=(cols_threads, 1)),
                cute.make_layout((1, vals)))

        atom16 = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt,
                                     num_bits_per_copy=128)
        ct = D // 8  # 16-byte chunks per 16-bit row
        copy_kv16 = tv(atom16, T // ct, ct, 8)
        # FP4 stage pieces (uint8): kp rows D/2 bytes, ks rows D/16, vp rows Tn/2 = 32, vs rows Tn/16 = 4
        atom_b16 = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                       cutlass.Uint8, num_bits_per_copy=128)
        ck = (D // 2) // 16
        copy_kp = tv(atom_b16, T // ck, ck, 16)
        ks_row = D // 16
        atom_ks = cute.make_copy_atom(cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=ks_row * 8)
        copy_ks = tv(atom_ks, Tn, 1, ks_row)  # Tn threads (guarded)
        cv = (Tn // 2) // 16
        copy_vp = tv(atom_b16, T // cv, cv, 16)
        atom_vs = cute.make_copy_atom(cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=(Tn // 16) * 8)
        copy_vs = tv(atom_vs, D, 1, Tn // 16)  # D threads (guarded)
        # 16-bit register -> smem (decode output) and smem -> gmem (O) 16-byte copies
        atom_st = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dt, num_bits_per_copy=128)
        copy_rows16 = tv(atom_st, T // ct, ct, 8)  # (.., D) tiles: the epilogue's O
        # FP4 decode outputs: 16 consecutive values (one E4M3 scale group) per thread, two 16-byte stores
        atom_dec = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.p1_dtype, num_bits_per_copy=128)
        copy_dec16 = tv(atom_dec, T // (ct // 2), ct // 2, 16)  # decoded Q / K: (rows, D) tiles
        copy_vt16 = tv(atom_dec, T // (Tn // 16), Tn // 16, 16)  # decoded V^T: (D, Tn) tiles

        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(dt, Float32, (16, 8, 16)),
            (self.sch.num_warps, 1, 1),
            permutation_mnk=(self.sch.num_warps * 16, 16, 16),
        )
        # wgmma (one warpgroup, M = 64 = Tm): S = Q K^T with Q and K both K-major in smem; O += P V with P from
        # registers and B = decoded V^T (D x Tn, keys contiguous: K-major) or a 16-bit V tile (Tn x D: MN-major)
        mma_qk = mma_qk1 = mma_pvk = mma_pvmn = tiled_mma
        if const_expr(self.wg):
            K, MN = OperandMajorMode.K, OperandMajorMode.MN
            p1 = self.p1_dtype
            mma_qk = sm90_helpers.make_trivial_tiled_mma(dt, dt, K, K, Float32, (1, 1, 1), (Tm, Tn))
            # phase 1 (FP4 decoded): S = dq(Q) dq(K)^T and O += P' dq(V) in p1_dtype
            mma_qk1 = mma_qk if p1 is dt else sm90_helpers.make_trivial_tiled_mma(p1, p1, K, K, Float32, (1, 1, 1),
                                                                                   (Tm, Tn))
            mma_pvk = sm90_helpers.make_trivial_tiled_mma(p1, p1, K, K, Float32, (1, 1, 1), (Tm, D),
                                                          a_source=warpgroup.OperandSource.RMEM)
            mma_pvmn = sm90_helpers.make_trivial_tiled_mma(dt, dt, K, MN, Float32, (1, 1, 1), (Tm, D),
                                                           a_source=warpgroup.OperandSource.RMEM)

        return SimpleNamespace(copy_kv16=copy_kv16, copy_kp=copy_kp, copy_ks=copy_ks, copy_vp=copy_vp,
                               copy_vs=copy_vs, copy_rows16=copy_rows16, copy_dec16=copy_dec16,
                               copy_vt16=copy_vt16, tiled_mma=tiled_mma, mma_qk=mma_qk, mma_qk1=mma_qk1,
                               mma_pvk=mma_pvk, mma_pvmn=mma_pvmn)

    # ------------------------------------------------------------------------------------------
    # device side
    # ------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mQp: cute.Tensor, mQs: cute.Tensor, mKp: cute.Tensor, mKs: cute.Tensor,
               mVp: cute.Tensor, mVs: cute.Tensor, mMask: cute.Tensor, mSel: cute.Tensor,
               mO: cute.Tensor, mLSE: cute.Tensor, mKd: cute.Tensor, mVd: cute.Tensor,
               softmax_scale_log2: Float32, qhead_per_kv: Int32,
               sQ_layout: cute.ComposedLayout, sKV_layout: cute.ComposedLayout, sVt_layout: cute.ComposedLayout,
               copy_kv16: cute.TiledCopy, copy_kp: cute.TiledCopy, copy_ks: cute.TiledCopy,
               copy_vp: cute.TiledCopy, copy_vs: cute.TiledCopy, copy_rows16: cute.TiledCopy,
               copy_dec16: cute.TiledCopy, copy_vt16: cute.TiledCopy, tiled_mma: cute.TiledMma, mma_qk: cute.TiledMma,
               mma_qk1: cute.TiledMma, mma_pvk: cute.TiledMma, mma_pvmn: cute.TiledMma):
        D, Tm, Tn, S = self.D, self.Tm, self.Tn, self.S
        dt = self.dtype
        sm = self.smap
        tidx, _, _ = cute.arch.thread_idx()
        bx, hq, b = cute.arch.block_idx()
        Sq = mQ.shape[1]
        Skv = mK.shape[1]
        nqb = cute.ceil_div(Sq, Tm)
        nkb = cute.ceil_div(Skv, Tn)
        m_block = bx
        if const_expr(self.causal):
            m_block = nqb - 1 - bx  # heaviest (longest causal row) first
        hkv = hq // qhead_per_kv
        n_block_max = self.visible_tiles(m_block, Sq, Skv)

        # ---------------- shared memory ----------------
        smem = cutlass.utils.SmemAllocator()
        base = smem.allocate(sm.total_bytes, 1024)

        def pu8(off):
            return cute.recast_ptr(base + off, dtype=cutlass.Uint8)

        def t16(off, layout, ty=dt):
            if const_expr(self.wg):  # wgmma descriptors need the swizzle on the pointer, an affine layout
                return cute.make_tensor(cute.recast_ptr(base + off, layout.inner, dtype=ty), layout.outer)
            return cute.make_tensor(cute.recast_ptr(base + off, dtype=ty), layout)

        sQ = t16(0, sQ_layout)
        sKdec = t16(sm.kdec_off, sKV_layout)
        sVdec = t16(sm.vdec_off, sVt_layout)  # (D, Tn)
        # the same bytes typed as phase 1's decode output (p1_dtype; the 16-bit layouts do not depend on the type).
        # The (unused on the wgmma path) mma.sync partitions below keep the input-dtype views.
        p1 = self.p1_dtype
        sQ1, sKdec1, sVdec1 = sQ, sKdec, sVdec
        if const_expr(p1 is not dt):
            sQ1 = t16(0, sQ_layout, p1)
            sKdec1 = t16(sm.kdec_off, sKV_layout, p1)
            sVdec1 = t16(sm.vdec_off, sVt_layout, p1)
        # phase-2 stages: K stages contiguous, V stages contiguous (stage mode last).  With one stage the
        # stage-1 views alias stage 0 (traced, never taken: the stage index stays 0)
        nf = self.sch.fp16_stages
        sK16 = [t16(sm.fp16_k_off(min(t, nf - 1)), sKV_layout) for t in range(2)]
        sV16 = [t16(sm.fp16_v_off(min(t, nf - 1)), sKV_layout) for t in range(2)]
        # FP4 stages (uint8, row-major), stage mode last
        st = sm.fp4_stage
        fp4_base = sm.region_off + 2 * sm.kv16
        sKp = cute.make_tensor(pu8(fp4_base + sm.kp_off), cute.make_layout((Tn, D // 2, S), stride=(D // 2, 1, st)))
        sKf = None
        sVf = None
        if const_expr(self.path.block_scaled):
            # SM120: the helper's swizzled byte rows (Swizzle<B,4,3>) + FP4 views (Swizzle<B,5,3>, nibbles);
            # stage offsets are multiples of 1024 B, untouched by the swizzle
            bk = sm120_swizzle_bits(D // 2)
            bv = sm120_swizzle_bits(Tn // 2)
            f4 = cutlass.Float4E2M1FN
            sKp = cute.make_tensor(pu8(fp4_base + sm.kp_off), cute.make_composed_layout(
                cute.make_swizzle(bk, 4, 3), 0, cute.make_layout((Tn, D // 2, S), stride=(D // 2, 1, st))))
            sKf = cute.make_tensor(cute.recast_ptr(base + fp4_base + sm.kp_off, dtype=f4), cute.make_composed_layout(
                cute.make_swizzle(bk, 5, 3), 0, cute.make_layout((Tn, D, S), stride=(D, 1, 2 * st))))
            sVf = cute.make_tensor(cute.recast_ptr(base + fp4_base + sm.vp_off, dtype=f4), cute.make_composed_layout(
                cute.make_swizzle(bv, 5, 3), 0, cute.make_layout((D, Tn, S), stride=(Tn, 1, 2 * st))))
        sKs = cute.make_tensor(pu8(fp4_base + sm.ks_off), cute.make_layout((Tn, D // 16, S), stride=(D // 16, 1, st)))
        sVp = cute.make_tensor(pu8(fp4_base + sm.vp_off), cute.make_layout((D, Tn // 2, S), stride=(Tn // 2, 1, st)))
        if const_expr(self.path.block_scaled):
            sVp = cute.make_tensor(pu8(fp4_base + sm.vp_off), cute.make_composed_layout(
                cute.make_swizzle(sm120_swizzle_bits(Tn // 2), 4, 3), 0,
                cute.make_layout((D, Tn // 2, S), stride=(Tn // 2, 1, st))))
        sVs = cute.make_tensor(pu8(fp4_base + sm.vs_off), cute.make_layout((D, Tn // 16, S), stride=(Tn // 16, 1, st)))
        sKp32 = cute.make_tensor(cute.recast_ptr(base + fp4_base + sm.kp_off, dtype=Uint32),
                                 cute.make_layout((Tn, D // 8, S), stride=(D // 8, 1, st // 4)))
        sVp32 = cute.make_tensor(cute.recast_ptr(base + fp4_base + sm.vp_off, dtype=Uint32),
                                 cute.make_layout((D, Tn // 8, S), stride=(Tn // 8, 1, st // 4)))

        # ---------------- MMA partitions ----------------
        thr_mma = tiled_mma.get_slice(tidx)
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sKdec))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVdec))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((Tm, D)), Float32)
        acc_O.fill(0.0)

        ld_q = cute.make_tiled_copy_A(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(False, 4), dt), tiled_mma)
        ld_k = cute.make_tiled_copy_B(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(False, 4), dt), tiled_mma)
        ld_vt = cute.make_tiled_copy_B(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(True, 4), dt), tiled_mma)
        thr_ld_q = ld_q.get_slice(tidx)
        thr_ld_k = ld_k.get_slice(tidx)
        thr_ld_vt = ld_vt.get_slice(tidx)
        tSsQ = thr_ld_q.partition_S(sQ)
        tSrQ_v = thr_ld_q.retile(tSrQ)
        tSrK_v = thr_ld_k.retile(tSrK)
        tOrVt_kv = thr_ld_k.retile(tOrVt)   # decoded V^T: non-transposed ldmatrix
        tOrVt_v = thr_ld_vt.retile(tOrVt)   # 16-bit V (keys x D): transposed ldmatrix
        tSsKdec = thr_ld_k.partition_S(sKdec)
        tOsVdec = thr_ld_k.partition_S(sVdec)

        def vt_view(sV):
            return cute.composition(sV, cute.make_layout((D, Tn), stride=(Tn, 1)))

        tSsK16 = [thr_ld_k.partition_S(sK16[t]) for t in range(2)]
        tOsV16 = [thr_ld_vt.partition_S(vt_view(sV16[t])) for t in range(2)]

        # wgmma: operands are smem descriptors (K/Q/V never pass through registers); S and O partitions follow the
        # warpgroup C layout ((2, 2, N/8), 1, 1) -- per warp the same rows/columns as the m16n8 layout above
        thr_mma_s = thr_mma
        tiled_mma_o = tiled_mma
        wg_q = wg_q1 = wg_kdec = wg_vdec = None
        wg_k16 = wg_v16 = None
        if const_expr(self.wg):
            thr_mma_s = mma_qk.get_slice(tidx)
            thr_mma_s1 = mma_qk1.get_slice(tidx)
            thr_pvk = mma_pvk.get_slice(tidx)
            thr_pvmn = mma_pvmn.get_slice(tidx)
            tiled_mma_o = mma_pvk
            acc_O = cute.make_rmem_tensor(thr_pvk.partition_shape_C((Tm, D)), Float32)
            acc_O.fill(0.0)
            wg_q = thr_mma_s.make_fragment_A(thr_mma_s.partition_A(sQ))
            wg_q1 = thr_mma_s1.make_fragment_A(thr_mma_s1.partition_A(sQ1))
            wg_kdec = thr_mma_s1.make_fragment_B(thr_mma_s1.partition_B(sKdec1))
            wg_k16 = [thr_mma_s.make_fragment_B(thr_mma_s.partition_B(sK16[t])) for t in range(2)]
            wg_vdec = thr_pvk.make_fragment_B(thr_pvk.partition_B(sVdec1))
            wg_v16 = [thr_pvmn.make_fragment_B(thr_pvmn.partition_B(vt_view(sV16[t]))) for t in range(2)]

        # row state: 2 rows per thread (m16n8 / wgmma C layout: rows lane/4 and lane/4 + 8 of the warp's 16)
        n_rows = cute.size(self.mn_view(acc_O), mode=[0])
        row_max = cute.make_rmem_tensor((n_rows,), Float32)
        row_sum = cute.make_rmem_tensor((n_rows,), Float32)
        row_c = cute.make_rmem_tensor((n_rows,), Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)
        row_c.fill(1.0)

        # identity coords of the S tile (query row, key) for masking
        mcS = cute.make_identity_tensor((Sq, Skv))

        mask_row = mMask[b, hq, m_block, None]
        sel_row = mSel[b, hq, m_block, None]

        # SM120: packed FP4 Q (+ scales) -> smem (in the sQ area) -> A fragments in registers, once per CTA
        qf_frag = None
        qf_sf = None
        if const_expr(self.path.block_scaled):
            tile = self.path.tile
            qs_off = (Tm * D // 2 + 127) // 128 * 128
            sQb = cute.make_tensor(pu8(0), cute.make_composed_layout(
                cute.make_swizzle(sm120_swizzle_bits(D // 2), 4, 3), 0, cute.make_layout((Tm, D // 2), stride=(D // 2, 1))))
            sQf = cute.make_tensor(cute.recast_ptr(base, dtype=cutlass.Float4E2M1FN), cute.make_composed_layout(
                cute.make_swizzle(sm120_swizzle_bits(D // 2), 5, 3), 0, cute.make_layout((Tm, D), stride=(D, 1))))
            sQs = cute.make_tensor(pu8(qs_off), cute.make_layout((Tm, D // 16), stride=(D // 16, 1)))
            thr_q = copy_kp.get_slice(tidx)
            tQg = thr_q.partition_S(cute.local_tile(mQp[b, None, hq, None], (Tm, D // 2), (m_block, 0)))
            tQs = thr_q.partition_D(sQb)
            tQc = thr_q.partition_S(cute.make_identity_tensor((Tm, D // 2)))
            for m in cutlass.range_constexpr(cute.size(tQs, mode=[1])):
                okq = m_block * Tm + tQc[0, m, 0][0] < Sq
                if okq:
                    cute.copy(copy_kp, tQg[None, m, None], tQs[None, m, None])
                if not okq:
                    tQs[None, m, None].fill(0)
            if tidx < Tm:
                thr_qs = copy_ks.get_slice(tidx)
                tQsg = thr_qs.partition_S(cute.local_tile(mQs[b, None, hq, None], (Tm, D // 16), (m_block, 0)))
                tQss = thr_qs.partition_D(sQs)
                oks = m_block * Tm + tidx < Sq
                if oks:
                    cute.copy(copy_ks, tQsg, tQss)
                if not oks:
                    tQss.fill(0)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.barrier()
            qf = tile.load_q(sQf, sQs, tidx)
            qf_frag = qf.frag  # tensors only in ctx (the tracer can carry tensors, not helper objects)
            qf_sf = qf.sf

        # ---------------- gmem -> smem partitions (all at top level; indexed by tile inside) ----------------
        thr_kp = copy_kp.get_slice(tidx)
        thr_ks = copy_ks.get_slice(tidx)
        thr_vp = copy_vp.get_slice(tidx)
        thr_vs = copy_vs.get_slice(tidx)
        thr_16 = copy_kv16.get_slice(tidx)
        gKp = cute.local_tile(mKp[b, None, hkv, None], (Tn, D // 2), (None, 0))
        gKs = cute.local_tile(mKs[b, None, hkv, None], (Tn, D // 16), (None, 0))
        gVp = cute.local_tile(mVp[b, hkv, None, None], (D, Tn // 2), (0, None))
        gVs = cute.local_tile(mVs[b, hkv, None, None], (D, Tn // 16), (0, None))
        gK16 = cute.local_tile(mK[b, None, hkv, None], (Tn, D), (None, 0))
        gV16 = cute.local_tile(mV[b, None, hkv, None], (Tn, D), (None, 0))
        gQ16 = cute.local_tile(mQ[b, None, hq, None], (Tm, D), (m_block, 0))
        gKd = cute.local_tile(mKd[b, None, hkv, None], (Tn, D), (None, 0))
        gVd = cute.local_tile(mVd[b, None, hkv, None], (Tn, D), (None, 0))

        def mkg():
                return SimpleNamespace(
                tKp_g=thr_kp.partition_S(gKp), tKp_s=thr_kp.partition_D(sKp),
                tKp_c=thr_kp.partition_S(cute.make_identity_tensor((Tn, D // 2))),
                tKs_g=thr_ks.partition_S(gKs), tKs_s=thr_ks.partition_D(sKs),
                tVp_g=thr_vp.partition_S(gVp), tVp_s=thr_vp.partition_D(sVp),
                tVs_g=thr_vs.partition_S(gVs), tVs_s=thr_vs.partition_D(sVs),
                tK16_g=thr_16.partition_S(gK16), tK16_s=[thr_16.partition_D(sK16[t]) for t in range(2)],
                tV16_g=thr_16.partition_S(gV16), tV16_s=[thr_16.partition_D(sV16[t]) for t in range(2)],
                tQ16_g=thr_16.partition_S(gQ16), tQ16_s=thr_16.partition_D(sQ),
                tKd_g=thr_16.partition_S(gKd), tVd_g=thr_16.partition_S(gVd),
                t16_c=thr_16.partition_S(cute.make_identity_tensor((Tn, D))),
            )

        def mkctx():
                return SimpleNamespace(
                g=mkg(), tidx=tidx, bar_id=None, b=b, hq=hq, hkv=hkv, m_block=m_block, Sq=Sq, Skv=Skv, nkb=nkb,
                n_block_max=n_block_max, sl2=softmax_scale_log2, mask_row=mask_row,
                mK=mK, mV=mV, mKp=mKp, mKs=mKs, mVp=mVp, mVs=mVs, mcS=mcS,
                sKf=sKf, sVf=sVf, qf_frag=qf_frag, qf_sf=qf_sf,
                sKp=sKp, sKs=sKs, sVp=sVp, sVs=sVs, sKp32=sKp32, sVp32=sVp32, sKdec1=sKdec1, sVdec1=sVdec1,
                sK16=sK16, sV16=sV16, copy_kv16=copy_kv16, copy_kp=copy_kp, copy_ks=copy_ks,
                copy_vp=copy_vp, copy_vs=copy_vs, copy_rows16=copy_rows16, copy_dec16=copy_dec16, copy_vt16=copy_vt16,
                tiled_mma=tiled_mma, thr_mma=thr_mma, thr_mma_s=thr_mma_s, tiled_mma_o=tiled_mma_o,
                mma_qk=mma_qk, mma_qk1=mma_qk1, mma_pvk=mma_pvk, mma_pvmn=mma_pvmn, wg_q=wg_q, wg_q1=wg_q1,
                wg_kdec=wg_kdec, wg_vdec=wg_vdec,
                wg_k16=wg_k16, wg_v16=wg_v16, tSrQ=tSrQ, tSrK=tSrK, tOrVt=tOrVt, acc_O=acc_O,
                ld_q=ld_q, ld_k=ld_k, ld_vt=ld_vt, tSsQ=tSsQ, tSrQ_v=tSrQ_v, tSrK_v=tSrK_v,
                tOrVt_kv=tOrVt_kv, tOrVt_v=tOrVt_v, tSsKdec=tSsKdec, tOsVdec=tOsVdec,
                tSsK16=tSsK16, tOsV16=tOsV16, row_max=row_max, row_sum=row_sum, row_c=row_c,
            )

        ctx = mkctx()

        # ======================= phase 1: FP4 over the unselected tiles =======================
        # decoded FP4 Q -> sQ (exact 16-bit values of dq(Q))
        if const_expr(not self.path.block_scaled):
            # decoded FP4 Q -> sQ (exact 16-bit values of dq(Q); times 2^(FP4_EXP-14) for "bits")
            gQp32 = cute.local_tile(cute.recast_tensor(mQp[b, None, hq, None], Uint32), (Tm, D // 8), (m_block, 0))
            gQs = cute.local_tile(mQs[b, None, hq, None], (Tm, D // 16), (m_block, 0))
            self.path.decode_rows(sQ1, copy_dec16, tidx, gQp32, gQs, Sq - m_block * Tm, self.p1_bf16, self.bits)
            self.to_async_proxy()
        if const_expr(self.dq16):
            # dq16: dq(K)/dq(V) tiles through the 2-stage 16-bit ring of phase 2 (load j+1 while j computes)
            n_cur, wi_cur, w_cur = self.next_unselected_cached(mask_row, n_block_max, Int32(-1), Uint32(0))
            if n_cur >= 0:
                self.load_kv16_tile(ctx, n_cur, 0, True, True)
            cute.arch.cp_async_commit_group()
            j1 = Int32(0)
            while n_cur >= 0:
                cute.arch.cp_async_wait_group(0)
                self.to_async_proxy()
                cute.arch.barrier()  # tile j landed for all threads; stage 1-j (tile j-1) is free
                n_next, wi_cur, w_cur = self.next_unselected_cached(mask_row, n_cur, wi_cur, w_cur)
                if n_next >= 0:
                    self.load_kv16_tile(ctx, n_next, 1 - j1, True, True)
                cute.arch.cp_async_commit_group()
                if const_expr(self.sch.mask_split):
                    need = self.tile_needs_mask(ctx, n_cur)
                    if need:
                        self.step(ctx, n_cur, j1, 1, True)
                    if not need:
                        self.step(ctx, n_cur, j1, 1, False)
                else:
                    self.step(ctx, n_cur, j1, 1, True)
                n_cur = n_next
                j1 = 1 - j1
            cute.arch.cp_async_wait_group(0)
        if const_expr(not self.dq16):  # packed FP4 stages, decoded (SM90) or read by the FP4 MMA (SM120)
            # two cursors over the bitmask row, each with its cached word: n_issue (tiles being loaded, S - 1 ahead)
            # and n_cur (the tile computed)
            wi_cur, w_cur = Int32(-1), Uint32(0)
            n_cur, wi_cur, w_cur = self.next_unselected_cached(mask_row, n_block_max, wi_cur, w_cur)
            n_issue, wi_iss, w_iss = n_cur, wi_cur, w_cur
            for s in cutlass.range_constexpr(S - 1):
                if n_issue >= 0:
                    self.load_fp4_tile(ctx, n_issue, s)
                cute.arch.cp_async_commit_group()
                n_issue, wi_iss, w_iss = self.next_unselected_cached(mask_row, n_issue, wi_iss, w_iss)
            stage = Int32(0)
            while n_cur >= 0:
                cute.arch.cp_async_wait_group(S - 2)
                self.to_async_proxy()
                cute.arch.barrier()
                st_load = stage + (S - 1)
                if st_load >= S:
                    st_load = st_load - S
                if n_issue >= 0:
                    self.load_fp4_tile(ctx, n_issue, st_load)
                cute.arch.cp_async_commit_group()
                n_issue, wi_iss, w_iss = self.next_unselected_cached(mask_row, n_issue, wi_iss, w_iss)
                if const_expr(self.sch.mask_split):
                    need = self.tile_needs_mask(ctx, n_cur)
                    if need:
                        self.step(ctx, n_cur, stage, 1, True)
                    if not need:
                        self.step(ctx, n_cur, stage, 1, False)
                else:
                    self.step(ctx, n_cur, stage, 1, True)
                n_cur, wi_cur, w_cur = self.next_unselected_cached(mask_row, n_cur, wi_cur, w_cur)
                stage = stage + 1
                if stage == S:
                    stage = Int32(0)
            cute.arch.cp_async_wait_group(0)

        # ======================= phase 2: FP16 over the selected tiles =======================
        ctx = mkctx()
        ctx_pass = mkctx()  # fresh for the pass (closures cannot run inside staged regions)
        self.phase2(ctx, ctx_pass, sel_row, cute.size(mSel.shape[3]), n_block_max, n_rows)

        # ======================= finalize =======================
        ctx = mkctx()
        self.epilogue(ctx, mO, mLSE, sQ)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def phase2(self, ctx, ctx_pass, sel_row: cute.Tensor, n_sel: Int32, n_block_max: Int32,
               n_rows: cutlass.Constexpr):
        """Phase 2: the FP16 pass over this query block's selected key tiles (none: nothing is touched).
        ctx_pass: a fresh context for the pass (closures cannot run inside staged regions). (The warp-specialized
        kernel streams its phase 2 through the producer's ring instead: kernels/prefill_ws.py.)"""
        Tm = self.Tm
        k_sel = Int32(0)
        for i in range(n_sel):
            nsel = sel_row[i]
            if nsel >= 0 and nsel < n_block_max:
                k_sel = k_sel + 1
        if k_sel > 0:
            # acc from units of c (last FP4 tile's s1) to true units; phase 2 keeps c = 1
            acc_mn = self.mn_view(ctx.acc_O)
            for r in cutlass.range_constexpr(n_rows):
                acc_mn[r, None] = acc_mn[r, None].load() * ctx.row_c[r]
                ctx.row_c[r] = 1.0
            self.sync(ctx)  # every warp is done with sQ / the phase-1 buffers
            # one pass in either dtype: P~ = 2^(S*sl2 - M) with M = ceil(running max * sl2) an integer (step), so
            # rounding P~ to 16 bit against the running max gives the bits the final max gives (the reference)
            ctx = ctx_pass
            # real 16-bit Q over the decoded one (same cp.async group as the first K tile)
            self.load_rows16(ctx, ctx.g.tQ16_g, ctx.g.tQ16_s, ctx.m_block * Tm, ctx.Sq)
            n0 = self.sel_at(sel_row, 0, n_block_max)
            if n0 >= 0:
                self.load_kv16_tile(ctx, n0, 0)
            cute.arch.cp_async_commit_group()
            j = Int32(0)
            for i in range(n_sel):
                n_i = self.sel_at(sel_row, i, n_block_max)
                if n_i >= 0:
                    cute.arch.cp_async_wait_group(0)
                    self.to_async_proxy()
                    self.sync(ctx)
                    n_next = Int32(-1)
                    if i + 1 < n_sel:
                        n_next = self.sel_at(sel_row, i + 1, n_block_max)
                    if const_expr(self.sch.fp16_stages == 2):  # next tile loads while this one computes
                        if n_next >= 0:
                            self.load_kv16_tile(ctx, n_next, 1 - j)
                        cute.arch.cp_async_commit_group()
                    if const_expr(self.sch.mask_split):
                        need = self.tile_needs_mask(ctx, n_i)
                        if need:
                            self.step(ctx, n_i, j, 2, True)
                        if not need:
                            self.step(ctx, n_i, j, 2, False)
                    else:
                        self.step(ctx, n_i, j, 2, True)
                    if const_expr(self.sch.fp16_stages == 2):
                        j = 1 - j
                    else:  # one stage: every warp is done with it before the next tile overwrites it
                        self.sync(ctx)
                        if n_next >= 0:
                            self.load_kv16_tile(ctx, n_next, 0)
                        cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            self.sync(ctx)

    @cute.jit
    def visible_tiles(self, m_block: Int32, Sq: Int32, Skv: Int32) -> Int32:
        """n such that key tiles 0 .. n - 1 are visible to query block m_block: all of them without causal masking;
        causal is bottom-right aligned (query i sees keys j <= i + Skv - Sq)."""
        nkb = cute.ceil_div(Skv, self.Tn)
        n_block_max = nkb
        if const_expr(self.causal):
            hi = cutlass.min((m_block + 1) * self.Tm, Sq) + Skv - Sq  # 1 + last visible key of the block
            hi = cutlass.max(hi, 0)
            n_block_max = cutlass.min(nkb, cute.ceil_div(hi, self.Tn))
        return n_block_max

    @cute.jit
    def sync(self, ctx):
        """The barrier of the threads that share this context's tiles: the CTA (ctx.bar_id None) or one
        warpgroup's named barrier (the warp-specialized kernel's consumers)."""
        if const_expr(ctx.bar_id is None):
            cute.arch.barrier()
        else:
            cute.arch.barrier(barrier_id=ctx.bar_id, number_of_threads=self.nthr)

    def ring_stage(self, frag: cute.Tensor, stage: Int32) -> cute.Tensor:
        """A K / V wgmma operand: the tile itself, or (warp-specialized kernel, whose phase-1 decoded tiles and
        phase-2 16-bit tiles both arrive in the producer's ring) its ring stage."""
        if const_expr(self.ws):
            return frag[None, None, None, stage]
        return frag

    @cute.jit
    def next_unselected_cached(self, mask_row: cute.Tensor, n: Int32, widx: Int32, word: Uint32):
        """The largest key tile index < n that is not selected (-1 if none), as (tile, widx, word): the bitmask word
        word = mask_row[widx] is carried by the caller in a register (widx = -1: none yet), so the global load
        happens once per 32 tiles instead of once per lookup (the profile had ~10% of all stall samples on the
        loads of a lookup per tile, long scoreboard: each load's result decides the loop's next branch)."""
        m = n - 1
        searching = m >= 0
        while searching:
            wi = m // 32
            if wi != widx:
                word = Uint32(mask_row[wi])
                widx = wi
            if ((word >> Uint32(m % 32)) & Uint32(1)) != Uint32(0):
                m = m - 1
                searching = m >= 0
            else:
                searching = False
        return cutlass.max(m, -1), widx, word

    @cute.jit
    def sel_at(self, sel_row: cute.Tensor, i: Int32, n_block_max: Int32) -> Int32:
        n = sel_row[i]
        res = Int32(-1)
        if n >= 0 and n < n_block_max:
            res = n
        return res

    @cute.jit
    def tile_needs_mask(self, ctx, n: Int32) -> cutlass.Boolean:
        """Key tile n needs masking if it crosses Skv or (causal) the first row's diagonal."""
        need = (n + 1) * self.Tn > ctx.Skv
        if const_expr(self.causal):
            first_row_limit = ctx.m_block * self.Tm + ctx.Skv - ctx.Sq  # last key row 0 may see
            need = need | ((n + 1) * self.Tn - 1 > first_row_limit)
        return need

    # ---------------- loads ----------------
    @cute.jit
    def load_fp4_tile(self, ctx, n: Int32, stage: Int32):
        """cp.async the packed K rows/scales and V^T columns/scales of key tile n into FP4 stage `stage`.
        K rows past Skv are zero-filled; Vp/Vs are zero padded to a multiple of 64 keys (in bounds)."""
        key0 = n * self.Tn
        g = ctx.g
        for m in cutlass.range_constexpr(cute.size(g.tKp_s, mode=[1])):
            ok = key0 + g.tKp_c[0, m, 0][0] < ctx.Skv
            if ok:
                cute.copy(ctx.copy_kp, g.tKp_g[None, m, None, n], g.tKp_s[None, m, None, stage])
            if not ok:
                g.tKp_s[None, m, None, stage].fill(0)
        if ctx.tidx < self.Tn:
            ok_s = key0 + ctx.tidx < ctx.Skv
            if ok_s:
                cute.copy(ctx.copy_ks, g.tKs_g[None, None, None, n], g.tKs_s[None, None, None, stage])
            if not ok_s:
                g.tKs_s[None, None, None, stage].fill(0)
        cute.copy(ctx.copy_vp, g.tVp_g[None, None, None, n], g.tVp_s[None, None, None, stage])
        if ctx.tidx < self.D:
            cute.copy(ctx.copy_vs, g.tVs_g[None, None, None, n], g.tVs_s[None, None, None, stage])

    @cute.jit
    def load_rows16(self, ctx, tg: cute.Tensor, ts: cute.Tensor, row0: Int32, row_limit: Int32):
        """cp.async a 16-bit (rows, D) tile (partitioned gmem tg -> smem ts); rows >= row_limit -> 0."""
        for m in cutlass.range_constexpr(cute.size(ts, mode=[1])):
            ok = row0 + ctx.g.t16_c[0, m, 0][0] < row_limit
            if ok:
                cute.copy(ctx.copy_kv16, tg[None, m, None], ts[None, m, None])
            if not ok:
                ts[None, m, None].fill(0)

    @cute.jit
    def load_kv16_tile(self, ctx, n: Int32, t: Int32, with_v: cutlass.Constexpr = True,
                       dq: cutlass.Constexpr = False):
        """cp.async 16-bit K (and V) tile n into 16-bit stage t; dq: from dq(K)/dq(V) (phase 1, dq16)."""
        g = ctx.g
        tk = g.tKd_g if const_expr(dq) else g.tK16_g
        tv = g.tVd_g if const_expr(dq) else g.tV16_g
        if t == 0:
            self.load_rows16(ctx, tk[None, None, None, n], g.tK16_s[0], n * self.Tn, ctx.Skv)
            if const_expr(with_v):
                self.load_rows16(ctx, tv[None, None, None, n], g.tV16_s[0], n * self.Tn, ctx.Skv)
        if t != 0:
            self.load_rows16(ctx, tk[None, None, None, n], g.tK16_s[1], n * self.Tn, ctx.Skv)
            if const_expr(with_v):
                self.load_rows16(ctx, tv[None, None, None, n], g.tV16_s[1], n * self.Tn, ctx.Skv)

    # ---------------- one key tile ----------------
    @cute.jit
    def step(self, ctx, n: Int32, stage: Int32, phase: cutlass.Constexpr, masked: cutlass.Constexpr):
        """One key tile: S = QK^T, mask, online softmax, (phase 1: two-level P quantization), O += PV."""
        Tm, Tn = self.Tm, self.Tn
        if const_expr(phase == 1 and self.path.needs_decode and not self.dq16 and not self.ws):
            # SM90 path: decode this FP4 stage into the 16-bit kdec / vdec tiles
            # K rows past Skv only in tiles that need the mask; V^T rows are the D channels (all valid)
            self.path.decode_rows(ctx.sKdec1, ctx.copy_dec16, ctx.tidx, ctx.sKp32[None, None, stage],
                                  ctx.sKs[None, None, stage], ctx.Skv - n * Tn, self.p1_bf16, self.bits, masked)
            self.path.decode_rows(ctx.sVdec1, ctx.copy_vt16, ctx.tidx, ctx.sVp32[None, None, stage],
                                  ctx.sVs[None, None, stage], self.D, self.p1_bf16, self.bits, False)
            self.to_async_proxy()
            cute.arch.barrier()

        acc_S = cute.make_rmem_tensor(ctx.thr_mma_s.partition_shape_C((Tm, Tn)), Float32)
        if const_expr(not self.wg):
            acc_S.fill(0.0)
        if const_expr(phase == 1 and self.path.block_scaled):
            acc_S = self.path.tile.qk(QFragments(ctx.qf_frag, ctx.qf_sf), ctx.sKf[None, None, stage], ctx.sKs[None, None, stage], ctx.tidx)
        elif const_expr(self.wg):
            if const_expr(phase == 1 and not self.dq16):
                self.wg_gemm(ctx.mma_qk1, acc_S, ctx.wg_q1, self.ring_stage(ctx.wg_kdec, stage), True)
            elif const_expr(self.ws):  # phase 0 / 2 of the warp-specialized kernel: 16-bit K in ring stage `stage`
                self.wg_gemm(ctx.mma_qk, acc_S, ctx.wg_q, self.ring_stage(ctx.wg_k16, stage), True)
            else:
                if stage == 0:
                    self.wg_gemm(ctx.mma_qk, acc_S, ctx.wg_q, ctx.wg_k16[0], True)
                if stage != 0:
                    self.wg_gemm(ctx.mma_qk, acc_S, ctx.wg_q, ctx.wg_k16[1], True)
        elif const_expr(phase == 1 and not self.dq16):
            self.gemm_ss(ctx, acc_S, ctx.tSsKdec)
        else:
            if stage == 0:
                self.gemm_ss(ctx, acc_S, ctx.tSsK16[0])
            if stage != 0:
                self.gemm_ss(ctx, acc_S, ctx.tSsK16[1])

        acc_S_mn = self.mn_view(acc_S)
        acc_O_mn = self.mn_view(ctx.acc_O)
        if const_expr(masked):
            cS = cute.local_tile(ctx.mcS, (Tm, Tn), (ctx.m_block, n))
            tScS_mn = self.mn_view(ctx.thr_mma_s.partition_C(cS))
            for r in cutlass.range_constexpr(cute.size(acc_S_mn, mode=[0])):
                row = tScS_mn[r, 0][0]
                limit = ctx.Skv
                if const_expr(self.causal):
                    limit = cutlass.min(row + 1 + ctx.Skv - ctx.Sq, ctx.Skv)
                for c in cutlass.range_constexpr(cute.size(acc_S_mn, mode=[1])):
                    acc_S_mn[r, c] = -Float32.inf if tScS_mn[0, c][1] >= limit else acc_S_mn[r, c]

        sl2 = ctx.sl2
        # "bits" decode (phase 1): dq(Q) and dq(K) came out scaled by 2^(FP4_EXP-14) each, so acc_S = S / S_FOLD
        # exactly (power-of-two scaling commutes with the fp32 sums): the max and the exp argument are taken in
        # true units (bit-identical to the unscaled decode)
        fold = const_expr(phase == 1 and self.bits)
        sl2_s = sl2 * Float32(S_FOLD) if fold else sl2
        ncols = cute.size(acc_S_mn, mode=[1])
        p_scales = {}  # phase 1, SM90: (row, 16-key group) -> sc as a 16-bit pair
        for r in cutlass.range_constexpr(cute.size(acc_S_mn, mode=[0])):
            # SM90 phase 1: the per-16-key group maxima are taken of S (quad_max over the 4 lanes that hold the
            # group), before the exp: the row max is their max, and the group maxima of P~ = ex2(S*sl2 - m) are
            # ex2 of them (exp is monotone, and it is the same fma + ex2 as the element's own), so the P scale
            # chain below runs beside the 32 exps instead of after a second max pass over P~
            p_gmax_from_s = const_expr(phase == 1 and not self.path.block_scaled)
            gmax_s = []
            if const_expr(p_gmax_from_s):
                for g in cutlass.range_constexpr(ncols // 4):
                    v = cute.arch.fmax(cute.arch.fmax(acc_S_mn[r, 4 * g], acc_S_mn[r, 4 * g + 1]),
                                       cute.arch.fmax(acc_S_mn[r, 4 * g + 2], acc_S_mn[r, 4 * g + 3]))
                    gmax_s.append(self.quad_max(v))
                tmax = gmax_s[0]
                for g in cutlass.range_constexpr(1, ncols // 4):
                    tmax = cute.arch.fmax(tmax, gmax_s[g])
            else:
                s_row = acc_S_mn[r, None].load()
                tmax = s_row.reduce(cute.ReductionOp.MAX, -Float32.inf, 0)
                tmax = self.quad_max(tmax)
            if const_expr(fold):
                tmax = tmax * Float32(S_FOLD)
            m_old = ctx.row_max[r]
            m_new = cute.arch.fmax(m_old, tmax)
            m_use = Float32(0.0) if m_new == -Float32.inf else m_new
            # the softmax offset is an integer in log2 units, ms = ceil(m * sl2) (kernels/reference.py): alpha is a
            # power of two and P~ = 2^(S*sl2 - ms) lies on the 16-bit grid the final max would give it, so phase 2
            # rounds P~ in one pass with a running max (m_old = -inf: ceil keeps -inf, alpha = 0)
            ms = ceil_f32(m_use * sl2)
            alpha = ex2(ceil_f32(m_old * sl2) - ms)
            for c in cutlass.range_constexpr(ncols):
                acc_S_mn[r, c] = ex2(acc_S_mn[r, c] * sl2_s - ms)
            p_row = acc_S_mn[r, None].load()
            ctx.row_sum[r] = ctx.row_sum[r] * alpha + p_row.reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
            ctx.row_max[r] = m_new
            if const_expr(phase == 1):
                # ---- two-level P quantization (contract: SageAttention3 scheme) ----
                # group g of 16 keys = columns 4g..4g+3 of this thread's mn row (n-atoms 2g, 2g+1),
                # the other 12 keys live in the 3 other lanes of the quad.
                gmax = []
                if const_expr(self.path.block_scaled):
                    # only the row max is needed here (the helper does the per-16 amax itself)
                    rmax = self.quad_max(p_row.reduce(cute.ReductionOp.MAX, Float32(0.0), 0))
                else:
                    for g in cutlass.range_constexpr(ncols // 4):
                        gmax.append(ex2(gmax_s[g] * sl2_s - ms))
                    rmax = gmax[0]
                    for g in cutlass.range_constexpr(1, ncols // 4):
                        rmax = cute.arch.fmax(rmax, gmax[g])
                valid = rmax > Float32(P_TILE_MIN)
                s1 = rmax * Float32(1.0 / P_SCALE_MAX)
                # reciprocal multiplies instead of the reference's true divisions: <= 1-2 ulp apart, which
                # can flip an E4M3/E2M1 rounding only within that distance of a tie (negligible)
                inv_s1 = cute.arch.rcp_approx(s1) if valid else Float32(0.0)
                # "bits": dq(V) is scaled by 2^(FP4_EXP-14), so P'V' adds acc in units of s1 * V_FOLD
                inv_c = inv_s1 * Float32(1.0 / V_FOLD) if fold else inv_s1
                c_new = s1 * Float32(V_FOLD) if fold else s1
                ratio = alpha * ctx.row_c[r] * inv_c if valid else alpha
                ctx.row_c[r] = c_new if valid else ctx.row_c[r]
                if const_expr(self.path.block_scaled):
                    # the helper quantizes P~ itself (same s1); rows below the threshold contribute 0
                    keep = Float32(1.0) if valid else Float32(0.0)
                    acc_S_mn[r, None] = acc_S_mn[r, None].load() * keep
                # x / sc = P~ * (1/s1) * (1/sc): one multiply per element by kq = inv_s1/sc, taken times 2^22
                # (exact) for e2m1_rne_x22; acc_S keeps the unsaturated E2M1 value, the saturation and the
                # scale sc are applied in packed 16 bit when P' is built below (pack_p_sat_scale)
                inv_s1_22 = inv_s1 * Float32(2.0 ** 22)
                for g in cutlass.range_constexpr(0 if self.path.block_scaled else ncols // 4):
                    sc, sc2 = e4m3_rne_pair((gmax[g] * inv_s1) * Float32(1.0 / 6.0), self.p1_bf16)
                    kq22 = inv_s1_22 * cute.arch.rcp_approx(sc) if sc > Float32(0.0) else Float32(0.0)
                    for q in cutlass.range_constexpr(4):
                        acc_S_mn[r, 4 * g + q] = e2m1_rne_x22(acc_S_mn[r, 4 * g + q] * kq22)
                    p_scales[(r, g)] = sc2
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * ratio
            else:
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * alpha

        if const_expr(phase == 1 and self.path.block_scaled):
            pf = self.path.tile.quantize_p_natural(acc_S, ctx.tidx)
            self.path.tile.pv(ctx.acc_O, pf, ctx.sVf[None, None, stage], ctx.sVs[None, None, stage], ctx.tidx)
        else:
            # P (16-bit) as the A operand of P.V: the same registers, re-viewed (a_view)
            pdt = self.p1_dtype if const_expr(phase == 1) else self.dtype  # P' of phase 1: exact in fp16
            rP = cute.make_fragment_like(acc_S, pdt)
            if const_expr(phase == 1):
                # P' = min(E2M1, 6) * sc per column pair (2k, 2k+1) of an mn row: adjacent registers (mn_view), so
                # one 32-bit word of rP, written through a flat word view at the pair's register offset
                rP32 = cute.make_tensor(cute.recast_ptr(rP.iterator, dtype=Uint32),
                                        cute.make_layout(cute.size(rP) // 2))
                for r in cutlass.range_constexpr(cute.size(acc_S_mn, mode=[0])):
                    for c in cutlass.range_constexpr(0, ncols, 2):
                        off = self.reg_offset(acc_S_mn, r, c)
                        rP32[off // 2] = pack_p_sat_scale(acc_S_mn[r, c], acc_S_mn[r, c + 1], p_scales[(r, c // 4)],
                                                          self.p1_bf16)
            else:
                rP.store(acc_S.load().to(pdt))
            tOrP = self.a_view(rP)
            if const_expr(self.wg):
                if const_expr(phase == 1 and not self.dq16):
                    self.wg_gemm(ctx.mma_pvk, ctx.acc_O, tOrP, self.ring_stage(ctx.wg_vdec, stage), False)
                elif const_expr(self.ws):
                    self.wg_gemm(ctx.mma_pvmn, ctx.acc_O, tOrP, self.ring_stage(ctx.wg_v16, stage), False)
                else:
                    if stage == 0:
                        self.wg_gemm(ctx.mma_pvmn, ctx.acc_O, tOrP, ctx.wg_v16[0], False)
                    if stage != 0:
                        self.wg_gemm(ctx.mma_pvmn, ctx.acc_O, tOrP, ctx.wg_v16[1], False)
            elif const_expr(phase == 1 and not self.dq16):
                self.gemm_rs(ctx, tOrP, ctx.ld_k, ctx.tOsVdec, ctx.tOrVt_kv)
            else:
                if stage == 0:
                    self.gemm_rs(ctx, tOrP, ctx.ld_vt, ctx.tOsV16[0], ctx.tOrVt_v)
                if stage != 0:
                    self.gemm_rs(ctx, tOrP, ctx.ld_vt, ctx.tOsV16[1], ctx.tOrVt_v)

    @cute.jit
    def gemm_ss(self, ctx, acc: cute.Tensor, tSsK: cute.Tensor):
        """acc += Q K^T with both operands ldmatrix'ed from smem, one k-block ahead."""
        nk = cute.size(ctx.tSsQ.shape[2])
        cute.copy(ctx.ld_q, ctx.tSsQ[None, None, 0], ctx.tSrQ_v[None, None, 0])
        cute.copy(ctx.ld_k, tSsK[None, None, 0], ctx.tSrK_v[None, None, 0])
        for k in cutlass.range_constexpr(nk):
            if const_expr(k + 1 < nk):
                cute.copy(ctx.ld_q, ctx.tSsQ[None, None, k + 1], ctx.tSrQ_v[None, None, k + 1])
                cute.copy(ctx.ld_k, tSsK[None, None, k + 1], ctx.tSrK_v[None, None, k + 1])
            cute.gemm(ctx.tiled_mma, acc, ctx.tSrQ[None, None, k], ctx.tSrK[None, None, k], acc)

    @cute.jit
    def wg_gemm(self, tiled_mma: cute.TiledMma, acc: cute.Tensor, tA: cute.Tensor, tB: cute.Tensor,
                zero_init: cutlass.Constexpr):
        """acc (+)= A B as one warpgroup MMA per 16-wide k-block, issued back to back, then waited for (the
        accumulator is read right after).  zero_init: the first k-block overwrites acc."""
        warpgroup.fence()
        atom = cute.make_mma_atom(tiled_mma.op)  # a fresh atom: its ACCUMULATE field is changed below
        atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
        for k in cutlass.range_constexpr(cute.size(tA.shape[2])):
            cute.gemm(atom, acc, tA[None, None, k], tB[None, None, k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def to_async_proxy(self):
        """wgmma reads shared memory through the async proxy: make this thread's generic-proxy writes (st.shared
        of the decode, completed cp.async) visible to it; the CTA barrier that follows covers the other threads."""
        if const_expr(self.wg):
            cute.arch.fence_view_async_shared()

    @cute.jit
    def gemm_rs(self, ctx, tOrP: cute.Tensor, ld: cute.TiledCopy, tOsV: cute.Tensor, tOrV_v: cute.Tensor):
        """acc_O += P V with P in registers and V^T ldmatrix'ed from smem."""
        nk = cute.size(tOrP.shape[2])
        cute.copy(ld, tOsV[None, None, 0], tOrV_v[None, None, 0])
        for k in cutlass.range_constexpr(nk):
            if const_expr(k + 1 < nk):
                cute.copy(ld, tOsV[None, None, k + 1], tOrV_v[None, None, k + 1])
            cute.gemm(ctx.tiled_mma, ctx.acc_O, tOrP[None, None, k], ctx.tOrVt[None, None, k], ctx.acc_O)

    # ---------------- epilogue ----------------
    @cute.jit
    def epilogue(self, ctx, mO: cute.Tensor, mLSE: cute.Tensor, sQ: cute.Tensor):
        Tm, D = self.Tm, self.D
        acc_O_mn = self.mn_view(ctx.acc_O)
        n_rows = cute.size(ctx.row_sum)
        cS = cute.local_tile(ctx.mcS, (Tm, self.Tn), (ctx.m_block, 0))
        tScS_mn = self.mn_view(ctx.thr_mma_s.partition_C(cS))
        lane = ctx.tidx % 32
        for r in cutlass.range_constexpr(n_rows):
            l = self.quad_sum(ctx.row_sum[r])
            pos = l > Float32(0.0)
            f = ctx.row_c[r] / l if pos else Float32(0.0)
            # l is relative to 2^ceil(m * sl2), the offset of the last step (see step)
            lse = (ceil_f32(ctx.row_max[r] * ctx.sl2) + lg2(l)) * Float32(math.log(2.0)) if pos else -Float32.inf
            acc_O_mn[r, None] = acc_O_mn[r, None].load() * f
            if const_expr(self.has_lse):
                row = tScS_mn[r, 0][0]
                if lane % 4 == 0 and row < ctx.Sq:
                    mLSE[ctx.b, ctx.hq, row] = lse
        # O through sQ: the wgmma paths read sQ as a whole (every warp's rows) until their last S wgmma completed
        self.sync(ctx)
        rO = cute.make_fragment_like(ctx.acc_O, self.dtype)
        rO.store(ctx.acc_O.load().to(self.dtype))
        st_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype)
        st_c = cute.make_tiled_copy_C(st_atom, ctx.tiled_mma_o)
        thr_st = st_c.get_slice(ctx.tidx)
        cute.copy(st_atom, thr_st.retile(rO), thr_st.partition_D(sQ))
        self.sync(ctx)
        gO = cute.local_tile(mO[ctx.b, None, ctx.hq, None], (Tm, D), (ctx.m_block, 0))
        thr = ctx.copy_rows16.get_slice(ctx.tidx)
        tOs = thr.partition_S(sQ)
        tOg = thr.partition_D(gO)
        tOc = thr.partition_D(cute.make_identity_tensor((Tm, D)))
        tOr = cute.make_fragment_like(tOs, self.dtype)
        cute.autovec_copy(tOs, tOr)
        for m in cutlass.range_constexpr(cute.size(tOr, mode=[1])):
            if ctx.m_block * Tm + tOc[0, m, 0][0] < ctx.Sq:
                cute.copy(ctx.copy_rows16, tOr[None, m, None], tOg[None, m, None])

    # ---------------- helpers ----------------
    @cute.jit
    def mn_view(self, acc: cute.Tensor) -> cute.Tensor:
        """((2,2),M,N) m16n8 accumulator -> (rows, cols) view: rows (2,M), cols (2,N); a wgmma accumulator
        ((2,2,N/8),M,N) -> rows (2,M), cols (2,N/8,N).  Either way column c = 2*(n-atom) + (c % 2)."""
        l = cute.make_layout(acc.layout.shape)
        if const_expr(len(l.shape[0]) == 3):
            mn = cute.make_layout(((l.shape[0][1], l.shape[1]), (l.shape[0][0], l.shape[0][2], l.shape[2])),
                                  stride=((l.stride[0][1], l.stride[1]),
                                          (l.stride[0][0], l.stride[0][2], l.stride[2])))
        else:
            mn = cute.make_layout(((l.shape[0][1], l.shape[1]), (l.shape[0][0], l.shape[2])),
                                  stride=((l.stride[0][1], l.stride[1]), (l.stride[0][0], l.stride[2])))
        return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))

    def reg_offset(self, t_mn: cute.Tensor, r: int, c: int) -> int:
        """Register (storage) offset of element (r, c) of a static mn view; (r, c + 1) must be the next register."""
        off = cute.crd2idx((r, c), t_mn.layout)
        assert isinstance(off, int) and off % 2 == 0 and cute.crd2idx((r, c + 1), t_mn.layout) == off + 1, \
            f"mn view: columns {c}, {c + 1} of row {r} are not one aligned register pair"
        return off

    @cute.jit
    def a_view(self, acc: cute.Tensor) -> cute.Tensor:
        """A C-layout tile (16-bit copy of S) viewed as the A fragments of the next MMA, k-blocks of 16 keys = two
        n8 column atoms: m16n8 (4,M,N) -> ((4,2),M,N/2); wgmma ((2,2,N/8),M,N) -> ((2,2,2),M,N/16)."""
        if const_expr(len(acc.layout.shape[0]) == 3):
            l = cute.logical_divide(acc.layout, ((None, None, 2), None, None))
            lay = cute.make_layout(
                ((l.shape[0][0], l.shape[0][1], l.shape[0][2][0]), l.shape[1], (l.shape[0][2][1], l.shape[2])),
                stride=((l.stride[0][0], l.stride[0][1], l.stride[0][2][0]), l.stride[1],
                        (l.stride[0][2][1], l.stride[2])))
        else:
            l = cute.logical_divide(acc.layout, (None, None, 2))
            lay = cute.make_layout(((l.shape[0], l.shape[2][0]), l.shape[1], l.shape[2][1]),
                                   stride=((l.stride[0], l.stride[2][0]), l.stride[1], l.stride[2][1]))
        return cute.make_tensor(acc.iterator, lay)

    @cute.jit
    def quad_max(self, v: Float32) -> Float32:
        v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=2, mask=-1, mask_and_clamp=31))
        v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=1, mask=-1, mask_and_clamp=31))
        return v

    @cute.jit
    def quad_sum(self, v: Float32) -> Float32:
        v = v + cute.arch.shuffle_sync_bfly(v, offset=2, mask=-1, mask_and_clamp=31)
        v = v + cute.arch.shuffle_sync_bfly(v, offset=1, mask=-1, mask_and_clamp=31)
        return v


# ----------------------------------------------------------------------------------------------
# compilation with symbolic shapes (used by the interface's cache and by the CPU compile tests)
# ----------------------------------------------------------------------------------------------
def fake_args(dtype, head_dim: int):
    """Fake (symbolic-shape) tensors matching ThriftPrefillKernel.__call__ (B, S, H dynamic)."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    D = head_dim
    B, Sq, Skv, Hq, Hkv = (cute.sym_int() for _ in range(5))
    skp2, skp16 = cute.sym_int(divisibility=32), cute.sym_int(divisibility=4)
    nqb, nw, nq_b2, ks = (cute.sym_int() for _ in range(4))

    def t(dt, shape, align=16):
        return make_fake_compact_tensor(dt, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)),
                                        assumed_align=align)

    u8 = cutlass.Uint8
    return (
        t(dtype, (B, Sq, Hq, D)), t(dtype, (B, Skv, Hkv, D)), t(dtype, (B, Skv, Hkv, D)),
        t(u8, (B, Sq, Hq, D // 2)), t(u8, (B, Sq, Hq, D // 16)),
        t(u8, (B, Skv, Hkv, D // 2)), t(u8, (B, Skv, Hkv, D // 16)),
        t(u8, (B, Hkv, D, skp2)), t(u8, (B, Hkv, D, skp16)),
        t(cutlass.Int32, (B, Hq, nqb, nw), 4), t(cutlass.Int32, (B, Hq, nq_b2, ks), 4),
        t(dtype, (B, Sq, Hq, D)), t(Float32, (B, Hq, Sq), 4),
        t(dtype, (B, Skv, Hkv, D)), t(dtype, (B, Skv, Hkv, D)),
        Float32(1.0), Int32(1), make_fake_stream(),
    )


def compile_prefill(dtype, head_dim: int, causal: bool, schedule: PrefillSchedule, arch: int,
                    has_lse: bool = True, options: str = ""):
    """cute.compile the kernel for fake tensors; the arch comes from CUTE_DSL_ARCH (or the GPU)."""
    k = make_prefill_kernel(dtype, head_dim, causal, schedule, arch, has_lse=has_lse)
    return cute.compile(k, *fake_args(dtype, head_dim), options=options)


def make_prefill_kernel(dtype, head_dim: int, causal: bool, schedule: PrefillSchedule, arch: int, fmt: str = "nvfp4",
                        has_lse: bool = True):
    """The kernel object for this schedule on sm_<arch>: ThriftPrefillWSKernel (kernels/prefill_ws.py) where the
    schedule is warp-specialized there (schedule.uses_ws), else ThriftPrefillKernel. Same __call__ arguments."""
    if schedule.uses_ws(arch):
        from kernels.prefill_ws import ThriftPrefillWSKernel

        return ThriftPrefillWSKernel(dtype, head_dim, causal, schedule, arch, fmt=fmt, has_lse=has_lse)
    return ThriftPrefillKernel(dtype, head_dim, causal, schedule, arch, fmt=fmt, has_lse=has_lse)
