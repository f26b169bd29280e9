"""SM120 block-scaled FP4 attention tile (kernels/fp4_mma_sm120.py, layouts/sm120_fp4.py).

No SM120 GPU is available, so correctness is established in two halves:
  * compile tests: the demo kernel compiles for sm_120a, the PTX holds the block-scaled m16n8k64 MMA, ptxas
    reports no spills; the op refuses to be built for sm_90a;
  * a pure-torch emulation of the 32 lanes' registers: operands are gathered from the packed bytes exactly as
    ldmatrix delivers them, the MMA is evaluated from the PTX ISA fragment layouts (A/B/C/scale), and the
    kernel's register-level P quantization (quad shuffles, key permutation, scale-word assembly with prmt) is
    replayed lane by lane. S and P·V must match dq(Q)·dq(K)ᵀ and quantize_p(P~)·dq(V) (relative L2 <= 1e-6).
What the emulation cannot see is the DSL's ldmatrix address arithmetic (swizzle); that needs a GPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from layouts import sm120_fp4 as L
from quant import mxfp4, nvfp4, softmax_p
from quant._fp4common import e2m1_decode, e2m1_encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMTS = {"nvfp4": (nvfp4, 16), "mxfp4": (mxfp4, 32)}


@pytest.fixture
def one_thread():
    """The emulation is thousands of tiny torch ops: intra-op threads only add overhead on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_l2(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------- layout facts


def test_perm_is_involution_and_fixes_c_to_a_mismatch():
    """With K rows permuted, each lane's C columns are exactly the keys its P·V A registers need, in order."""
    tab = L.perm_table(64)
    assert sorted(tab) == list(range(64))
    assert all(L.perm(L.perm(x)) == x for x in range(256))
    for x in range(64):  # the formula of the contract, verified independently of layouts/
        assert L.perm(x) == 32 * (x // 32) + 2 * ((x % 32) // 8) + 8 * ((x % 8) // 2) + x % 2
    for lane in range(32):
        t = lane % 4
        for j in range(8):
            for e in range(2):
                col = 8 * j + 2 * t + e  # C column held by this lane (c_coord, n-block j)
                assert L.c_coord(lane, e)[1] + 8 * j == col
                key = tab[col]  # K smem row `col` holds key perm(col)
                assert key == L.key_of_column(j, e, t)
                # destination: A register r = (h, half), nibble n = 2*(j%4) + e must hold k == key
                reg, nib = 2 * (j // 4), 2 * (j % 4) + e
                assert L.a_coord(lane, reg, nib) == (lane // 4, key)
                assert L.a_coord(lane, reg + 1, nib) == (lane // 4 + 8, key)


def test_swizzle_is_bijective_and_bank_conflict_free():
    for row_bytes in (32, 64):
        offs = {L.swizzle_byte_offset(r, b, row_bytes) for r in range(64) for b in range(row_bytes)}
        assert offs == set(range(64 * row_bytes))
        # one ldmatrix 8x8 b16 matrix: 8 consecutive rows (aligned to 8) x one 16-byte chunk -> 8 distinct
        # 16-byte bank groups of a 128-byte line
        for r0 in range(0, 64, 8):
            for chunk in range(row_bytes // 16):
                groups = {(L.swizzle_byte_offset(r0 + i, 16 * chunk, row_bytes) % 128) // 16 for i in range(8)}
                assert len(groups) == 8
        # 16-byte chunks stay contiguous (cp.async / ldmatrix rows)
        for r in range(8):
            for b in range(0, row_bytes, 16):
                base = L.swizzle_byte_offset(r, b, row_bytes)
                assert [L.swizzle_byte_offset(r, b + i, row_bytes) for i in range(16)] == list(range(base, base + 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="n"):
        L.perm_table(40)
    with pytest.raises(ValueError, match="row_bytes"):
        L.swizzle_bits(48)


# ------------------------------------------------------------------------------------------- emulation
# Hardware model (PTX ISA, mma.m16n8k64 .e2m1, block_scale): see layouts/sm120_fp4.py for the maps used.


def _word(packed_row: torch.Tensor, byte0: int, nbytes: int = 4) -> int:
    """Little-endian word of `nbytes` bytes at byte0 of a uint8 row (what an LDS/ldmatrix lane receives)."""
    return sum(int(packed_row[byte0 + i]) << (8 * i) for i in range(nbytes))


_E2M1 = e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist()  # code -> value


def _nibbles(word: int):
    return [(word >> (4 * i)) & 0xF for i in range(8)]


def _scale_values(code_bytes, fmt):
    t = torch.tensor(code_bytes, dtype=torch.uint8)
    if fmt == "nvfp4":
        return t.view(torch.float8_e4m3fn).double()
    return torch.ldexp(torch.ones(len(code_bytes), dtype=torch.float64), t.long() - 127)


def _coord_maps():
    """Index tensors of the fragment maps (built once from layouts/): A, B nibble -> matrix coords, C -> coords."""
    a = torch.tensor([[[L.a_coord(l, r, i) for i in range(8)] for r in range(4)] for l in range(32)])
    b = torch.tensor([[[L.b_coord(l, r, i) for i in range(8)] for r in range(2)] for l in range(32)])
    c = torch.tensor([[L.c_coord(l, i) for i in range(4)] for l in range(32)])
    return a, b, c


_AMAP, _BMAP, _CMAP = _coord_maps()
_SHIFTS = torch.arange(8) * 4


def _decode_regs(regs) -> torch.Tensor:
    """[32][n] register words -> fp64 E2M1 values [32, n, 8] (nibble i of a word = element i)."""
    w = torch.tensor(regs, dtype=torch.int64)
    return torch.tensor(_E2M1, dtype=torch.float64)[(w[..., None] >> _SHIFTS) & 0xF]


def _mma(a_regs, sfa_words, b_regs, sfb_words, fmt):
    """One warp's m16n8k64 block-scaled MMA from per-lane registers -> per-lane C values [32, 4] (fp64).

    a_regs[l] = 4 ints, sfa_words[l] = int, b_regs[l] = 2 ints, sfb_words[l] = int.
    SFA is read from lanes with lane % 4 in {0, 1} (thread-id selector 0); lanes 2, 3 must agree.
    """
    sf_vec = FMTS[fmt][1]
    nsf = 64 // sf_vec
    A = torch.full((16, 64), float("nan"), dtype=torch.float64)
    B = torch.full((64, 8), float("nan"), dtype=torch.float64)
    A[_AMAP[..., 0], _AMAP[..., 1]] = _decode_regs(a_regs)
    B[_BMAP[..., 0], _BMAP[..., 1]] = _decode_regs(b_regs)
    assert not A.isnan().any() and not B.isnan().any()  # the maps cover every element
    sfa = torch.empty(16, nsf, dtype=torch.float64)
    sfb = torch.empty(8, nsf, dtype=torch.float64)
    for lane in range(32):
        bytes_a = [(sfa_words[lane] >> (8 * q)) & 0xFF for q in range(nsf)]
        if lane % 4 < 2:
            sfa[L.sfa_row(lane)] = _scale_values(bytes_a, fmt)
        else:  # duplicates must carry the same scales (whichever lane pair the hardware reads)
            assert bytes_a == [(sfa_words[lane - 2] >> (8 * q)) & 0xFF for q in range(nsf)]
        sfb[L.sfb_col(lane)] = _scale_values([(sfb_words[lane] >> (8 * q)) & 0xFF for q in range(nsf)], fmt)
    As = A * sfa.repeat_interleave(sf_vec, dim=1)
    Bs = B * sfb.repeat_interleave(sf_vec, dim=1).T
    D = As @ Bs
    return D[_CMAP[..., 0], _CMAP[..., 1]]


def _ldsm_a(packed, row0, kb, lane):
    """A registers of one lane for rows row0..row0+15 and K atom kb (ldmatrix.x4 delivers a_coord's bytes)."""
    regs = []
    for r in range(4):
        row, k = L.a_coord(lane, r, 0)
        regs.append(_word(packed[row0 + row], (64 * kb + k) // 2))
    return regs


def _ldsm_b(packed, n0, kb, lane):
    regs = []
    for r in range(2):
        k, n = L.b_coord(lane, r, 0)
        regs.append(_word(packed[n0 + n], (64 * kb + k) // 2))
    return regs


def _sf_word(scales_u8, row, kb, fmt):
    per = 64 // FMTS[fmt][1]
    return _word(scales_u8[row], per * kb, per)


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))


def _e8m0_code(amax: torch.Tensor) -> torch.Tensor:
    """The kernel's e8m0_ceil_scale, bit for bit (fp32 quotient exponent, +1 if mantissa, +1 correction)."""
    y = (amax.float() / 6.0).view(torch.int32)
    e = (y >> 23) & 0xFF
    e = e + ((y & 0x7FFFFF) != 0).to(torch.int32)
    s = (e << 23).view(torch.float32)
    e = e + (amax.float() > s * 6.0).to(torch.int32)
    return torch.clamp(e, max=254)


def _quantize_p_lanes(P, fmt):
    """Replay Sm120Fp4AttnTile.quantize_p for one warp. P: fp32 [32 lanes, 2 (h), 8 (j), 2 (e)].

    Returns (a_regs [32][4], sfa_words [32], s1 [32, 2]) exactly as the kernel builds them.
    """
    lanes = torch.arange(32)
    quad = lanes.view(8, 4)
    m = P.amax(dim=(2, 3))  # [32, 2]: the lane's 16 values per row half
    m = torch.maximum(m, m[lanes ^ 1])  # shuffle xor 1
    m = torch.maximum(m, m[lanes ^ 2])  # shuffle xor 2
    assert torch.equal(m.view(8, 4, 2)[:, :1].expand(8, 4, 2), m.view(8, 4, 2))
    del quad
    s1 = m / torch.tensor(448.0 * 6.0)  # fp32 true division
    x = torch.where(s1[:, :, None, None] > 0, P / s1[:, :, None, None], torch.zeros(()))
    # A register r = (h = r % 2, half = r // 2), nibble i = 2*(j%4) + e  <-  x[h, 4*half + i//2, e]
    X = torch.empty(32, 4, 8, dtype=torch.float32)
    for r in range(4):
        for i in range(8):
            X[:, r, i] = x[(slice(None),) + L.p_areg_source(r, i)]
    amax = X.amax(dim=2)
    amax = torch.maximum(amax, amax[lanes ^ 1])
    if fmt == "mxfp4":
        amax = torch.maximum(amax, amax[lanes ^ 2])
    a_regs = [[0] * 4 for _ in range(32)]
    sfa = [0] * 32
    if fmt == "nvfp4":
        sc_code = (amax / torch.tensor(6.0)).to(torch.float8_e4m3fn)  # RNE, satfinite (<= 448 here anyway)
        sc = sc_code.float()
        q = torch.where(sc[:, :, None] > 0, X / sc[:, :, None], torch.zeros(()))
        codes = e2m1_encode(q)
        bytes_ = sc_code.view(torch.uint8).long()
        w = [bytes_[:, h] | (bytes_[:, 2 + h] << 8) for h in range(2)]  # cvt_e4m3x2(half0, half1) per h
        mine = [int(w[lane % 2][lane]) for lane in range(32)]
        for lane in range(32):
            other = mine[lane ^ 2]
            b = (lane // 2) % 2
            sel = L.SFA_PRMT_SEL[b]
            sfa[lane] = _prmt(mine[lane], other, sel)
    else:
        ec = _e8m0_code(amax)
        inv = torch.ldexp(torch.ones_like(amax), (127 - ec).float())
        q = torch.where(amax[:, :, None] > 0, X * inv[:, :, None], torch.zeros(()))
        codes = e2m1_encode(q)
        for lane in range(32):
            hs = lane % 2
            sfa[lane] = int(ec[lane, hs]) | (int(ec[lane, 2 + hs]) << 8)
    for lane in range(32):
        for r in range(4):
            a_regs[lane][r] = sum(int(codes[lane, r, i]) << (4 * i) for i in range(8))
    return a_regs, sfa, s1


def _quantize_p_lanes_natural(P, fmt):
    """Replay Sm120Fp4AttnTile.quantize_p_natural (K in natural order): P[lane, h, j, e] is key 8j + 2t + e."""
    lanes = torch.arange(32)
    m = P.amax(dim=(2, 3))
    m = torch.maximum(m, m[lanes ^ 1])
    m = torch.maximum(m, m[lanes ^ 2])
    s1 = m / torch.tensor(448.0 * 6.0)
    x = torch.where(s1[:, :, None, None] > 0, P / s1[:, :, None, None], torch.zeros(()))
    gsize = 2 if fmt == "nvfp4" else 4
    amax = x.reshape(32, 2, 8 // gsize, gsize * 2).amax(dim=3)  # [32, h, group]
    amax = torch.maximum(amax, amax[lanes ^ 1])
    amax = torch.maximum(amax, amax[lanes ^ 2])
    j_group = torch.arange(8) // gsize
    if fmt == "nvfp4":
        sc_code = (amax / torch.tensor(6.0)).to(torch.float8_e4m3fn)
        sc = sc_code.float()[:, :, j_group]  # [32, h, j]
        q = torch.where(sc[..., None] > 0, x / sc[..., None], torch.zeros(()))
        b = sc_code.view(torch.uint8).long()
        words = b[:, :, 0] | (b[:, :, 1] << 8) | (b[:, :, 2] << 16) | (b[:, :, 3] << 24)
    else:
        ec = _e8m0_code(amax)
        inv = torch.ldexp(torch.ones_like(amax), (127 - ec).float())[:, :, j_group]
        q = torch.where(amax[:, :, j_group, None] > 0, x * inv[..., None], torch.zeros(()))
        words = ec[:, :, 0] | (ec[:, :, 1] << 8)
    codes = e2m1_encode(q)  # [32, h, j, e]
    sfa = [int(words[lane, lane % 2]) for lane in range(32)]
    a_regs = [[0] * 4 for _ in range(32)]
    for h in range(2):
        for half in range(2):
            w = [sum(int(codes[lane, h, 4 * half + c, e]) << (8 * c + 4 * e) for c in range(4) for e in range(2))
                 for lane in range(32)]
            m1 = [_prmt(w[l], w[l ^ 1], L.QUAD_T_SEL1[(l % 4) & 1]) for l in range(32)]
            r = [_prmt(m1[l], m1[l ^ 2], L.QUAD_T_SEL2[((l % 4) >> 1) & 1]) for l in range(32)]
            for lane in range(32):
                a_regs[lane][h + 2 * half] = r[lane]
    return a_regs, sfa, s1


def _emulate_tile(q, k, v, fmt, p_fill=None, k_permuted=True):
    """Emulate the demo kernel (4 warps) on fp32 q, k [64, D], v [64, D]. Returns S [64, 64] (logical key
    order), P~ [64, 64] (logical key order) and O = s1 * P'·V' [64, D]."""
    codec, sf_vec = FMTS[fmt]
    D = q.shape[1]
    Qp, Qs = codec.quantize(q, dim=-1)
    Kp, Ks = codec.quantize(k, dim=-1)
    if k_permuted:  # what the quant kernel stores
        Kp, Ks = L.permute_key_rows(Kp, dim=0), L.permute_key_rows(Ks, dim=0)
    col_key = L.key_of_column if k_permuted else (lambda j, e, t: 8 * j + 2 * t + e)
    Vp, Vs = codec.quantize(v.T.contiguous(), dim=-1)  # [D, 32], [D, 64/sf]
    Qs8, Ks8, Vs8 = (t.view(torch.uint8) for t in (Qs, Ks, Vs))
    S = torch.empty(64, 64, dtype=torch.float64)
    Pt = torch.empty(64, 64, dtype=torch.float32)
    O = torch.empty(64, D, dtype=torch.float64)
    for w in range(4):
        accS = torch.zeros(8, 32, 4, dtype=torch.float64)  # n-block, lane, c index
        for kb in range(D // 64):
            a = [_ldsm_a(Qp, 16 * w, kb, lane) for lane in range(32)]
            sfa = [_sf_word(Qs8, 16 * w + L.sfa_row(lane), kb, fmt) for lane in range(32)]
            for j in range(8):
                b = [_ldsm_b(Kp, 8 * j, kb, lane) for lane in range(32)]
                sfb = [_sf_word(Ks8, 8 * j + L.sfb_col(lane), kb, fmt) for lane in range(32)]
                accS[j] += _mma(a, sfa, b, sfb, fmt)
        # lane view [32, h, j, e]; write S out in logical key order with key_of_column
        C = accS.permute(1, 0, 2).reshape(32, 8, 2, 2).permute(0, 2, 1, 3)  # idx = 2h + e -> [lane, h, j, e]
        for lane in range(32):
            g, t = divmod(lane, 4)
            for h in range(2):
                for j in range(8):
                    for e in range(2):
                        S[16 * w + g + 8 * h, col_key(j, e, t)] = C[lane, h, j, e]
        # P~ in registers: exp(S - rowmax) from the (fp32-rounded) accumulators, or a caller-given pattern
        if p_fill is None:
            Sf = C.float()
            mrow = Sf.amax(dim=(2, 3))
            mrow = torch.maximum(mrow, mrow[torch.arange(32) ^ 1])
            mrow = torch.maximum(mrow, mrow[torch.arange(32) ^ 2])
            P = torch.exp((Sf - mrow[:, :, None, None]) * (D ** -0.5))
        else:
            P = torch.empty(32, 2, 8, 2)
            for lane in range(32):
                g, t = divmod(lane, 4)
                for h in range(2):
                    for j in range(8):
                        for e in range(2):
                            P[lane, h, j, e] = p_fill[16 * w + g + 8 * h, col_key(j, e, t)]
        for lane in range(32):
            g, t = divmod(lane, 4)
            for h in range(2):
                for j in range(8):
                    for e in range(2):
                        Pt[16 * w + g + 8 * h, col_key(j, e, t)] = P[lane, h, j, e]
        a_regs, sfa_words, s1 = (_quantize_p_lanes if k_permuted else _quantize_p_lanes_natural)(P, fmt)
        for j in range(D // 8):
            b = [_ldsm_b(Vp, 8 * j, 0, lane) for lane in range(32)]
            sfb = [_sf_word(Vs8, 8 * j + L.sfb_col(lane), 0, fmt) for lane in range(32)]
            c = _mma(a_regs, sfa_words, b, sfb, fmt)
            for lane in range(32):
                g, t = divmod(lane, 4)
                for idx in range(4):
                    row, col = L.c_coord(lane, idx)
                    O[16 * w + row, 8 * j + col] = c[lane, idx] * float(s1[lane, idx // 2])
    return S, Pt, O, (Qp, Qs, Kp, Ks, Vp, Vs)


@pytest.mark.parametrize("fmt,D,k_permuted", [("nvfp4", 128, True), ("nvfp4", 64, True), ("mxfp4", 64, True),
                                              ("nvfp4", 64, False), ("mxfp4", 128, False)])
def test_emulated_register_mapping_reproduces_reference(fmt, D, k_permuted, rng_seed, one_thread):
    torch.manual_seed(rng_seed)
    codec = FMTS[fmt][0]
    q = torch.randn(64, D) * 2.0
    k = torch.randn(64, D)
    v = torch.randn(64, D)
    S, Pt, O, _ = _emulate_tile(q, k, v, fmt, k_permuted=k_permuted)
    ref_S = codec.fake_quantize(q, -1).double() @ codec.fake_quantize(k, -1).double().T
    assert rel_l2(S, ref_S) <= 1e-6
    ref_O = softmax_p.quantize_p(Pt, fmt=fmt, p_tile=64).double() @ codec.fake_quantize(v.T.contiguous(), -1).double().T
    assert rel_l2(O, ref_O) <= 1e-6


def test_emulated_p_path_edge_cases(rng_seed, one_thread):
    """Zero rows (rowmax 0 -> s1 0), zero and tiny 16-key groups (scale 0 / underflow), wide dynamic range."""
    torch.manual_seed(rng_seed)
    D = 64
    for fmt, k_permuted in (("nvfp4", True), ("mxfp4", True), ("nvfp4", False), ("mxfp4", False)):
        codec = FMTS[fmt][0]
        p = torch.exp(torch.randn(64, 64) * 4.0).clamp(max=1.0)
        p[3] = 0.0  # fully masked row
        p[5, 16:32] = 0.0  # a zero group
        p[6, 32:64] = 1e-30  # groups far below the tile max
        p[7, :] = torch.rand(64) * 1e-20  # a row with a tiny max
        q, k, v = torch.randn(64, D), torch.randn(64, D), torch.randn(64, D)
        _, Pt, O, _ = _emulate_tile(q, k, v, fmt, p_fill=p, k_permuted=k_permuted)
        assert torch.equal(Pt, p)
        ref_O = softmax_p.quantize_p(p, fmt=fmt, p_tile=64).double() @ codec.fake_quantize(v.T.contiguous(), -1).double().T
        assert rel_l2(O, ref_O) <= 1e-6
        assert torch.all(O[3] == 0)
        # the tiny-max row is reproduced at its own scale too
        assert rel_l2(O[7], ref_O[7]) <= 1e-6


# ------------------------------------------------------------------------------------------- compile tests

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    from kernels.fp4_mma_sm120 import compile_demo
    out = {{}}
    for d, fmt, perm in {cases!r}:
        c = compile_demo(d, fmt, k_permuted=perm)
        path = os.path.join(os.environ["CUTE_DSL_DUMP_DIR"], f"demo_{{fmt}}_{{d}}_{{perm}}.ptx")
        with open(path, "w") as f:
            f.write(c.artifacts.PTX)
        out[f"{{fmt}}_{{d}}_{{perm}}"] = path
    print("RESULT" + json.dumps(out))
    """
)


def _run_py(script: str, arch: str, dump_dir: str):
    env = dict(os.environ)
    env.update(CUTE_DSL_ARCH=arch, CUTE_DSL_KEEP="ptx", CUTE_DSL_DUMP_DIR=dump_dir, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.compile
def test_demo_compiles_for_sm120a_with_block_scaled_mma_and_no_spills(tmp_path):
    cases = [(128, "nvfp4", True), (64, "mxfp4", True), (64, "nvfp4", False)]
    res = _run_py(_COMPILE_SCRIPT.format(root=ROOT, cases=cases), "sm_120a", str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    paths = json.loads(res.stdout.split("RESULT", 1)[1])
    expect = {
        "nvfp4_128_True": ("mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3", 16 + 16),
        "nvfp4_64_False": ("mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3", 8 + 8),
        "mxfp4_64_True": ("mma.sync.aligned.kind::mxf4.block_scale.scale_vec::2X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue8m0", 8 + 8),
    }
    ptxas = shutil.which("ptxas") or "/usr/local/bin/ptxas"
    for key, path in paths.items():
        ptx = open(path).read()
        instr, count = expect[key]
        # QKᵀ: 8 n-blocks x D/64 K atoms; P·V: D/8 n-blocks x 1
        assert ptx.count(instr) == count, (key, ptx.count(instr))
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx
        assert "cp.async" in ptx
        assert "cvt.rn.satfinite.e2m1x2.f32" in ptx
        if os.path.exists(ptxas):
            r = subprocess.run([ptxas, "-arch=sm_120a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            info = r.stdout + r.stderr
            assert "0 bytes spill stores, 0 bytes spill loads" in info, info
            assert "0 bytes stack frame" in info, info
        else:  # pragma: no cover - the CI image has ptxas
            pytest.skip("ptxas not found")


@pytest.mark.compile
def test_block_scaled_op_refuses_sm90a(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import cutlass
        from cutlass.cute.nvgpu import warp
        from kernels.fp4_mma_sm120 import sm120_fp4_available
        assert not sm120_fp4_available()
        try:
            warp.MmaMXF4NVF4Op(cutlass.Float4E2M1FN, cutlass.Float32, cutlass.Float8E4M3FN)
        except Exception as exc:
            print("RAISED", type(exc).__name__)
        """
    )
    res = _run_py(script, "sm_90a", str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "RAISED" in res.stdout
