"""Split-KV ThriftAttention decode kernel (CuTe DSL) over the FP4+FP16 KV cache of kernels/kv_cache.py.

One CTA = one warp = (sequence b, KV head, split of the sequence). All G = Hq/Hkv query heads of the KV head
share the CTA, so each cache byte is read once. The warp streams its 64-token tiles in order:
  * FP4 tiles (not selected): the 72*D-byte decode tile is copied to shared memory with 16-byte cp.async
    through a ring of `stages` slots (DecodeConfig): by default the tile goes as its K half and its V half, so
    the K half's slot is refilled while P.V still runs and 3 half-tile slots keep a whole tile in flight (13.9
    KB at D=128 instead of 18.4 for two whole-tile stages); each thread then reads its fragments with
    16-byte ld.shared (the cache layout makes them conflict-free), decodes E2M1 x E4M3 to exact fp16 in
    registers (the SM90 path: no FP4 tensor cores) -- with the cache's default "bits" word layout each f16x2 is
    a shift and a mask of the code word (s<<15 | (e1 e0 m)<<9 = E2M1 * 2^-14 in fp16) times scale * 2^7, the 2^7
    folded into fp32 (FP4_EXP; bit-identical to the "nibble" table decode) -- and runs m16n8k16 MMAs with the
    64 keys (K rows) or the D channels (V^T rows) as M and the query heads as N (padded to 8 or 16):
        S^T = K' Q'^T,    O^T += V'^T P'^T   (P'^T is turned into the B operand with movmatrix.trans).
    P uses the contract's two-level scheme: per head and tile, x = 2688 * exp(S - tilemax) (= P~/s1 with
    s1 = rowmax/(448*6)), NVFP4 of x over 16 keys -- each thread holds exactly one 16-key group per head, so
    the group amax needs one shuffle -- and O += s1 * (P'.V') with s1 = exp(tilemax - m)/2688 in fp32. P's group
    scales always use the amax rule; the query is dq(NVFP4(q)) with the cache's scale_rule, quantized once per
    call before the launch ("pre"; or in registers per CTA, scale_rule "mse"/"amax").
  * FP16 tiles (selected blocks, and the partial last block which is always FP16): K and V read straight from
    the 16-bit cache with 16-byte loads, f16_depth m-tiles ahead (keys beyond the length predicated off ->
    S = -inf, V = 0), S = q.k in fp32, P~ = 2^(S log2e - M) rounded to the input dtype, O^T += V^T P~^T, with
    the running offset M = ceil(m log2e) an integer (both tile kinds): power-of-two rescales commute with the
    16-bit rounding, so every split rounds P~ as the reference does against the sequence's final max.
Which tiles a CTA takes (DecodeConfig.work). "dynamic" (the default when splits hold >= 4 tiles): the NS CTAs of a
(sequence, KV head) share a list of work items, longest first -- the partial last tile, the selected blocks (the
FP16 work list from the selection's top-k), then every tile in order with the FP16 ones skipped -- CTA s takes items
s and 2 NS - 1 - s, then one item at a time from an atomic counter (fetched two items ahead, so neither the atomic
nor the item's flag load is waited on); the last CTA to finish resets the counter. A per-CTA timeline
(DecodeConfig.trace, profiling/decode_timeline.py) of the static splits at B=1, 128k showed why: CTAs ended between
52 and 92 us (busier SMs, later first tiles, FP16 tiles at ~10 us of warp time each) and the 4.5 us flag scan
sat on every CTA's critical path; with the dynamic items they end within ~9 us of each other and the prologue is
one round of loads. "static": CTA s takes a contiguous range, cost-balanced (f16_cost > 0) with two
16-flags-per-lane scans of the head's flags, its FP4 tiles known up front as warp ballots, 32 tiles per global load
(a 64-bit window), instead of a dependent flag load before every copy; deterministic (the dynamic one reorders the
fp32 merge from run to run). (An L2 bulk prefetch of the tiles ahead, FP4 and FP16, and of the FP16 tiles alone,
was tried and removed: slower on an H100 at every shape.)
Partial results (O/l, LSE) of each split go to an fp32 workspace; a second small kernel (B*Hq*D/32 CTAs,
programmatic dependent launch) combines the splits through their LSEs. Softmax runs in the log2 domain; l sums
the unquantized P~ (as the reference).

Arch difference (kept in `fp4_math_path`): both sm_90a and sm_120a run the register-decode path above
(mma.sync f16, movmatrix, cvt e4m3x2 need sm_89+). The sm_120a block-scaled MMA (kernels/fp4_mma_sm120.py,
`Sm120Fp4AttnTile`, kind::mxf4nvf4.block_scale) is NOT wired in. Why, precisely, and what it would take:
  1. Thread shape. The helper is a 4-warp (128-thread) 64-query x 64-key tile: its tiled MMA repeats the
     m16n8k64 atom over 4 warps along M and load_q/qk/pv partition by tidx in [0, 128). A decode CTA is one
     warp holding the G <= 16 query heads of one KV head. It fits dimensionally (M = 16 padded query heads,
     N = keys; the padding is free in a memory-bound kernel), but needs a 1-warp variant of the helper (tiled
     MMA layout (1,1,1), permutation (16, 16, 64)); that file is another helper's.
  2. Shared-memory layout. The helper ldmatrix-reads K as row-major [64 keys, D/2 B] with a 16-byte-chunk XOR
     swizzle (+ scales [64, D/16] row-major) and V^T as [D, 32 B] Sw<1,4,3> (+ scales [D, 4]). The cache's decode
     tile is an m16n8k16 fragment image (kv_cache.py): K codes [j][lane][D/8 B], V codes [dt][lane][hh][8 B],
     scales per lane. The cache need not change -- the re-layout can happen in the copy: for D=128 each 16-byte
     K chunk (row key(c,r,h), channels 32t..32t+31) is exactly one swizzled 16-byte chunk (row, t) of sK, so the
     cp.async just gets a computed destination; V pieces are 8 bytes (channel drow, keys 16t..16t+15) -> 8-byte
     cp.async (2x the copies; D=64 K likewise); the 1-2-byte scale pieces are below cp.async's 4-byte minimum
     -> copy raw, then a per-lane register scatter (16 B of K and 16 B of V scales per lane) into sKs/sVs. Rows
     can go in natural key order (quantize_p_natural, +24 shuffles per tile) or in the helper's permuted order
     (quantize_p).
  3. Orientation. The decode keeps S^T = K Q^T and O^T = V^T P^T (keys / channels on M, heads on columns 2t+e),
     shared with the FP16 tile path (selected and partial blocks) and the epilogue. The block-scaled MMA takes Q
     as the A operand, so S, P and O come out as [heads x keys] / [heads x D] (heads on rows r, r+8). One
     orientation must hold the running (m, l, O) of both tile kinds: the FP16 path (S = Q K^T with K rows from
     global as B fragments, O += P V with prmt-paired V words as B fragments) and the epilogue must be rewritten
     for it. Numerics already agree (NVFP4 E4M3 per 16 along K = scale_vec::4X; the same two-level P).
  Estimate: about a day of work (1-warp helper variant, copy-time re-layout with the scale scatter, FP16 path
  and epilogue re-oriented, compile test asserting kind::mxf4nvf4.block_scale), then validation on an SM120 GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ._validate import check_scale_rule
from .arch_paths import (FP4_EXP, ceil_f32, e2m1_rne, e4m3_bcast_f16_pow2, e4m3_rne, ex2, fp4x8_decode_s2,
                         fp4x8_f16_bits,
                         mse_scale_steps, nvfp4_mse_scale)
from .kv_cache import DEFAULT_FP4_LAYOUT, tile_bytes

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
P_SCALE = 448.0 * 6.0  # two-level P: x = P~ / s1, s1 = rowmax / (448 * 6)
# Cost-balanced splits (DecodeConfig.f16_cost) only when the equal-count splits hold at least this many tiles: with
# 1 tile per split (B=1, 8k, 128 splits) the flag scan cost 19.6 -> 23.9 us; from 4 tiles (B=1, 32k) it saves 9%.
BALANCE_MIN_TILES = 4


@dataclass(frozen=True)
class DecodeConfig:
    """Static schedule of the split-KV kernel (every field changes the generated code; part of the compile key).

    parts: how an FP4 tile (72*D bytes: K codes + K scales | V codes + V scales) is staged in shared memory. 1: whole
      tiles; 2: K half and V half separately, so the K half's slot is refilled while P.V still runs and a ring of
      `stages` halves keeps one whole tile in flight with 3 slots (13.8 KB at D=128) instead of 2 whole-tile stages
      (18.4 KB): more one-warp CTAs fit an SM.
    stages: ring slots of parts (cp.async groups in flight = stages - 1). parts=1: 2 or 3; parts=2: 3 or 4.
    f16_cost: 0 = splits of equal tile count (tiles_per_split); w >= 1 = (when tiles_per_split >= BALANCE_MIN_TILES)
      each CTA finds its own range of tiles from the flags so that every split carries the same cost, an FP16 tile
      (K+V at 16 bits, 3.6x an FP4 tile's bytes, read by synchronous loads) counting w FP4 tiles. With equal counts a
      few CTAs draw several selected blocks and set the kernel's time.
    Defaults chosen on an H100 (profiling/RESULTS.md, decode section, session 3); the same table has the variants.
    min_ctas: .minnctapersm hint (0 = none): caps registers so that many one-warp CTAs fit an SM (15 at D=128 with
      parts=2, stages=3 -> <= 136 registers).
    f16_depth: m-tiles (16 keys) of K, then of V, in flight in the FP16 tiles' synchronous loads (1 or 2).
    fp4_layout / scale_rule: the cache's code-word layout and the query's NVFP4 rule ("pre" = quantized before launch).
    work: how CTAs find their tiles. "static": split s takes a contiguous range (f16_cost). "dynamic": the NS CTAs of
      a (sequence, KV head) take work items, longest first: the partial last tile, the selected blocks (the FP16
      work list), then every tile in order (the FP4 ones; FP16 ones skipped) -- items s and 2 NS - 1 - s to CTA s,
      the rest one at a time from an atomic counter.
      A CTA that runs slower (a busier SM, a later first tile, FP16 tiles) simply takes fewer items, so all CTAs end
      together; the last CTA of the head resets the counter for the next launch. Needs (parts, stages) = (2, 3)
      or (1, 2) (one tile of look-ahead). Not bitwise deterministic: which CTA merges which tiles changes from run
      to run, so O moves by fp32 rounding (~1e-4 relative in bf16); "static" is deterministic.
    trace: profiling build only (profiling/decode_timeline.py; not reachable from thrift_decode's schedule dict):
      each CTA's lane 0 overwrites channels 0..TRACE_SLOTS-1 of its first query head's partial-O row with a
      timeline (TRACE_FIELDS: %globaltimer at entry, %clock64 at the phase boundaries, %smid, tile counts), so that
      launch's outputs are not valid attention.
    """
    fp4_layout: str = DEFAULT_FP4_LAYOUT
    scale_rule: str = "pre"
    parts: int = 2
    stages: int = 3
    f16_cost: int = 3
    min_ctas: int = 0
    f16_depth: int = 2
    work: str = "dynamic"
    trace: bool = False

    def __post_init__(self):
        if self.fp4_layout not in ("nibble", "bits"):
            raise ValueError(f"fp4_layout must be 'nibble' or 'bits', got {self.fp4_layout!r}")
        if self.scale_rule != "pre":  # "pre": qr already holds dq(NVFP4(q)), quantized before the launch
            check_scale_rule(self.scale_rule, "ThriftDecodeSplitKV")
        ok = {1: (2, 3), 2: (3, 4)}
        if self.parts not in ok:
            raise ValueError(f"parts (shared-memory pieces of an FP4 tile) must be 1 or 2, got {self.parts}")
        if self.stages not in ok[self.parts]:
            raise ValueError(f"stages (ring slots) must be in {ok[self.parts]} with parts={self.parts}, "
                             f"got {self.stages}")
        if not 0 <= self.f16_cost <= 16:
            raise ValueError(f"f16_cost (cost of an FP16 tile in FP4 tiles, 0 = equal-count splits) must be in "
                             f"[0, 16], got {self.f16_cost}")
        if self.f16_depth not in (1, 2):
            raise ValueError(f"f16_depth (m-tiles of FP16 K/V loads in flight) must be 1 or 2, got {self.f16_depth}")
        if self.work not in ("static", "dynamic"):
            raise ValueError(f"work must be 'static' or 'dynamic', got {self.work!r}")
        if self.work == "dynamic" and (self.parts, self.stages) not in ((2, 3), (1, 2)):
            raise ValueError(f"work='dynamic' (the default) needs (parts, stages) = (2, 3) or (1, 2), got "
                             f"({self.parts}, {self.stages}); other pipelines need work='static'")
        if not 0 <= self.min_ctas <= 32:
            raise ValueError(f"min_ctas (.minnctapersm, 0 = none) must be in [0, 32], got {self.min_ctas}")


def fp4_math_path(arch: int) -> str:
    """How FP4 tiles are multiplied on sm_<arch>: "decode_f16" (E2M1*E4M3 -> fp16 in registers + mma.sync
    m16n8k16). The only difference between the arch builds today; sm_120a block-scaled MMA is future work."""
    if arch < 89:
        raise ValueError(f"thrift decode needs sm_89 or newer (cvt e4m3x2), got sm_{arch}")
    return "decode_f16"


# --------------------------------------------------------------------------------------------- PTX helpers
def _asm(ret, args, text, cons, side=False, loc=None, ip=None):
    return llvm.inline_asm(ret, args, text, cons, has_side_effects=side, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


def _words(res, n, loc=None, ip=None):
    return [Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(n)]


@dsl_user_op
def cp_async16(saddr, gaddr, *, loc=None, ip=None):
    """16-byte cp.async global -> shared (L2 only, .cg)."""
    _asm(None, [Int32(saddr).ir_value(loc=loc, ip=ip), Int64(gaddr).ir_value(loc=loc, ip=ip)],
         "cp.async.cg.shared.global [$0], [$1], 16;", "r,l", side=True, loc=loc, ip=ip)


@dsl_user_op
def lds(saddr, n: int, *, loc=None, ip=None):
    """n (2 or 4) 32-bit words from shared memory (one vector load). Side-effecting so it stays after waits."""
    outs = ",".join(f"${i}" for i in range(n))
    res = _asm(llvm.StructType.get_literal([T.i32()] * n), [Int32(saddr).ir_value(loc=loc, ip=ip)],
               f"ld.shared.v{n}.u32 {{{outs}}}, [${n}];", ",".join(["=r"] * n) + ",r", side=True, loc=loc, ip=ip)
    return _words(res, n, loc, ip)


@dsl_user_op
def ldg4_pred(gaddr, pred, *, loc=None, ip=None):
    """16 bytes from global memory (read-only path) if pred != 0, else zeros."""
    res = _asm(llvm.StructType.get_literal([T.i32()] * 4),
               [Int64(gaddr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip)],
               "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $5, 0;\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\tmov.b32 $2, 0;\n\t"
               "mov.b32 $3, 0;\n\t@p ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];\n\t}",
               "=r,=r,=r,=r,l,r", side=True, loc=loc, ip=ip)
    return _words(res, 4, loc, ip)


@dsl_user_op
def ldg2_pred(gaddr, pred, *, loc=None, ip=None):
    """8 bytes from global memory if pred != 0, else zeros."""
    res = _asm(llvm.StructType.get_literal([T.i32()] * 2),
               [Int64(gaddr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip)],
               "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $3, 0;\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\t"
               "@p ld.global.nc.v2.u32 {$0, $1}, [$2];\n\t}",
               "=r,=r,l,r", side=True, loc=loc, ip=ip)
    return _words(res, 2, loc, ip)


@dsl_user_op
def atom_add1_pred(gaddr, pred, fallback, *, loc=None, ip=None) -> Uint32:
    """If pred != 0: atomicAdd(*gaddr, 1) (relaxed, gpu scope) and its old value; else `fallback`. Called with pred
    true in lane 0 only, and not broadcast here, so the caller can delay the shuffle (the wait for the atomic)."""
    return Uint32(_asm(T.i32(), [Int64(gaddr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip),
                                 Uint32(fallback).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .pred p;\n\tsetp.ne.s32 p, $2, 0;\n\tmov.u32 $0, $3;\n\t"
                       "@p atom.relaxed.gpu.global.add.u32 $0, [$1], 1;\n\t}",
                       "=r,l,r,r", side=True, loc=loc, ip=ip))


@dsl_user_op
def atom_add1_acq_rel(gaddr, *, loc=None, ip=None) -> Uint32:
    """atomicAdd(*gaddr, 1) with acquire-release semantics (gpu scope): orders this thread's earlier memory
    operations (its work-counter atomics) before it, and the caller's later stores after every earlier release."""
    return Uint32(_asm(T.i32(), [Int64(gaddr).ir_value(loc=loc, ip=ip)],
                       "atom.acq_rel.gpu.global.add.u32 $0, [$1], 1;", "=r,l", side=True, loc=loc, ip=ip))


@dsl_user_op
def stg_u32(gaddr, val, *, loc=None, ip=None):
    _asm(None, [Int64(gaddr).ir_value(loc=loc, ip=ip), Uint32(val).ir_value(loc=loc, ip=ip)],
         "st.relaxed.gpu.global.u32 [$0], $1;", "l,r", side=True, loc=loc, ip=ip)


@dsl_user_op
def ldg_u32_pred(gaddr, pred, *, loc=None, ip=None) -> Uint32:
    """4 bytes from global memory if pred != 0, else 0 (branch-free, so the wait lands at the first use)."""
    return Uint32(_asm(T.i32(), [Int64(gaddr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\tmov.b32 $0, 0;\n\t"
                       "@p ld.global.u32 $0, [$1];\n\t}", "=r,l,r", side=True, loc=loc, ip=ip))


@dsl_user_op
def ldg_u8_pred(gaddr, pred, *, loc=None, ip=None) -> Uint32:
    """1 byte from global memory (zero-extended) if pred != 0, else 0."""
    return Uint32(_asm(T.i32(), [Int64(gaddr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\tmov.b32 $0, 0;\n\t"
                       "@p ld.global.u8 $0, [$1];\n\t}", "=r,l,r", side=True, loc=loc, ip=ip))


@dsl_user_op
def globaltimer(*, loc=None, ip=None) -> Int64:
    """%globaltimer (ns, one clock for all SMs); side-effecting so it is not moved."""
    return Int64(_asm(T.i64(), [], "mov.u64 $0, %globaltimer;", "=l", side=True, loc=loc, ip=ip))


@dsl_user_op
def clock64(*, loc=None, ip=None) -> Int64:
    """%clock64 (SM cycles); side-effecting so it is not moved."""
    return Int64(_asm(T.i64(), [], "mov.u64 $0, %clock64;", "=l", side=True, loc=loc, ip=ip))


@dsl_user_op
def smid(*, loc=None, ip=None) -> Int32:
    return Int32(_asm(T.i32(), [], "mov.u32 $0, %smid;", "=r", side=True, loc=loc, ip=ip))


# DecodeConfig(trace=True): what each CTA writes into o_part[b, hk*G, split, :TRACE_SLOTS] (fp32, exact integers)
TRACE_FIELDS = ("g0_hi", "g0_lo", "g_span_ns", "c_prologue", "c_first_tile", "c_loop_end", "c_end", "smid", "n_tiles",
                "n_f16", "t_begin")
TRACE_SLOTS = len(TRACE_FIELDS)


@dsl_user_op
def mma16816(a, b, c, is_bf16: bool, *, loc=None, ip=None):
    """D = A(16x16) B(16x8) + C, fp32 accumulate; a: 4 x b32, b: 2 x b32 (f16x2 or bf16x2), c: 4 x f32."""
    ty = "bf16" if is_bf16 else "f16"
    args = [Uint32(x).ir_value(loc=loc, ip=ip) for x in a] + [Uint32(x).ir_value(loc=loc, ip=ip) for x in b]
    args += [Float32(x).ir_value(loc=loc, ip=ip) for x in c]
    res = _asm(llvm.StructType.get_literal([T.f32()] * 4), args,
               f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, "
               "{$8, $9}, {$10, $11, $12, $13};",
               "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def movtrans(x, *, loc=None, ip=None) -> Uint32:
    """Transpose an 8x8 b16 matrix held one row per lane quad (movmatrix.trans)."""
    return Uint32(_asm(T.i32(), [Uint32(x).ir_value(loc=loc, ip=ip)],
                       "movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", loc=loc, ip=ip))


@dsl_user_op
def pack2(lo, hi, is_bf16: bool, *, loc=None, ip=None) -> Uint32:
    """Two fp32 -> f16x2 / bf16x2 (RNE), lo in the low half."""
    ty = "bf16x2" if is_bf16 else "f16x2"
    return Uint32(_asm(T.i32(), [Float32(hi).ir_value(loc=loc, ip=ip), Float32(lo).ir_value(loc=loc, ip=ip)],
                       f"cvt.rn.{ty}.f32 $0, $1, $2;", "=r,f,f", loc=loc, ip=ip))


@dsl_user_op
def prmt(a, b, sel: int, *, loc=None, ip=None) -> Uint32:
    return Uint32(_asm(T.i32(), [Uint32(a).ir_value(loc=loc, ip=ip), Uint32(b).ir_value(loc=loc, ip=ip)],
                       f"prmt.b32 $0, $1, $2, {sel};", "=r,r,r", loc=loc, ip=ip))


@dsl_user_op
def lg2(x, *, loc=None, ip=None) -> Float32:
    return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "lg2.approx.f32 $0, $1;", "=f,f",
                        loc=loc, ip=ip))


@dsl_user_op
def e4m3_bcast_f16(word, i: int, *, loc=None, ip=None) -> Uint32:
    """Byte i of `word` (an E4M3 code) as an f16x2 (s, s) (exact)."""
    sel = 0x4400 | (i << 4) | i
    return Uint32(_asm(T.i32(), [Uint32(word).ir_value(loc=loc, ip=ip)],
                       "{\n\t.reg .b32 t;\n\t.reg .b16 h;\n\t"
                       f"prmt.b32 t, $1, 0, {sel};\n\tcvt.u16.u32 h, t;\n\tcvt.rn.f16x2.e4m3x2 $0, h;\n\t}}",
                       "=r,r", loc=loc, ip=ip))


@dsl_user_op
def unpack2(w, is_bf16: bool, *, loc=None, ip=None):
    """A 16-bit pair (f16x2 or bf16x2) -> two fp32 (low element first)."""
    if is_bf16:
        text = "{\n\t.reg .b32 a, c;\n\tshl.b32 a, $2, 16;\n\tand.b32 c, $2, 0xffff0000;\n\tmov.b32 $0, a;\n\tmov.b32 $1, c;\n\t}"
    else:
        text = "{\n\t.reg .f16 l, h;\n\tmov.b32 {l, h}, $2;\n\tcvt.f32.f16 $0, l;\n\tcvt.f32.f16 $1, h;\n\t}"
    res = _asm(llvm.StructType.get_literal([T.f32()] * 2), [Uint32(w).ir_value(loc=loc, ip=ip)], text, "=f,=f,r",
               loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


def _bfly_max(x, off):
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=off))


def _bfly_sum(x, off):
    return x + cute.arch.shuffle_sync_bfly(x, offset=off)


def _byte(words, i):
    """Byte i of a little-endian list of 32-bit words (as the low byte of a Uint32)."""
    w = words[i // 4]
    return w >> (8 * (i % 4)) if i % 4 else w


# ------------------------------------------------------------------------------------------------- kernels
class ThriftDecodeSplitKV:
    """Split-KV decode kernel for one (head_dim, group size G, dtype) configuration.

    Tensors (contiguous): tiles uint8 [B, NBLK, Hkv, 72D]; k16, v16 [B, CAP, Hkv, D] (input dtype);
    q16 [B, Hq, D] input dtype (the FP16 tiles' query); qr [B, Hq, D] the same type, NVFP4-quantized in the kernel for
    the FP4 tiles (the Hadamard-rotated query when the cache stores rotated K, else q16 again); flags uint8 [B, Hkv, NBLK]
    (1 = read this block from the FP16 cache); work int32 [B, Hkv, KL >= 1] (each head's flagged blocks, -1 after
    them: the FP16 work list of work="dynamic"; must match flags); cnt int32 [B, Hkv, 2] (work="dynamic": zero
    before the launch, and zero again after it -- the last CTA of each head resets its pair); lens int32 [B];
    o_part fp32 [B, Hq, NS, D]; lse_part fp32 [B, Hq, NS]. Scalars: scale_log2 = softmax_scale * log2(e); tiles_per_split.
    scale_rule (static): how qr becomes the FP4 tiles' query. "pre" (what kernels.thrift_decode uses): qr already
    holds dq(NVFP4(q)) in the input dtype (exact: E2M1 x E4M3 products fit fp16/bf16), quantized once per call by the
    prefill quantizer kernel (decode_interface.prequantize_query) -- not once per CTA, which with 128 splits per
    head repeated the same work 128 times on every CTA's critical path (the "mse" rule made that prologue ~18 us
    longer at B=1, 128k). "mse" / "amax": qr is quantized here in registers with that rule (kernels/arch_paths
    .nvfp4_mse_scale with quant.nvfp4.MSE_SCALE_STEPS read at construction). P always uses the amax rule
    (quantized per tile in registers).
    """

    def __init__(self, head_dim: int, group: int, is_bf16: bool, arch: int = 90,
                 config: DecodeConfig = DecodeConfig()):
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
        self.cfg = config
        self.scale_rule = config.scale_rule
        self.mse_steps = mse_scale_steps() if config.scale_rule == "mse" else ()
        self.bits = config.fp4_layout == "bits"
        # fp32 factor that undoes the 2^(FP4_EXP - 14) of the "bits" decode (1 for "nibble")
        self.FOLD = float(2 ** (14 - FP4_EXP)) if self.bits else 1.0
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if not 1 <= group <= 16:
            raise ValueError(f"GQA group size Hq/Hkv must be in [1, 16], got {group}")
        self.D, self.G, self.is_bf16 = head_dim, group, bool(is_bf16)
        self.NG = (group + 7) // 8  # n8 tiles of query heads
        self.TB = tile_bytes(head_dim)
        self.P = config.parts
        self.PB = self.TB // self.P  # bytes of one part (K half = [0, 36D), V half = [36D, 72D))
        self.NSL = config.stages  # ring slots of parts
        self.dynamic = config.work == "dynamic"
        self.path = fp4_math_path(arch)

    @cute.jit
    def __call__(self, mTiles: cute.Tensor, mK16: cute.Tensor, mV16: cute.Tensor,
                 mQ16: cute.Tensor, mQr: cute.Tensor, mFlags: cute.Tensor, mWork: cute.Tensor, mCnt: cute.Tensor,
                 mLens: cute.Tensor, mOp: cute.Tensor, mLse: cute.Tensor, scale_log2: Float32, tiles_per_split: Int32,
                 stream):
        B = mLens.shape[0]
        hkv = mTiles.shape[2]
        nsplit = mLse.shape[2]
        # G > 8 (two n8 head tiles): .minnctapersm 1 lets ptxas use the whole register file -- without it sm_120a
        # D=64 G=16 spilled 24 B at 168 registers. G <= 8: the config's hint (none by default: ptxas then takes
        # ~161 registers; with min_ctas it caps them so that more one-warp CTAs fit).
        # preferred_smem_carveout=100 (the largest shared-memory carveout): shared memory never caps residency below
        # the register limit (Nsight Compute, H100, D=128: 200.7 KB configured, block limits 12 by registers, 13 by
        # shared memory); it also keeps the DSL from querying a device at compile time for a hint > 1.
        minb = 1 if self.NG == 2 else self.cfg.min_ctas
        self.kernel(mTiles, mK16, mV16, mQ16, mQr, mFlags, mWork, mCnt, mLens, mOp, mLse, scale_log2,
                    tiles_per_split).launch(
            grid=(nsplit, hkv, B), block=(32, 1, 1), smem=self.NSL * self.PB + 128, stream=stream,
            min_blocks_per_mp=minb, preferred_smem_carveout=100)

    @cute.kernel
    def kernel(self, mTiles: cute.Tensor, mK16: cute.Tensor, mV16: cute.Tensor,
               mQ16: cute.Tensor, mQr: cute.Tensor, mFlags: cute.Tensor, mWork: cute.Tensor, mCnt: cute.Tensor,
               mLens: cute.Tensor, mOp: cute.Tensor, mLse: cute.Tensor, scale_log2: Float32, tiles_per_split: Int32):
        D, G, NG, TB, bf = self.D, self.G, self.NG, self.TB, self.is_bf16
        NKC = D // 16  # k16 chunks of QK^T; also m16 tiles of V^T
        KW = D // 32  # 32-bit words of K codes per (thread, key)
        lane, _, _ = cute.arch.thread_idx()
        split, hk, b = cute.arch.block_idx()
        TR = self.cfg.trace
        g0 = Int64(0)
        c0 = Int64(0)
        if const_expr(TR):
            g0 = globaltimer()
            c0 = clock64()
        r = lane // 4
        t = lane % 4
        NBLK = mTiles.shape[1]
        CAP = mK16.shape[1]
        HKV = mTiles.shape[2]
        HQ = mQ16.shape[1]
        NS = mLse.shape[2]
        L = mLens[b]

        smem = cutlass.utils.SmemAllocator()
        P, NSL, PB = self.P, self.NSL, self.PB  # parts per FP4 tile, ring slots, bytes per part
        sbuf = smem.allocate_tensor(cutlass.Uint8, cute.make_layout(NSL * PB), byte_alignment=128)
        sbase = sbuf.iterator.toint()
        g_tiles = mTiles.iterator.toint()
        g_k16 = mK16.iterator.toint()
        g_v16 = mV16.iterator.toint()
        g_q16 = mQ16.iterator.toint()
        g_qr = mQr.iterator.toint()  # same shape/strides as q16: the query quantized for the FP4 tiles

        # ---- running state per (ng, column e): head 8*ng + 2*t + e
        m_run = cute.make_rmem_tensor((NG, 2), Float32)
        l_run = cute.make_rmem_tensor((NG, 2), Float32)
        acc_o = cute.make_rmem_tensor((NKC, NG, 4), Float32)
        for ng in cutlass.range_constexpr(NG):
            for e in cutlass.range_constexpr(2):
                m_run[ng, e] = -Float32.inf
                l_run[ng, e] = Float32(0.0)
            for dt in cutlass.range_constexpr(NKC):
                for i in cutlass.range_constexpr(4):
                    acc_o[dt, ng, i] = Float32(0.0)

        # the FP4 tiles' query words (head 8*ng + r, channels t*D/4 ..): loaded first, so their latency overlaps
        # the flag scan below; turned into MMA fragments after the first tile is in flight
        qw_all = []
        for ng in cutlass.range_constexpr(NG):
            g = 8 * ng + r
            off = (Int64(b) * HQ + hk * G + g) * D + t * (D // 4)
            qw = []
            for v in cutlass.range_constexpr(D // 32):
                qw += ldg4_pred(g_qr + off * 2 + 16 * v, Int32(g < G))
            qw_all.append(qw)

        if const_expr(self.dynamic):
            it_n, n16, c1, c2, n_skip = self._dynamic_loop(
                mTiles, mFlags, mWork, mCnt, b, hk, split, NS, L, lane, sbase, qw_all, m_run, l_run, acc_o,
                scale_log2, g_k16, g_v16, g_q16, CAP, HKV, HQ)
        else:
            n_tiles = (L + 63) // 64
            t_begin = split * tiles_per_split
            t_end = cutlass.min(t_begin + tiles_per_split, n_tiles)
            if const_expr(self.cfg.f16_cost > 0):  # equal-cost ranges found from the flags (overrides tiles_per_split)
                if tiles_per_split >= BALANCE_MIN_TILES:  # (shorter splits: the flag scan would be pure fixed cost)
                    t_begin, t_end = self._split_range(mFlags, b, hk, split, NS, L, lane)
            n_it = cutlass.max(t_end - t_begin, 0)
            tile_base = (Int64(b) * NBLK * HKV + hk) * TB  # + blk * HKV * TB

            # Which of the CTA's tiles are FP4, as a 64-bit window of warp ballots (bit i: tile t_begin + 32*w + i,
            # w = it // 32): two flag loads per 32 tiles instead of a dependent global load before every cp.async.
            fm = (Int64(self._fp4_ballot(mFlags, b, hk, t_begin, t_end, L, lane)) & Int64(0xFFFFFFFF)) | (
                Int64(self._fp4_ballot(mFlags, b, hk, t_begin + 32, t_end, L, lane)) << 32)

            c1 = Int64(0)
            c2 = Int64(0)
            n16 = Int32(0)
            if const_expr(TR):
                c1 = clock64()
            # Pipeline over parts (P per FP4 tile; part j = piece j % P of tile t_begin + j // P, ring slot j % NSL):
            # one cp.async commit group per part (empty for FP16 tiles and past the end), issued NSL - 1 parts ahead.
            # Waiting until only the newest NSL - 1 groups are pending means the part about to be read has landed.
            # prologue: parts 0 .. NSL-2
            for j in cutlass.range_constexpr(NSL - 1):
                self._issue_part(fm, j, 0, n_it, g_tiles + tile_base, t_begin, HKV, sbase, lane)
                cute.arch.cp_async_commit_group()

            qf4 = self._query_frags(qw_all)

            for it in cutlass.range(n_it, unroll=1):
                tile = t_begin + it
                rel = it % 32
                if rel == 0 and it > 0:  # slide the flag window by 32 tiles
                    fm = ((fm >> 32) & Int64(0xFFFFFFFF)) | (
                        Int64(self._fp4_ballot(mFlags, b, hk, tile + 32, t_end, L, lane)) << 32)
                # part P*it (K half, or the whole tile) is read now: part P*it + NSL - 1 goes into flight
                self._issue_part(fm, P * it + NSL - 1, it - rel, n_it, g_tiles + tile_base, t_begin, HKV, sbase, lane)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(NSL - 1)
                cute.arch.sync_warp()
                if const_expr(TR):
                    if it == 0:
                        c2 = clock64()
                if ((fm >> rel) & Int64(1)) != Int64(0):
                    self._fp4_step(sbase, it, lane, qf4, m_run, l_run, acc_o, scale_log2,
                                   lambda: self._issue_part(fm, P * it + NSL, it - rel, n_it, g_tiles + tile_base,
                                                            t_begin, HKV, sbase, lane))
                else:
                    if const_expr(P == 2):  # keep one commit group per part
                        self._issue_part(fm, P * it + NSL, it - rel, n_it, g_tiles + tile_base, t_begin, HKV, sbase,
                                         lane)
                        cute.arch.cp_async_commit_group()
                    self._f16_tile(g_k16, g_v16, g_q16, b, hk, tile, L, CAP, HKV, HQ, lane, m_run, l_run, acc_o,
                                   scale_log2)
                    if const_expr(TR):
                        n16 = n16 + 1
                cute.arch.sync_warp()  # every lane is done with this tile's slots before they are refilled
            cute.arch.cp_async_wait_group(0)
            it_n = n_it
            n_skip = t_begin
        c3 = Int64(0)
        if const_expr(TR):
            c3 = clock64()
        # PDL: the combine grid may launch once every CTA got here; its griddepcontrol.wait still waits for this
        # grid's completion and memory flush, so it only overlaps the launch latency with our epilogues.
        cute.arch.griddepcontrol_launch_dependents()

        # ---- epilogue: O/l and LSE of this split
        for ng in cutlass.range_constexpr(NG):
            for e in cutlass.range_constexpr(2):
                ls = l_run[ng, e]
                ls = _bfly_sum(ls, 4)
                ls = _bfly_sum(ls, 8)
                ls = _bfly_sum(ls, 16)
                g = 8 * ng + 2 * t + e
                if g < G:
                    hq = hk * G + g
                    inv_l = Float32(0.0)
                    lse = -Float32.inf
                    if ls > Float32(0.0):
                        inv_l = Float32(1.0) / ls
                        lse = (m_run[ng, e] + lg2(ls)) * Float32(LN2)
                    for dt in cutlass.range_constexpr(NKC):
                        for hh in cutlass.range_constexpr(2):
                            d = (D // 8) * r + 2 * dt + hh
                            mOp[b, hq, split, d] = acc_o[dt, ng, 2 * hh + e] * inv_l
                    if r == 0:
                        mLse[b, hq, split] = lse
        if const_expr(self.dynamic):  # the last CTA of this (b, hk) resets its work counter for the next launch
            if lane == 0:
                cnt = mCnt.iterator.toint() + (Int64(b) * HKV + hk) * 8
                if atom_add1_acq_rel(cnt + 4) == Uint32(NS - 1):
                    stg_u32(cnt, Uint32(0))
                    stg_u32(cnt + 4, Uint32(0))
        if const_expr(TR):
            self._write_trace(mOp, b, hk * G, split, lane, g0, c0, c1, c2, c3, it_n, n16, n_skip)

    # ------------------------------------------------------------------------------------------ pieces
    def _fp4_step(self, sbase, it, lane, qf4, m_run, l_run, acc_o, scale_log2, refill, between=None):
        """The main-loop step of an FP4 tile (both work modes): S^T, the online softmax and P' from the K half in ring
        slot P*it; with parts=2 the K half's slot is then refilled (refill(): issue the next tile's V half) before
        waiting for this tile's V half; then O^T += V'^T P'^T. between() runs after the S half (the dynamic loop
        resolves a work item there) and its result is returned. Traced inline (a plain method taking callables)."""
        P, NSL, PB, NG, D = self.P, self.NSL, self.PB, self.NG, self.D
        sk = sbase + ((P * it) % NSL) * PB
        pb = cute.make_rmem_tensor((4, NG, 2), Uint32)  # P'^T B fragments
        fac = cute.make_rmem_tensor((NG, 2, 2), Float32)  # (alpha, s1) per head column
        self._fp4_qk(sk, lane, qf4, m_run, l_run, pb, fac, scale_log2)
        out = between() if between is not None else None
        if P == 2:  # the K half's slot is free: refill it, then wait for the V half
            cute.arch.sync_warp()
            refill()
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(NSL - 1)
            cute.arch.sync_warp()
            self._fp4_pv(sbase + ((P * it + 1) % NSL) * PB, lane, pb, fac, acc_o)
        else:
            self._fp4_pv(sk + 36 * D, lane, pb, fac, acc_o)
        return out

    @cute.jit
    def _query_frags(self, qw_all):
        """The FP4 tiles' query as B fragments of S^T = K Q^T, from this lane's query words (see kernel)."""
        D, NG, bf = self.D, self.NG, self.is_bf16
        NKC = D // 16
        # ---- (while the first tile is in flight) query fragments (B operand of S^T = K Q^T): head g = 8*ng + r, channels t*D/4 + 4*kc + 0..3.
        # dq(NVFP4(qr)) computed here (qr = the rotated query when the cache holds rotated K): this lane's D/4 channels are whole 16-channel groups, so it quantizes them
        # alone, with the codec's numerics (scale = E4M3_RNE(amax/6), code = E2M1_RNE(|x|/scale) by fp32 true
        # division, sign kept); the values are exact in fp16. scale_rule "mse": the scale is then the best of that one
        # and its E4M3 neighbours (arch_paths.nvfp4_mse_scale, the cache's K/V rule), before the codes.
        qf4 = cute.make_rmem_tensor((NG, NKC, 2), Uint32)
        for ng in cutlass.range_constexpr(NG):
            xs = []
            for w in qw_all[ng]:
                xs += unpack2(w, bf)
            dq = [None] * (D // 4)
            if const_expr(self.scale_rule == "pre"):  # qr = dq(NVFP4(q)) already (exact in fp16)
                dq = xs
            for grp in cutlass.range_constexpr(0 if self.scale_rule == "pre" else D // 64):
                amax = Float32(0.0)
                for i in cutlass.range_constexpr(16):
                    amax = cute.arch.fmax(amax, abs(xs[16 * grp + i]))
                sc = e4m3_rne(amax / Float32(6.0))
                if const_expr(self.scale_rule == "mse"):
                    _, sc = nvfp4_mse_scale(xs[16 * grp:16 * grp + 16], sc, sc > Float32(0.0), self.mse_steps)
                sc_div = cute.arch.fmax(sc, Float32(1e-30))  # scale 0 -> codes saturate, times sc = 0 -> zeros
                for i in cutlass.range_constexpr(16):
                    x = xs[16 * grp + i]
                    val = e2m1_rne(abs(x) / sc_div) * sc
                    dq[16 * grp + i] = -val if x < Float32(0.0) else val
            for kc in cutlass.range_constexpr(NKC):
                qf4[ng, kc, 0] = pack2(dq[4 * kc], dq[4 * kc + 1], False)
                qf4[ng, kc, 1] = pack2(dq[4 * kc + 2], dq[4 * kc + 3], False)
        return qf4

    @cute.jit
    def _resolve(self, item, mFlags, mWork, b, hk, L, KL, n_tiles):
        """Work item `item` (warp-uniform) of (b, hk) -> (tile, kind); kind 0 = nothing to do, 1 = FP4 tile, 2 = FP16
        tile, 3 = past the end. Items: 0 = the partial last tile (FP16 when L % 64), 1 .. KL = mWork[b, hk, :] (the
        selected blocks; -1 or anything >= n_tiles = none), then tile item - 1 - KL (FP4 unless flagged or partial;
        the flagged ones were items of the list). Both loads are predicated, not branched around, so the warp only
        waits where kind / tile are used."""
        n_items = 1 + KL + n_tiles
        in_list = (item >= 1) & (item <= KL)
        in_scan = (item > KL) & (item < n_items)
        widx = cutlass.min(cutlass.max(item - 1, 0), KL - 1)
        e = ldg_u32_pred(mWork.iterator.toint() + ((Int64(b) * mWork.shape[1] + hk) * KL + widx) * 4, Int32(in_list))
        tscan = cutlass.min(cutlass.max(item - 1 - KL, 0), cutlass.max(n_tiles - 1, 0))
        f = ldg_u8_pred(mFlags.iterator.toint() + (Int64(b) * mFlags.shape[1] + hk) * mFlags.shape[2] + tscan,
                        Int32(in_scan))
        tile = tscan
        kind = Int32(0)
        if item == 0:
            tile = n_tiles - 1
            if L % 64 != 0:
                kind = Int32(2)
        if in_list:
            if e < Uint32(n_tiles):  # unsigned: -1 padding is out of range
                tile = Int32(e)
                kind = Int32(2)
        if in_scan:
            if (f == Uint32(0)) & (tscan * 64 + 64 <= L):
                kind = Int32(1)
        if item >= n_items:
            kind = Int32(3)
        return tile, kind

    @cute.jit
    def _issue_piece(self, kind, tile, piece: int, slot, gtile0, HKV, sbase, lane):
        """cp.async piece `piece` of FP4 tile `tile` (if kind == 1) into ring slot `slot` (one part)."""
        PB, TB = self.PB, self.TB
        if kind == 1:
            self._copy_part(gtile0 + Int64(tile) * HKV * TB + piece * PB, sbase + slot * PB, lane)

    @cute.jit
    def _dynamic_loop(self, mTiles, mFlags, mWork, mCnt, b, hk, split, NS, L, lane, sbase, qw_all, m_run, l_run,
                      acc_o, scale_log2, g_k16, g_v16, g_q16, CAP, HKV, HQ):
        """DecodeConfig.work == "dynamic". CTA `split` takes items split and 2 NS - 1 - split without touching the
        counter (the prologue waits for one round of loads, no atomics), then 2 NS + (counter value) until past the
        end.
        Iteration it processes item it; at its top it issues the cp.async of item it+1 (resolved during iteration
        it-1) and fetches the counter value of item it+2, which it resolves between the S and P.V halves of an FP4
        tile (after an FP16 tile): two items reserved ahead, the least that keeps one tile of loads in flight and
        neither the atomic nor the item's loads on the critical path. Ring and commit groups as the static loop."""
        D, NG = self.D, self.NG
        P, NSL, PB, TB = self.P, self.NSL, self.PB, self.TB
        KL = mWork.shape[2]
        n_tiles = (L + 63) // 64
        cnt = mCnt.iterator.toint() + (Int64(b) * HKV + hk) * 8
        gtile0 = mTiles.iterator.toint() + (Int64(b) * mTiles.shape[1] * HKV + hk) * TB
        # the two static rounds go back and forth (CTA s: items s and 2 NS - 1 - s), so the CTAs that drew the
        # costly first items (FP16) draw the last of round two (LPT-like)
        c_tile, c_kind = self._resolve(split, mFlags, mWork, b, hk, L, KL, n_tiles)
        n_tile, n_kind = self._resolve(2 * NS - 1 - split, mFlags, mWork, b, hk, L, KL, n_tiles)
        # lane 0 takes the counter even when the two static rounds cover every item (its values then all resolve past
        # the end): predicating the atomic on that too cost 6 us at B=1, 128k (H100) through ptxas' scheduling
        use_cnt = Int32(lane == 0)
        c1 = Int64(0)
        c2 = Int64(0)
        if const_expr(self.cfg.trace):
            c1 = clock64()
        # prologue: the NSL - 1 parts of item 0 (P = 2: its K and V halves; P = 1: the whole tile)
        for j in cutlass.range_constexpr(NSL - 1):
            self._issue_piece(c_kind, c_tile, j % P, j % NSL, gtile0, HKV, sbase, lane)
            cute.arch.cp_async_commit_group()
        qf4 = self._query_frags(qw_all)
        it = Int32(0)
        n16 = Int32(0)
        n_skip = Int32(0)
        while c_kind != 3:
            # part P*it + NSL - 1 = first piece of item it+1 (both pipelines have one item of look-ahead)
            self._issue_piece(n_kind, n_tile, 0, (P * it + NSL - 1) % NSL, gtile0, HKV, sbase, lane)
            cute.arch.cp_async_commit_group()
            raw = atom_add1_pred(cnt, use_cnt, Uint32(1 + KL + n_tiles))  # item it+2 = 2 NS + raw (lane 0's)
            cute.arch.cp_async_wait_group(NSL - 1)
            cute.arch.sync_warp()
            if const_expr(self.cfg.trace):
                if it == 0:
                    c2 = clock64()
            nn_tile = Int32(0)
            nn_kind = Int32(3)
            if c_kind == 1:  # refill with item it+1's V half; resolve item it+2 between the two halves
                nn_tile, nn_kind = self._fp4_step(
                    sbase, it, lane, qf4, m_run, l_run, acc_o, scale_log2,
                    lambda: self._issue_piece(n_kind, n_tile, 1, (P * it + NSL) % NSL, gtile0, HKV, sbase, lane),
                    lambda: self._resolve(Int32(cute.arch.shuffle_sync(Int32(raw), 0)) + 2 * NS, mFlags, mWork, b,
                                          hk, L, KL, n_tiles))
            else:
                if const_expr(P == 2):
                    self._issue_piece(n_kind, n_tile, 1, (P * it + NSL) % NSL, gtile0, HKV, sbase, lane)
                    cute.arch.cp_async_commit_group()
                if c_kind == 2:
                    self._f16_tile(g_k16, g_v16, g_q16, b, hk, c_tile, L, CAP, HKV, HQ, lane, m_run, l_run, acc_o,
                                   scale_log2)
                    if const_expr(self.cfg.trace):
                        n16 = n16 + 1
                else:
                    if const_expr(self.cfg.trace):
                        n_skip = n_skip + 1
                nn_tile, nn_kind = self._resolve(Int32(cute.arch.shuffle_sync(Int32(raw), 0)) + 2 * NS, mFlags,
                                                 mWork, b, hk, L, KL, n_tiles)
            cute.arch.sync_warp()
            c_tile, c_kind = n_tile, n_kind
            n_tile, n_kind = nn_tile, nn_kind
            it = it + 1
        cute.arch.cp_async_wait_group(0)
        return it, n16, c1, c2, n_skip

    @cute.jit
    def _write_trace(self, mOp, b, hq, split, lane, g0, c0, c1, c2, c3, n_it, n16, t_begin):
        """DecodeConfig.trace: the CTA's timeline into o_part[b, hq, split, :TRACE_SLOTS] (see TRACE_FIELDS);
        cycle counts are relative to entry, c_first_tile = 0 when the split has no tile."""
        c4 = clock64()
        g4 = globaltimer()
        if lane == 0:
            g0l = g0 & Int64(0xFFFFFFFF)
            vals = [g0l >> 16, g0l & Int64(0xFFFF), g4 - g0, c1 - c0, cutlass.max(c2 - c0, Int64(0)), c3 - c0,
                    c4 - c0, Int64(smid()), Int64(n_it), Int64(n16), Int64(t_begin)]
            for i in cutlass.range_constexpr(TRACE_SLOTS):
                mOp[b, hq, split, i] = Float32(vals[i])

    @cute.jit
    def _fp4_ballot(self, mFlags, b, hk, base, t_end, L, lane):
        """Warp ballot: bit i set iff tile base + i (< t_end) is read as FP4 -- not selected and complete (the
        partial last block is always FP16). Each lane loads one flag."""
        tile = base + lane
        is4 = Int32(0)
        if tile < t_end:
            if (mFlags[b, hk, tile] == 0) & (tile * 64 + 64 <= L):
                is4 = Int32(1)
        return cute.arch.vote_ballot_sync(is4 != 0)

    @cute.jit
    def _issue_part(self, fm, j, base_it, n_it, gtile0, t_begin, HKV, sbase, lane):
        """cp.async part j of the CTA's FP4 tiles (piece j % P of tile t_begin + j // P) into ring slot j % NSL, if
        that tile exists and is FP4 (bit j // P - base_it of the flag window fm). The part is contiguous in the tile
        (K half = [0, 36D), V half = [36D, 72D))."""
        P, PB, TB = self.P, self.PB, self.TB
        it_j = j // P
        if it_j < n_it:
            if ((fm >> (it_j - base_it)) & Int64(1)) != Int64(0):
                self._copy_part(gtile0 + Int64(t_begin + it_j) * HKV * TB + (j % P) * PB,
                                sbase + (j % self.NSL) * PB, lane)

    @cute.jit
    def _copy_part(self, gaddr, saddr, lane):
        """One part (PB contiguous bytes of a tile) global -> shared with 16-byte cp.async, 32 lanes per step."""
        n16 = self.PB // 16
        for i in cutlass.range_constexpr((n16 + 31) // 32):
            off = (i * 32 + lane) * 16
            if const_expr((i + 1) * 32 <= n16):
                cp_async16(saddr + off, gaddr + off)
            else:  # D=64 halves: 144 chunks, the last step is partial
                if i * 32 + lane < n16:
                    cp_async16(saddr + off, gaddr + off)

    @cute.jit
    def _split_range(self, mFlags, b, hk, split, NS, L, lane):
        """[t_begin, t_end) of this split with equal cost per split: tile t costs 1 (FP4) or f16_cost (FP16: flag set,
        or the partial last tile); split s starts at the first tile t whose prefix cost c(<t) satisfies
        c(<t) * NS >= s * C (C = the total), so ranges are contiguous, cover every tile once, and may be empty.
        Two passes over the head's flags, 16 per lane per 16-byte load (flags rows are 16-byte aligned with a
        multiple of 16 entries: decode_interface pads them): the total, then both boundaries in one scan."""
        W = self.cfg.f16_cost
        n_tiles = (L + 63) // 64
        n_full = L // 64  # tile n_full (< n_tiles iff L % 64) is the partial one: always FP16
        NBP = mFlags.shape[2]
        row = mFlags.iterator.toint() + (Int64(b) * mFlags.shape[1] + hk) * NBP
        RPG = 4  # rounds of 512 tiles whose loads are issued together (one latency per 2048 tiles and pass)
        n_groups = (n_tiles + 512 * RPG - 1) // (512 * RPG)
        total = Int32(0)
        for grp in cutlass.range(n_groups, unroll=1):
            ws = self._load_flags(row, grp * (512 * RPG) + lane * 16, n_tiles, RPG)
            for k in cutlass.range_constexpr(RPG):
                vm, f16m = self._flag_masks(ws[k], grp * (512 * RPG) + k * 512 + lane * 16, n_tiles, n_full)
                total = total + Int32(cute.arch.popc(vm)) + (W - 1) * Int32(cute.arch.popc(f16m))
        for off in (16, 8, 4, 2, 1):
            total = total + cute.arch.shuffle_sync_bfly(total, offset=off)
        tgt_lo = split * total  # compare prefix * NS against these
        tgt_hi = (split + 1) * total
        lo = n_tiles
        hi = n_tiles
        base = Int32(0)  # prefix cost at the start of the round
        for grp in cutlass.range(n_groups, unroll=1):
            ws = self._load_flags(row, grp * (512 * RPG) + lane * 16, n_tiles, RPG)  # L1-hot since pass 1
            for k in cutlass.range_constexpr(RPG):
                t0 = grp * (512 * RPG) + k * 512 + lane * 16
                vm, f16m = self._flag_masks(ws[k], t0, n_tiles, n_full)
                c = Int32(cute.arch.popc(vm)) + (W - 1) * Int32(cute.arch.popc(f16m))
                inc = c  # inclusive scan of the lanes' costs
                for off in (1, 2, 4, 8, 16):
                    y = cute.arch.shuffle_sync_up(inc, offset=off)
                    if lane >= off:
                        inc = inc + y
                pre = base + inc - c  # prefix cost before this lane's first tile
                f_lo = Int32(16)
                f_hi = Int32(16)
                for i in cutlass.range_constexpr(15, -1, -1):  # backwards: the last hit is the first tile
                    below = Uint32((1 << i) - 1)
                    pre_i = pre + Int32(cute.arch.popc(vm & below)) + (W - 1) * Int32(cute.arch.popc(f16m & below))
                    ok = ((vm >> Uint32(i)) & Uint32(1)) != Uint32(0)
                    if ok & (pre_i * NS >= tgt_lo):
                        f_lo = Int32(i)
                    if ok & (pre_i * NS >= tgt_hi):
                        f_hi = Int32(i)
                m_lo = Uint32(cute.arch.vote_ballot_sync(f_lo < 16))
                m_hi = Uint32(cute.arch.vote_ballot_sync(f_hi < 16))
                if (m_lo != Uint32(0)) & (lo == n_tiles):
                    src = Int32(cute.arch.popc((m_lo & (Uint32(0) - m_lo)) - Uint32(1)))  # lowest lane with a hit
                    lo = cute.arch.shuffle_sync(t0 + f_lo, src)
                if (m_hi != Uint32(0)) & (hi == n_tiles):
                    src = Int32(cute.arch.popc((m_hi & (Uint32(0) - m_hi)) - Uint32(1)))
                    hi = cute.arch.shuffle_sync(t0 + f_hi, src)
                base = base + cute.arch.shuffle_sync(inc, 31)
        if split + 1 == NS:
            hi = n_tiles
        return lo, hi

    def _load_flags(self, row, t0, n_tiles, n):
        """n 16-byte flag loads (tiles t0 + 512*k .. +15, k < n), all issued before any is used."""
        return [ldg4_pred(row + t0 + 512 * k, Int32(t0 + 512 * k < n_tiles)) for k in range(n)]

    def _flag_masks(self, w, t0, n_tiles, n_full):
        """Flags of tiles t0 .. t0+15 (4 words, one byte each) -> 16-bit masks (bit i: tile t0 + i) of the tiles
        that exist and of those read in FP16 (flag set, or the partial last tile)."""
        m = Uint32(0)
        for k in range(4):
            x = (((w[k] & Uint32(0x7F7F7F7F)) + Uint32(0x7F7F7F7F)) | w[k]) & Uint32(0x80808080)  # byte != 0 -> bit 7
            m = m | (((x >> 7) & Uint32(1)) | ((x >> 14) & Uint32(2)) | ((x >> 21) & Uint32(4))
                     | ((x >> 28) & Uint32(8))) << (4 * k)
        nv = cutlass.max(cutlass.min(n_tiles - t0, 16), 0)
        vm = (Uint32(1) << Uint32(nv)) - Uint32(1)
        part = (n_full < n_tiles) & (n_full >= t0) & (n_full < t0 + 16)  # the partial last tile is here
        m = m | (Uint32(part) << Uint32(cutlass.max(cutlass.min(n_full - t0, 15), 0)))
        return vm, m & vm

    def _scale2(self, word, i):
        """Byte i of word (E4M3 group scale) as the f16x2 multiplier of the decode (times 2^FP4_EXP for "bits")."""
        if self.bits:
            return e4m3_bcast_f16_pow2(word, i, FP4_EXP)
        return e4m3_bcast_f16(word, i)

    def _fp4x8(self, w, s2):
        """8 codes of one word -> 4 f16x2 (the decode of the cache's fp4_layout)."""
        if self.bits:
            return fp4x8_f16_bits(w, s2)
        return fp4x8_decode_s2(w, s2, False)

    @cute.jit
    def _fp4_qk(self, sb, lane, qf4, m_run, l_run, pb_out, fac, scale_log2):
        """K half of an FP4 tile (at shared address sb: codes [0, 32D), scales [32D, 36D)): S^T = K' Q'^T, the online
        softmax update of (m, l), and P' quantized with the two-level scheme -> pb_out[c, ng, :] (the B fragments of
        P'^T) and fac[ng, e, :] = (alpha, s1 * FOLD) for the P.V half."""
        D, NG = self.D, self.NG
        NKC, KW = D // 16, D // 32
        KS_OFF = 32 * D
        r = lane // 4
        ks = lds(sb + KS_OFF + lane * (D // 8), D // 32)  # [j][group] scale bytes of this lane's keys
        sl2 = scale_log2 * Float32(self.FOLD)  # S^T comes out 2^-FOLD-scaled with the "bits" decode
        # ---- S^T = K' Q'^T : m-tile c holds keys key(c, r, h) (see kv_cache), columns = heads 2t, 2t+1 (+8ng)
        s_acc = [[None] * NG for _ in range(4)]
        for c in cutlass.range_constexpr(4):
            a = [[None] * 4 for _ in range(NKC)]
            for h in cutlass.range_constexpr(2):
                j = 2 * c + h
                kw = lds(sb + (j * 32 + lane) * (D // 8), KW)
                for w in cutlass.range_constexpr(KW):
                    sbi = j * (D // 64) + w // 2  # scale byte of this word's group
                    if const_expr(w % 2 == 0):
                        s2 = self._scale2(ks[sbi // 4], sbi % 4)
                    hs = self._fp4x8(kw[w], s2)
                    for k in cutlass.range_constexpr(4):
                        a[2 * w + k // 2][h + 2 * (k % 2)] = hs[k]
            for ng in cutlass.range_constexpr(NG):
                acc = [Float32(0.0)] * 4
                for kc in cutlass.range_constexpr(NKC):
                    acc = mma16816(a[kc], [qf4[ng, kc, 0], qf4[ng, kc, 1]], acc, False)
                s_acc[c][ng] = acc
        # ---- two-level P per head column e: x = 2688 * 2^(s - tilemax), NVFP4 over this lane's 16 keys
        for ng in cutlass.range_constexpr(NG):
            pq = [[[None] * 2 for _ in range(2)] for _ in range(4)]  # [c][h][e]
            for e in cutlass.range_constexpr(2):
                vals = [s_acc[c][ng][e + 2 * h] * sl2 for c in range(4) for h in range(2)]
                gm = vals[0]
                for i in cutlass.range_constexpr(1, 8):
                    gm = cute.arch.fmax(gm, vals[i])
                gm = _bfly_max(gm, 4)  # the partner lane (r ^ 1) holds the other 8 keys of the group
                tm = _bfly_max(gm, 8)
                tm = _bfly_max(tm, 16)
                m_old = m_run[ng, e]
                m_new = ceil_f32(cute.arch.fmax(m_old, tm))  # an integer offset (log2 units): kernels/reference.py
                m_run[ng, e] = m_new
                alpha = ex2(m_old - m_new)
                amax = ex2(gm - tm) * Float32(P_SCALE)
                sc = e4m3_rne(amax / Float32(6.0))
                inv = Float32(1.0) / cute.arch.fmax(sc, Float32(1e-30))
                psum = Float32(0.0)
                for c in cutlass.range_constexpr(4):
                    for h in cutlass.range_constexpr(2):
                        p = ex2(vals[2 * c + h] - tm)
                        psum = psum + p
                        pq[c][h][e] = e2m1_rne(p * Float32(P_SCALE) * inv) * sc
                rel = ex2(tm - m_new)
                l_run[ng, e] = l_run[ng, e] * alpha + rel * psum
                fac[ng, e, 0] = alpha
                fac[ng, e, 1] = rel * Float32(self.FOLD / P_SCALE)  # FOLD: a power of two -> exact
            for c in cutlass.range_constexpr(4):
                pb_out[c, ng, 0] = movtrans(pack2(pq[c][0][0], pq[c][0][1], False))
                pb_out[c, ng, 1] = movtrans(pack2(pq[c][1][0], pq[c][1][1], False))

    @cute.jit
    def _fp4_pv(self, sv, lane, pb, fac, acc_o):
        """V half of an FP4 tile (at shared address sv: codes [0, 32D), scales [32D, 36D)):
        O^T = O^T * alpha + s1 * (V'^T P'^T); m-tile dt rows drow(dt, r, hh), k = keys of m-tile c."""
        D, NG = self.D, self.NG
        NKC = D // 16
        vsw = lds(sv + 32 * D + lane * (D // 8), D // 32)
        for dt in cutlass.range_constexpr(NKC):
            vw = lds(sv + (dt * 32 + lane) * 16, 4)
            s0 = self._scale2(vsw[(2 * dt) // 4], (2 * dt) % 4)
            s1 = self._scale2(vsw[(2 * dt + 1) // 4], (2 * dt + 1) % 4)
            h0 = self._fp4x8(vw[0], s0) + self._fp4x8(vw[1], s0)
            h1 = self._fp4x8(vw[2], s1) + self._fp4x8(vw[3], s1)
            for ng in cutlass.range_constexpr(NG):
                acc = [Float32(0.0)] * 4
                for c in cutlass.range_constexpr(4):
                    kx = 4 * (c // 2) + 2 * (c % 2)
                    acc = mma16816([h0[kx], h1[kx], h0[kx + 1], h1[kx + 1]], [pb[c, ng, 0], pb[c, ng, 1]], acc,
                                   False)
                for i in cutlass.range_constexpr(4):
                    e = i % 2
                    acc_o[dt, ng, i] = acc_o[dt, ng, i] * fac[ng, e, 0] + acc[i] * fac[ng, e, 1]

    @cute.jit
    def _f16_tile(self, g_k16, g_v16, g_q16, b, hk, tile, L, CAP, HKV, HQ, lane, m_run, l_run, acc_o, scale_log2):
        D, G, NG, bf = self.D, self.G, self.NG, self.is_bf16
        NKC = D // 16
        r = lane // 4
        t = lane % 4
        valid = L - tile * 64  # keys of this tile that exist (>= 1)
        row0 = Int64(b) * CAP + tile * 64  # token row of key 0 of the tile
        # q16 fragments, same channel mapping as the FP4 path
        qf = [[None] * NKC for _ in range(NG)]
        for ng in cutlass.range_constexpr(NG):
            g = 8 * ng + r
            for kc in cutlass.range_constexpr(NKC):
                off = (Int64(b) * HQ + hk * G + g) * D + t * (D // 4) + 4 * kc
                qf[ng][kc] = ldg2_pred(g_q16 + off * 2, Int32(g < G))
        # ---- S^T: m-tile c rows r, r+8 = keys 16c + r (+8); lane t holds channels t*D/4 .. +D/4.
        # Loads are issued f16_depth m-tiles ahead of the MMAs (the asm keeps program order): these synchronous loads
        # are where a warp waits longest (an Nsight Compute source profile of B=1, 128k put ~20% of all warp samples
        # on the first K and V uses with one m-tile ahead), and an FP16 tile is 3.6x an FP4 tile's bytes.
        def load_k(c):
            kw = [None, None]
            for h in cutlass.range_constexpr(2):
                key = 16 * c + r + 8 * h
                addr = g_k16 + ((row0 + key) * HKV + hk) * (D * 2) + t * (D // 2)
                ws = []
                for v in cutlass.range_constexpr(D // 32):  # D/4 channels = D/2 bytes
                    ws += ldg4_pred(addr + 16 * v, Int32(key < valid))
                kw[h] = ws
            return kw

        def load_v(c):
            wv = []
            for q in cutlass.range_constexpr(4):
                key = 16 * c + 2 * t + (q % 2) + 8 * (q // 2)
                addr = g_v16 + ((row0 + key) * HKV + hk) * (D * 2) + r * (D // 4)
                ws = []
                for v in cutlass.range_constexpr(D // 64):
                    ws += ldg4_pred(addr + 16 * v, Int32(key < valid))
                wv.append(ws)
            return wv

        s_acc = [[None] * NG for _ in range(4)]
        FD = self.cfg.f16_depth  # m-tiles of K (then V) in flight
        kbuf = [load_k(c) for c in range(FD)]
        for c in cutlass.range_constexpr(4):
            kw = kbuf[c]
            if const_expr(c + FD < 4):
                kbuf.append(load_k(c + FD))
            for ng in cutlass.range_constexpr(NG):
                acc = [Float32(0.0)] * 4
                for kc in cutlass.range_constexpr(NKC):
                    a = [kw[0][2 * kc], kw[1][2 * kc], kw[0][2 * kc + 1], kw[1][2 * kc + 1]]
                    acc = mma16816(a, qf[ng][kc], acc, bf)
                s_acc[c][ng] = acc
        vbuf = [load_v(c) for c in range(FD)]  # in flight during the softmax
        pb = [[None] * NG for _ in range(4)]
        for ng in cutlass.range_constexpr(NG):
            pv = [[[None] * 2 for _ in range(2)] for _ in range(4)]
            for e in cutlass.range_constexpr(2):
                vals = [None] * 8
                for c in cutlass.range_constexpr(4):
                    for h in cutlass.range_constexpr(2):
                        key = 16 * c + r + 8 * h
                        v = s_acc[c][ng][e + 2 * h] * scale_log2
                        vals[2 * c + h] = v if key < valid else -Float32.inf
                tm = vals[0]
                for i in cutlass.range_constexpr(1, 8):
                    tm = cute.arch.fmax(tm, vals[i])
                tm = _bfly_max(tm, 4)
                tm = _bfly_max(tm, 8)
                tm = _bfly_max(tm, 16)
                m_old = m_run[ng, e]
                m_new = ceil_f32(cute.arch.fmax(m_old, tm))  # an integer offset (log2 units): kernels/reference.py
                m_run[ng, e] = m_new
                alpha = ex2(m_old - m_new)
                psum = Float32(0.0)
                for c in cutlass.range_constexpr(4):
                    for h in cutlass.range_constexpr(2):
                        p = ex2(vals[2 * c + h] - m_new)
                        psum = psum + p
                        pv[c][h][e] = p
                l_run[ng, e] = l_run[ng, e] * alpha + psum
                for dt in cutlass.range_constexpr(NKC):
                    for hh in cutlass.range_constexpr(2):
                        acc_o[dt, ng, 2 * hh + e] = acc_o[dt, ng, 2 * hh + e] * alpha
            for c in cutlass.range_constexpr(4):
                b0 = movtrans(pack2(pv[c][0][0], pv[c][0][1], bf))
                b1 = movtrans(pack2(pv[c][1][0], pv[c][1][1], bf))
                pb[c][ng] = [b0, b1]
        # ---- O^T += V^T P~^T: chunk c slots (2t, 2t+1 | 2t+8, 2t+9) = keys 16c + 2t + {0, 1} (| + 8);
        # lane r's V^T rows are channels (D/8)*r + 2*dt + hh: D/8 contiguous channels of each key row
        for c in cutlass.range_constexpr(4):
            wv = vbuf[c]
            if const_expr(c + FD < 4):
                vbuf.append(load_v(c + FD))
            for dt in cutlass.range_constexpr(NKC):
                a = [prmt(wv[0][dt], wv[1][dt], 0x5410), prmt(wv[0][dt], wv[1][dt], 0x7632),
                     prmt(wv[2][dt], wv[3][dt], 0x5410), prmt(wv[2][dt], wv[3][dt], 0x7632)]
                for ng in cutlass.range_constexpr(NG):
                    acc = [acc_o[dt, ng, i] for i in range(4)]
                    acc = mma16816(a, pb[c][ng], acc, bf)
                    for i in cutlass.range_constexpr(4):
                        acc_o[dt, ng, i] = acc[i]


class ThriftDecodeCombine:
    """Merge the splits: O = sum_s w_s O_s / sum_s w_s with w_s = exp(lse_s - max lse); LSE = max + log(sum w).
    One CTA of 256 threads per (query head, sequence, 32-channel slice of D) -- B*Hq*D/32 CTAs, so B=1 still
    spreads over 128 CTAs (D=128). Warp w merges splits w, w+8, ... of its slice online (running max, rescaled sums;
    lane = channel: 128-byte coalesced rows; unrolled so the loads of its splits are in flight together: one
    round trip instead of a max pass then a sum pass), then warp 0 merges the 8 warps' (max, sum, O) through shared
    memory. Splits with lse = -inf (no tiles) contribute nothing. Launched with programmatic dependent launch
    (sm_90+): it starts while the split kernel's last CTAs finish and waits (griddepcontrol.wait) for them."""

    NT = 256
    DC = 32  # channels per CTA

    def __init__(self, head_dim: int, is_bf16: bool):
        self.D, self.is_bf16 = head_dim, bool(is_bf16)

    @cute.jit
    def __call__(self, mOp: cute.Tensor, mLse: cute.Tensor, mO: cute.Tensor, mLseOut: cute.Tensor, stream):
        NW = self.NT // 32
        smem_bytes = 4 * (NW + NW * self.DC + NW) + 3 * 128
        self.kernel(mOp, mLse, mO, mLseOut).launch(grid=(mOp.shape[1], mOp.shape[0], self.D // self.DC),
                                                   block=(self.NT, 1, 1), smem=smem_bytes, stream=stream,
                                                   use_pdl=True)

    @staticmethod
    def _merge(m, acc, wsum, ls, o):
        """Online merge of one split (LSE ls, output o) into (max m, sum acc, weight wsum); branch-free, and an
        empty split (ls = -inf) adds nothing."""
        m_new = cute.arch.fmax(m, ls)
        ms = cute.arch.fmax(m_new, Float32(-1e30))  # finite stand-in while every LSE so far is -inf
        f = ex2((m - ms) * Float32(LOG2E))  # 0 while m = -inf
        w = ex2((ls - ms) * Float32(LOG2E))  # 0 for an empty split
        return m_new, acc * f + w * o, wsum * f + w

    @cute.kernel
    def kernel(self, mOp: cute.Tensor, mLse: cute.Tensor, mO: cute.Tensor, mLseOut: cute.Tensor):
        NT, DC = self.NT, self.DC
        NW = NT // 32
        tid, _, _ = cute.arch.thread_idx()
        hq, b, dc = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        NS = mLse.shape[2]
        cute.arch.griddepcontrol_wait()  # launched with PDL behind the split kernel: its results are visible after
        smem = cutlass.utils.SmemAllocator()
        s_m = smem.allocate_tensor(Float32, cute.make_layout(NW), byte_alignment=16)
        s_acc = smem.allocate_tensor(Float32, cute.make_layout(NW * DC), byte_alignment=16)
        s_w = smem.allocate_tensor(Float32, cute.make_layout(NW), byte_alignment=16)
        d = dc * DC + lane
        m = -Float32.inf  # running max of this warp's split LSEs (natural log)
        acc = Float32(0.0)  # sum of exp(lse - m) * O
        wsum = Float32(0.0)  # sum of exp(lse - m)
        U = 8  # splits per warp whose loads are issued together (full groups: straight-line code, no branch)
        n_full = NS // (NW * U)
        for grp in cutlass.range(n_full, unroll=1):
            s0 = grp * (NW * U) + warp
            ls = [mLse[b, hq, s0 + NW * k] for k in range(U)]
            os_ = [mOp[b, hq, s0 + NW * k, d] for k in range(U)]
            for k in cutlass.range_constexpr(U):
                m, acc, wsum = self._merge(m, acc, wsum, ls[k], os_[k])
        for s in cutlass.range(n_full * (NW * U) + warp, NS, NW, unroll=1):  # the rest, one split at a time
            m, acc, wsum = self._merge(m, acc, wsum, mLse[b, hq, s], mOp[b, hq, s, d])
        s_acc[tid] = acc
        if lane == 0:
            s_m[warp] = m
            s_w[warp] = wsum
        cute.arch.sync_threads()
        if warp == 0:
            mx = s_m[0]
            for i in cutlass.range_constexpr(1, NW):
                mx = cute.arch.fmax(mx, s_m[i])
            ms = cute.arch.fmax(mx, Float32(-1e30))
            tot = Float32(0.0)
            wt = Float32(0.0)
            for i in cutlass.range_constexpr(NW):
                f = ex2((s_m[i] - ms) * Float32(LOG2E))  # 0 for a warp that saw only empty splits
                tot = tot + s_acc[i * DC + lane] * f
                wt = wt + s_w[i] * f
            out = Float32(0.0)
            lse = -Float32.inf
            if wt > Float32(0.0):
                out = tot / wt
                lse = mx + lg2(wt) * Float32(LN2)
            mO[b, 0, hq, d] = out.to(mO.element_type)
            if (lane == 0) & (dc == 0):
                mLseOut[b, hq] = lse


# ------------------------------------------------------------------------------------------------ compile
def fake_args(head_dim: int, num_kv_heads: int, group: int, dtype_name: str):
    """Fake tensors (dynamic B, NBLK, CAP, NSPLIT) for cute.compile without a GPU."""
    from cutlass.cute.runtime import make_fake_compact_tensor

    D, H, HQ = head_dim, num_kv_heads, num_kv_heads * group
    dt = cutlass.BFloat16 if dtype_name == "bf16" else cutlass.Float16
    B, NB, CAP, NS, NBP = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()

    def f(dtype, shape, align=16):
        return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)),
                                        assumed_align=align)

    KL = cute.sym_int()
    dec = (f(cutlass.Uint8, (B, NB, H, tile_bytes(D))), f(dt, (B, CAP, H, D)), f(dt, (B, CAP, H, D)),
           f(dt, (B, HQ, D)), f(dt, (B, HQ, D)), f(cutlass.Uint8, (B, H, NBP), 16),
           f(cutlass.Int32, (B, H, KL), 4), f(cutlass.Int32, (B, H, 2), 8),
           f(cutlass.Int32, (B,), 4), f(cutlass.Float32, (B, HQ, NS, D)), f(cutlass.Float32, (B, HQ, NS), 4))
    comb = (dec[9], dec[10], f(dt, (B, 1, HQ, D)), f(cutlass.Float32, (B, HQ), 4))
    return dec, comb


def compile_decode(head_dim: int, num_kv_heads: int, group: int, dtype_name: str = "f16", arch: int = 90,
                   tvm_ffi: bool = False, config: DecodeConfig | None = None, **overrides):
    """cute.compile the decode and combine kernels for the current DSL target. Returns (decode, combine).
    config: the split kernel's DecodeConfig (default DecodeConfig()); keyword overrides replace its fields
    (e.g. scale_rule="mse", parts=1)."""
    import dataclasses

    cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
    dec_args, comb_args = fake_args(head_dim, num_kv_heads, group, dtype_name)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True) if tvm_ffi else cute.runtime.make_fake_stream()
    opts = "--enable-tvm-ffi" if tvm_ffi else None
    kw = {"options": opts} if opts else {}
    bf = dtype_name == "bf16"
    dec = cute.compile(ThriftDecodeSplitKV(head_dim, group, bf, arch, cfg), *dec_args, Float32(1.0), Int32(1), stream,
                       **kw)
    comb = cute.compile(ThriftDecodeCombine(head_dim, bf), *comb_args, stream, **kw)
    return dec, comb
