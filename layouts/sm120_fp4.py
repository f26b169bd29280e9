"""Register and shared-memory layouts of the SM120 block-scaled FP4 MMA (m16n8k64, E2M1) as used by ThriftAttention.

Pure Python (no CuTe import): the kernels (kernels/fp4_mma_sm120.py), the quant kernel and the CPU emulation
tests all read the mappings from here.

Notation: lane l in 0..31, g = l // 4 (group), t = l % 4 (thread in quad). Sources: PTX ISA "Matrix fragments
for mma.m16n8k64 (.e2m1)" and CUTLASS cute/atom/mma_traits_sm120.hpp (ALayout/BLayout/SFALayout/SFBLayout).

Fragments of one mma.sync.m16n8k64 (row.col, kind::mxf4nvf4 / kind::mxf4):
    A (16 x 64, K-major), 4 x b32 per lane, 8 E2M1 per register, element i of a register in nibble i:
        a0: row g,     k = 8t + i          a2: row g,     k = 32 + 8t + i
        a1: row g + 8, k = 8t + i          a3: row g + 8, k = 32 + 8t + i
    B (64 x 8, K-major = "col"), 2 x b32 per lane:
        b0: col g, k = 8t + i              b1: col g, k = 32 + 8t + i
    C/D (16 x 8) fp32, 4 per lane (identical to m16n8k16):
        c0, c1: row g,     col 2t + {0, 1}  c2, c3: row g + 8, col 2t + {0, 1}
    Scale A (selectors byte-id = thread-id = 0): lane l supplies row g + 8 * (l % 2); byte q of the 32-bit
        register = scale of k in [16q, 16q+16) (nvfp4, scale_vec::4X, ue4m3) or the low 16 bits = 2 ue8m0
        scales of k in [32q, 32q+32) (mxfp4, scale_vec::2X). Lanes with l % 4 in {2, 3} duplicate {0, 1}.
    Scale B: lane l supplies column g (all four quad lanes carry the same word).

ldmatrix: one 8x8 b16 matrix = 8 rows x 16 bytes = 8 rows x 32 E2M1; lane l receives row l // 4, bytes
4t..4t+3 = k 8t..8t+7 -> exactly an A/B register. So ``ldmatrix.x4`` (no .trans; FP4 has no transposing
ldmatrix, every operand must be K-major in smem) gives a0..a3 (matrices: rows 0-7/k 0-31, rows 8-15/k 0-31,
rows 0-7/k 32-63, rows 8-15/k 32-63) or two n-blocks of B.

The C -> A mismatch and the key permutation (the mapping chosen)
------------------------------------------------------------------
S = Q·Kᵀ leaves lane (g, t) holding, for each n-block j = 0..7 of the 64-key tile, S columns 8j + 2t + e
(e = 0, 1). The P·V A fragment wants, in register a0, the 8 consecutive keys 8t .. 8t+7. Instead of shuffling,
the K rows of every 32-key group are stored permuted in shared/global memory:

    K smem row c holds key perm(c),   perm(c) = 2*(c//8) + 8*((c%8)//2) + c%2  (within each 32-key group)

Writing c = 8a + 2b + e (a, b in 0..3): perm swaps the two 2-bit fields, perm(8a + 2b + e) = 8b + 2a + e; it is
an involution (perm(perm(c)) = c), so "row c holds key perm(c)" and "key x is stored in row perm(x)" are the
same statement. Then S column 8j + 2t + e = key 32*(j//4) + 8t + 2*(j%4) + e, and lane (g, t) holds exactly
keys {8t..8t+7} and {32+8t..32+8t+7} of its rows, already in nibble order:

    A register r = (h = r % 2, half = r // 2), nibble n = 2*(j % 4) + e  <-  C value (e, h) of n-block j = 4*half + n//2

    S (C layout) of one warp, row g, as stored columns -> keys (64-key tile, t = lane % 4):

      n-block j :   0       1       2       3    |   4       5       6       7
      columns   : 0..7    8..15  16..23  24..31  | 32..39  40..47  48..55  56..63
      lane t has: 2t,2t+1 in each n-block
      key       : 8t+0,1  8t+2,3  8t+4,5  8t+6,7 | 32+8t+0,1   ...          32+8t+6,7
                  '------- a0 (row g) / a1 (row g+8) ------'   '---- a2 / a3 ----'
                  nibbles 0,1   2,3     4,5     6,7

    K rows in smem (first 32-key group; keys listed per stored row c):
      c : 0  1  2  3  4  5  6  7 |  8  9 10 11 12 13 14 15 | 16 ... | 24 ...
      key: 0  1  8  9 16 17 24 25 |  2  3 10 11 18 19 26 27 |  4 ... |  6  7 14 15 22 23 30 31

The P scale groups come out quad-local too: keys 16q..16q+15 of a half live in lanes t = 2q', 2q'+1 (q = 2*half
+ q'), so the nvfp4 amax is one xor-1 shuffle; mxfp4's 32-key groups are the whole quad (xor 1 and xor 2).
V is *not* permuted (its K dim is the key axis and its rows are head-dim indices), nor are Q, the scales of V,
or the output. Masking must use the logical key: ``key_of_column(j, e, t)``.
Ks (scales of K, per row) is permuted with the K rows. Tails: the permutation acts inside aligned 32-key groups
starting at key 0; a partial last group is zero padded to 32 before permuting (padding rows are masked anyway).

Shared-memory tiles (one stage; byte view written by cp.async/TMA, FP4 view read by ldmatrix):
    Q, K : [64 rows, D/2 bytes]; 16-byte chunk index XOR (row >> 1 ... ) via Swizzle<B, 4, 3> in bytes
           (B = log2(D/2/16): D=64 -> B=1, D=128 -> B=2); as an FP4 view Swizzle<B, 5, 3> in nibbles.
           Conflict-free for ldmatrix (8 rows x 16 B hit 8 distinct 16-B bank groups) and for 16-B cp.async.
    Vᵀ   : [D rows, 32 bytes (64 keys)], Swizzle<1, 4, 3> (bytes) / Swizzle<1, 5, 3> (nibbles).
    scales: Qs/Ks [64, D/16] bytes (mxfp4 [64, D/32]), Vs [D, 4] bytes (mxfp4 [D, 2]); row-major, unswizzled,
           16-byte aligned (read with LDS.32 / LDS.16: one word per MMA atom).
"""

