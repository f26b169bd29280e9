"""TopKSelectKernel: the top-k and the bitmask of kernels.selection.select_blocks as one CuTe DSL launch.

select_blocks (torch) builds each chunk of [heads, n_q_blocks, n_kv_blocks] scores, masks the causally invisible
blocks, stable-sorts every row (descending) and keeps the first k; the prefill then needs the result again as a
bitmask. On an H100 at 32k tokens x 32 heads (512 x 512 blocks per head) the sort alone took 0.44 ms and the whole
selection plus the bitmask ~1.0 ms (profiling/RESULTS.md, session 11), against a 25 ms attention. This kernel takes the
same unmasked scores and writes both results: one warp per (head, query block) row, k rounds of a warp-wide arg-max
over the row's visible blocks, each round taking the largest key below the previous round's.

Exactly select_blocks' order (tests/test_select_topk_gpu.py): the key of block j is (orderable score, -j) packed in
an int64, so equal scores keep ascending block order like the stable sort; the orderable score maps -0.0 to +0.0
(the sort's comparison treats them as equal) and every NaN above +inf (a descending torch sort puts NaN first);
invisible blocks (causal, bottom-right aligned: j * block_size > last visible key of the block's last query) never
compete, and slots past the number of visible blocks are -1.

Cost: k rounds x ceil(visible / 32) loads per lane (L1-resident rows); the bitmask words are built from the row's
written indices after a __syncwarp. Launch: 4 warps (rows) per CTA.

Status: the public op's default (kernels.interface.SELECT_TOPK_KERNEL). Compiled for sm_90a and sm_120a
(tests/test_prefill_compile.py), its key order and rounds emulated on the CPU (tests/test_selection.py). On an H100
(session 13) tests/test_select_topk_gpu.py passed 37 of 38; the one failure, a NaN score at block 0 (its key was
INT64_MAX, the first round's exclusive bound), is fixed by ranking NaN at 0x7F800001, and the whole file passed on
an H100 in session 14. With kernels.interface.SELECT_FUSED_MEANS (the default) the public op passes the quantizer's
block means (means=).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

WARPS = 4
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


@dsl_user_op
def rank_key(s, j, *, loc=None, ip=None) -> Int64:
    """Block j's int64 rank key (larger ranks first): (k << 32) + (2^32 - 1 - j), k a signed int32 ordered like the
    float s with -0.0 == +0.0 and every NaN the largest (0x7F800001, one above +inf's 0x7F800000: not 0x7FFFFFFF,
    which made a NaN at j = 0 the key INT64_MAX, equal to the first round's bound, so never taken -- found by the
    GPU test). The sign extension of k is explicit (cvt.s64.s32): the DSL widens an Int32 to Int64 with
    cvt.u64.u32, which would rank negative scores first."""
    return Int64(llvm.inline_asm(
        T.i64(), [Float32(s).ir_value(loc=loc, ip=ip), Int32(j).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .f32 z;\n\t.reg .b32 u, m;\n\t.reg .b64 hi, lo;\n\t.reg .pred isnan;\n\t"
        "add.rn.f32 z, $1, 0f00000000;\n\t"      # -0 + +0 = +0 (round to nearest)
        "mov.b32 u, z;\n\tshr.s32 m, u, 31;\n\tand.b32 m, m, 0x7FFFFFFF;\n\txor.b32 u, u, m;\n\t"
        "setp.nan.f32 isnan, $1, $1;\n\tselp.b32 u, 0x7F800001, u, isnan;\n\t"
        "cvt.s64.s32 hi, u;\n\tshl.b64 hi, hi, 32;\n\tcvt.u64.u32 lo, $2;\n\t"
        "sub.s64 hi, hi, lo;\n\tadd.s64 $0, hi, 4294967295;\n\t}",
        "=l,f,r", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


class TopKSelectKernel:
    """Static config: causal (bottom-right aligned visibility) and the selection block size."""

    def __init__(self, causal: bool, block_size: int = 64):
        self.causal = bool(causal)
        self.bs = int(block_size)

    @cute.jit
    def __call__(self, mS: cute.Tensor, mSel: cute.Tensor, mMask: cute.Tensor, row0: Int32, nqb: Int32,
                 Sq: Int32, Skv: Int32, stream):
        """mS: [rows, nkb] fp32 scores of one chunk (row = head * nqb + query block); mSel [*, k] int32 and
        mMask [*, nw] int32: the whole outputs, this chunk's rows starting at row0."""
        rows = mS.shape[0]
        self.kernel(mS, mSel, mMask, row0, nqb, Sq, Skv).launch(
            grid=(cute.ceil_div(rows, WARPS), 1, 1), block=(32 * WARPS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, mS: cute.Tensor, mSel: cute.Tensor, mMask: cute.Tensor, row0: Int32, nqb: Int32, Sq: Int32,
               Skv: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = bidx * WARPS + tidx // 32
        rows = mS.shape[0]
        nkb = mS.shape[1]
        kk = mSel.shape[1]
        nw = mMask.shape[1]
        if row < rows:
            orow = row0 + row
            nvis = nkb
            if const_expr(self.causal):
                i = row % nqb
                mk = cutlass.min((i + 1) * self.bs, Sq) - 1 + (Skv - Sq)  # last key the block's last query sees
                nvis = Int32(0)
                if mk >= 0:
                    nvis = cutlass.min(nkb, mk // self.bs + 1)
            nfound = cutlass.min(kk, nvis)
            prev = Int64(_I64_MAX)
            for r in range(nfound):
                best = Int64(_I64_MIN)
                for j0 in range(0, nvis, 32):
                    j = j0 + lane
                    if j < nvis:
                        key = rank_key(mS[row, j], j)
                        if key < prev and key > best:
                            best = key
                for m in cutlass.range_constexpr(5):
                    other = cute.arch.shuffle_sync_bfly(best, offset=1 << m)
                    best = other if other > best else best
                prev = best
                if lane == 0:
                    mSel[orow, r] = Int32(Int64(0xFFFFFFFF) - (best & Int64(0xFFFFFFFF)))
            for r0 in range(nfound, kk, 32):
                if r0 + lane < kk:
                    mSel[orow, r0 + lane] = Int32(-1)
            cute.arch.sync_warp()  # lane 0's index stores are visible to the warp
            for w0 in range(0, nw, 32):
                w = w0 + lane
                if w < nw:
                    word = Int32(0)
                    for r in range(nfound):
                        jj = mSel[orow, r]
                        if jj // 32 == w:
                            word = word | (Int32(1) << (jj % 32))
                    mMask[orow, w] = word


def fake_args(causal: bool = True):
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    rows, nkb, tot, kk, nw = (cute.sym_int() for _ in range(5))

    def t(dt, shape):
        return make_fake_compact_tensor(dt, shape, stride_order=(1, 0), assumed_align=4)

    return (t(Float32, (rows, nkb)), t(Int32, (tot, kk)), t(Int32, (tot, nw)), Int32(0), Int32(1), Int32(64),
            Int32(64), make_fake_stream())


def compile_topk(causal: bool = True, block_size: int = 64):
    return cute.compile(TopKSelectKernel(causal, block_size), *fake_args(causal))


_CACHE: dict = {}


def select_and_mask(q, k, *, budget: float = 0.05, causal: bool = True, method: str = "block_mean",
                    block_size: int = 64, top_k=None, seed: int = 0, out=None, means=None):
    """(select_blocks(q, k, ...), kernels.interface.selection_bitmask of it) for CUDA tensors: the scores come from
    kernels.selection.score_chunks (the bits select_blocks ranks), the top-k and the bitmask from one
    TopKSelectKernel launch per chunk, on the current stream. Arguments and validation as select_blocks;
    out: optional (sel, mask) to write, contiguous int32 [B, Hq, nqb, k_max] and [B, Hq, nqb, ceil(nkb / 32)].
    means: optional (block_means(q), block_means(k)) computed elsewhere (method "block_mean"; the public op passes the
    quantizer kernel's, which are the same bits), see kernels.selection.score_chunks."""
    import torch

    from kernels.interface import _cute, _stream
    from kernels.selection import _select_setup, score_chunks

    B, Sq, Hq, Skv, Hkv, nqb, nkb, kk = _select_setup(q, k, budget, causal, method, block_size, top_k, seed,
                                                      "select_and_mask")
    if q.device.type != "cuda":
        raise ValueError(f"select_and_mask: q, k must be CUDA tensors, got device {q.device}")
    dev = q.device
    nw = max(1, -(-nkb // 32))
    if out is None:
        sel = torch.empty((B, Hq, nqb, kk), dtype=torch.int32, device=dev)
        mask = torch.empty((B, Hq, nqb, nw), dtype=torch.int32, device=dev)
    else:
        sel, mask = out
        for name, t, shape in (("sel", sel, (B, Hq, nqb, kk)), ("mask", mask, (B, Hq, nqb, nw))):
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.int32 and tuple(t.shape) == shape
                    and t.is_contiguous() and t.device == dev):
                raise ValueError(f"select_and_mask: out {name} must be a contiguous int32 tensor of shape {shape} "
                                 f"on {dev}")
    if kk == 0:
        mask.zero_()
        return sel, mask
    sel2, mask2 = sel.view(-1, kk), mask.view(-1, nw)
    key = (bool(causal), int(block_size))
    for b, h0, h1, scores in score_chunks(q, k, causal=causal, method=method, block_size=block_size, seed=seed,
                                              means=means):
        s2 = scores.reshape(-1, nkb).contiguous()
        args = [_cute(s2, True), _cute(sel2, True), _cute(mask2, True), Int32((b * Hq + h0) * nqb), Int32(nqb),
                Int32(Sq), Int32(Skv)]
        fn = _CACHE.get(key)
        if fn is None:
            fn = _CACHE[key] = cute.compile(TopKSelectKernel(causal, block_size), *args, _stream())
        fn(*args, _stream())
    return sel, mask


def compile_targets(arch: str):
    """profiling.resources protocol: the causal and the non-causal top-k kernel (arch-independent code)."""
    return [("select_topk", "causal", lambda: compile_topk(True)),
            ("select_topk", "full", lambda: compile_topk(False))]