from __future__ import annotations

TILE_M = 64
TILE_N = 64
PERM_GROUP = 32


def perm(x: int) -> int:
    """Permutation inside a 32-key group: stored row c holds key perm(c) (an involution)."""
    base, c = divmod(int(x), PERM_GROUP)
    return base * PERM_GROUP + 2 * (c // 8) + 8 * ((c % 8) // 2) + c % 2


def perm_table(n: int = PERM_GROUP):
    """[perm(0), ..., perm(n-1)] for n a multiple of 32."""
    if n % PERM_GROUP:
        raise ValueError(f"n: expected a multiple of {PERM_GROUP}, got {n}")
    return [perm(i) for i in range(n)]


def permute_key_rows(x, dim: int = 1):
    """Reorder the key axis ``dim`` of a torch tensor so that stored row c holds key perm(c).

    The key axis length must be a multiple of 32 (pad first). Applies equally to packed Kp and to Ks.
    """
    import torch

    n = x.shape[dim]
    idx = torch.tensor(perm_table(n), device=x.device, dtype=torch.long)
    return x.index_select(dim, idx)


def key_of_column(j: int, e: int, t: int) -> int:
    """Logical key (0..63) of S accumulator element (e, h, 0, j) of a lane with t = lane % 4 (any h)."""
    return 32 * (j // 4) + 8 * t + 2 * (j % 4) + e


def p_areg_source(reg: int, nib: int):
    """(h, j, e) of the S/P accumulator element that goes to nibble ``nib`` of P·V A register ``reg``.

    Only valid with the permuted K rows; used verbatim by the kernel and by the CPU emulation test.
    """
    return reg % 2, 4 * (reg // 2) + nib // 2, nib % 2


# prmt selectors assembling the nvfp4 P scale word (SFA) from this lane's 16-bit pair `mine` (groups t//2 and
# 2 + t//2 of its row) and the xor-2 partner's `other`: byte q must be group q. Lanes with (lane//2) % 2 == 0
# hold groups {0, 2} -> [mine.b0, other.b0, mine.b1, other.b1]; the others -> [other.b0, mine.b0, other.b1, mine.b1].
SFA_PRMT_SEL = (0x5140, 0x1504)


# Natural key order (K not permuted; Sm120Fp4AttnTile.quantize_p_natural): lane t builds word W_t whose byte c holds
# the codes of its n-block 4*half + c (e = 0 low nibble, 1 high); the A register needs R_t with byte c = W_c's
# byte t: a 4x4 byte transpose across the quad, done as (xor-1 exchange, prmt with QUAD_T_SEL1[t & 1]) then
# (xor-2 exchange, prmt with QUAD_T_SEL2[(t >> 1) & 1]).
QUAD_T_SEL1 = (0x6240, 0x3715)
QUAD_T_SEL2 = (0x5410, 0x3276)


def swizzle_bits(row_bytes: int) -> int:
    """B of Swizzle<B, 4, 3> (bytes) for rows of ``row_bytes`` (32 or 64)."""
    table = {32: 1, 64: 2}
    if row_bytes not in table:
        raise ValueError(f"row_bytes: expected 32 or 64, got {row_bytes}")
    return table[row_bytes]


def swizzle_byte_offset(row: int, byte: int, row_bytes: int) -> int:
    """Byte offset of (row, byte) in a swizzled tile: Swizzle<B,4,3>(row * row_bytes + byte)."""
    b = swizzle_bits(row_bytes)
    off = row * row_bytes + byte
    mask = ((1 << b) - 1) << 4
    return off ^ ((off >> 3) & mask)


# ------------------------------ fragment maps (lane, index) -> matrix coordinates ------------------------------


def a_coord(lane: int, reg: int, nib: int):
    """(row, k) of nibble ``nib`` of A register ``reg`` (0..3) in lane ``lane`` (m16n8k64 E2M1)."""
    g, t = divmod(lane, 4)
    return g + 8 * (reg % 2), 32 * (reg // 2) + 8 * t + nib


def b_coord(lane: int, reg: int, nib: int):
    """(k, n) of nibble ``nib`` of B register ``reg`` (0..1)."""
    g, t = divmod(lane, 4)
    return 32 * reg + 8 * t + nib, g


def c_coord(lane: int, idx: int):
    """(row, col) of accumulator element idx = e + 2h (CuTe order (e, h); PTX c0..c3)."""
    g, t = divmod(lane, 4)
    e, h = idx % 2, idx // 2
    return g + 8 * h, 2 * t + e


def sfa_row(lane: int) -> int:
    """Row of the 16-row A tile whose scales lane ``lane`` supplies (byte q = K-group q)."""
    return lane // 4 + 8 * (lane % 2)


def sfb_col(lane: int) -> int:
    """Column (n) of the 8-column B tile whose scales lane ``lane`` supplies."""
    return lane // 4
