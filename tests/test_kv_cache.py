"""CPU tests of the FP16 + FP4 decode KV cache (kernels/kv_cache.py) against the reference codecs."""
import pytest
import torch

from kernels import kv_cache as kvc
from kernels.selection import block_means
from quant import nvfp4
from quant.rotation import maybe_rotate


def _rand(B, S, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B, S, H, D), generator=g) * 2).to(dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_tile_layout_roundtrip_and_fragments(D, rng_seed):
    """pack_tiles/unpack_tiles are inverse; the documented fragment ownership holds (each thread's 16 V keys are
    one NVFP4 group; every (key, channel) appears exactly once)."""
    g = torch.Generator().manual_seed(rng_seed)
    nb, H = 3, 2
    kp = torch.randint(0, 256, (1, nb * 64, H, D // 2), generator=g, dtype=torch.uint8)
    ks = torch.randint(0, 127, (1, nb * 64, H, D // 16), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    vp = torch.randint(0, 256, (1, H, D, nb * 32), generator=g, dtype=torch.uint8)
    vs = torch.randint(0, 127, (1, H, D, nb * 4), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    tiles = kvc.pack_tiles(kp, ks, vp, vs)
    assert tiles.shape == (1, nb, H, kvc.tile_bytes(D))
    out = kvc.unpack_tiles(tiles)
    for a, b in zip(out, (kp, ks, vp, vs)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    keys = {kvc.key_of(c, r, h) for c in range(4) for r in range(8) for h in range(2)}
    assert keys == set(range(64))
    rows = {kvc.drow_of(dt, r, hh, D) for dt in range(D // 16) for r in range(8) for hh in range(2)}
    assert rows == set(range(D))
    # P/V group of thread (r, t): rows r, r+8 of sub-tile c hold keys of group r//2 only
    for r in range(8):
        assert {kvc.key_of(c, r, h) // 16 for c in range(4) for h in range(2)} == {r // 2}


def _one_shot_tiles(k, v, L, qk_rotation="hadamard"):
    """Quantize the first L tokens at once (zero-padded to whole blocks) with the codecs (K rotated as the cache
    does by default)."""
    nb = -(-L // 64)
    kpad = torch.zeros((k.shape[0], nb * 64) + tuple(k.shape[2:]), dtype=k.dtype)
    vpad = torch.zeros_like(kpad)
    kpad[:, :L], vpad[:, :L] = k[:, :L], v[:, :L]
    return kvc.quantize_blocks(maybe_rotate(kpad, qk_rotation), vpad)


@pytest.mark.parametrize("dtype,rot", [(torch.float16, "hadamard"), (torch.bfloat16, "hadamard"),
                                       (torch.float16, "none")])
def test_token_by_token_equals_one_shot(dtype, rot, rng_seed):
    """Appending token by token, in chunks, or at once gives bit-identical FP4 tiles (V groups of 16 along the
    sequence re-quantized as they fill), matching the codecs' one-shot quantization (of the rotated K by default)."""
    B, H, D, L = 1, 2, 64, 150
    k, v = _rand(B, L, H, D, dtype, rng_seed), _rand(B, L, H, D, dtype, rng_seed + 1)
    ref = _one_shot_tiles(k, v, L, rot)
    c1 = kvc.ThriftKVCache(B, H, D, capacity=64, dtype=dtype, qk_rotation=rot)  # also grows 64 -> 128 -> 256
    assert c1.qk_rotation == rot
    for i in range(L):
        c1.append(k[:, i:i + 1], v[:, i:i + 1])
    c2 = kvc.ThriftKVCache(B, H, D, capacity=64, dtype=dtype, qk_rotation=rot)
    for a, b in ((0, 17), (17, 64), (64, 65), (65, 150)):
        c2.append(k[:, a:b], v[:, a:b])
    nb = -(-L // 64)
    for c in (c1, c2):
        assert c.lengths == [L] and c.capacity >= L
        assert torch.equal(c.tiles[:, :nb], ref)
        assert torch.equal(c.k16[:, :L], k) and torch.equal(c.v16[:, :L], v)
        assert not c.k16[:, L:].any() and not c.tiles[:, nb:].any()
        assert torch.equal(c.kmean[:, :nb], block_means(k))  # block-aligned recomputation: the same bits
    # the unpacked contract layouts are the codecs' outputs for the same tokens
    kp, ks, vp, vs = c1.fp4_contract(0)
    kp_ref, ks_ref = nvfp4.quantize(maybe_rotate(k, rot), dim=-1, scale_rule="mse")  # the cache's default rule
    assert torch.equal(kp[:, :L], kp_ref) and torch.equal(ks[:, :L].view(torch.uint8), ks_ref.view(torch.uint8))
    vp_ref, vs_ref = nvfp4.quantize(v.permute(0, 2, 3, 1), dim=-1, scale_rule="mse")  # [1, H, D, pad16(L)/2]
    n2, n16 = vp_ref.shape[-1], vs_ref.shape[-1]
    assert torch.equal(vp[..., :n2], vp_ref) and torch.equal(vs[..., :n16].view(torch.uint8), vs_ref.view(torch.uint8))
    assert not vp[..., n2:].any()


def test_batch_per_sequence_lengths(rng_seed):
    """Ragged appends: each sequence's tiles equal its own one-shot quantization; other rows stay zero."""
    B, H, D, T = 3, 1, 128, 80
    dtype = torch.float16
    k, v = _rand(B, T, H, D, dtype, rng_seed), _rand(B, T, H, D, dtype, rng_seed + 7)
    c = kvc.ThriftKVCache(B, H, D, capacity=64, dtype=dtype)
    c.append(k[:, :10], v[:, :10], num_new=[10, 3, 0])
    c.append(k[:, 10:80], v[:, 10:80], num_new=torch.tensor([70, 0, 65]))
    assert c.lengths == [80, 3, 65]
    # sequence 1 got rows 0..2, sequence 2 got rows 10..74 of the inputs
    expect = {0: (k[0:1, :80], v[0:1, :80]), 1: (k[1:2, :3], v[1:2, :3]), 2: (k[2:3, 10:75], v[2:3, 10:75])}
    for b, (kb, vb) in expect.items():
        L = c.lengths[b]
        nb = -(-L // 64)
        assert torch.equal(c.k16[b:b + 1, :L], kb)
        assert torch.equal(c.tiles[b:b + 1, :nb], _one_shot_tiles(kb, vb, L))
        assert not c.tiles[b, nb:].any()
        assert torch.equal(c.kmean[b:b + 1, :nb], block_means(kb))


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        kvc.ThriftKVCache(1, 1, 96)
    with pytest.raises(TypeError, match="dtype"):
        kvc.ThriftKVCache(1, 1, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="qk_rotation"):
        kvc.ThriftKVCache(1, 1, 64, qk_rotation="walsh")
    assert kvc.ThriftKVCache(1, 1, 64).qk_rotation == "hadamard"
    c = kvc.ThriftKVCache(2, 1, 64)
    x = torch.zeros((2, 3, 1, 64), dtype=torch.float16)
    with pytest.raises(ValueError, match="num_new"):
        c.append(x, x, num_new=[4, 0])
    with pytest.raises(ValueError, match="shape"):
        c.append(x[:, :, :, :32], x[:, :, :, :32])
    with pytest.raises(TypeError, match="dtype"):
        c.append(x.float(), x.float())


# ------------------------------------------------------------------------------------- "bits" word layout
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _kernel_bits_decode(words):
    """The "bits" decode of kernels/decode.py fp4x8_f16_bits (before the scale multiply), in int64 arithmetic:
    32-bit words [n] -> f16x2 bit patterns [n, 4] (pair k = elements 2k, 2k+1)."""
    M = 0xFFFFFFFF
    w = words & M
    pairs = [w & 0x8E008E00,
             (w << 3) & M & 0x8E008E00,
             ((w << 6) & M & 0x0E000E00) | ((w << 1) & M & 0x80008000),
             ((w << 9) & M & 0x0E000E00) | ((w << 2) & M & 0x80008000)]
    return torch.stack(pairs, dim=-1)


def test_bits_layout_decode_is_exact_e2m1(rng_seed):
    """Every code in every word position: the kernel's shift-and-mask of a "bits" word gives the fp16 bit pattern
    of exactly E2M1 * 2^-14 (subnormal codes and -0 included), and the layout round-trips."""
    g = torch.Generator().manual_seed(rng_seed)
    # all 16 codes in each of the 8 positions (the other nibbles random) + random words
    base = torch.randint(0, 2 ** 32, (16 * 8 + 4096,), generator=g, dtype=torch.int64)
    for e in range(8):
        for code in range(16):
            i = 16 * e + code
            base[i] = (base[i] & ~(0xF << (4 * e))) | (code << (4 * e))
    nib = torch.where(base >= 2 ** 31, base - 2 ** 32, base).to(torch.int32).view(torch.uint8)
    bits = kvc._permute_code_words(nib, True)
    assert torch.equal(kvc._permute_code_words(bits, False), nib)
    w = bits.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    pairs = _kernel_bits_decode(w)  # [n, 4]
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=-1).reshape(-1, 8)  # element order 0..7
    h16 = torch.where(halves >= 2 ** 15, halves - 2 ** 16, halves).to(torch.int16).view(torch.float16)
    codes = torch.stack([(base >> (4 * e)) & 0xF for e in range(8)], dim=-1)
    want = _E2M1[codes] * 2.0 ** -14
    got = h16.double()
    assert torch.equal(got, want.double())
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0 keeps its sign
    # times every E4M3 scale * 2^7 (the kernel's multiplier): exact in fp16, as the product in float64 says
    sc = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double() * 2.0 ** 7
    prod = (h16[:, None, :].float() * sc[None, :, None].float()).half().double()  # RNE to fp16, as mul.rn.f16x2
    assert torch.equal(prod, got[:, None, :] * sc[None, :, None])


@pytest.mark.parametrize("D", [64, 128])
def test_bits_layout_cache(D, rng_seed):
    """A cache built in the "bits" layout (the default) holds the same codes: relayout of a "nibble" cache's tiles, same
    contract-layout unpacking; pack/unpack round-trip."""
    B, H, L = 1, 2, 150
    k, v = _rand(B, L, H, D, torch.float16, rng_seed), _rand(B, L, H, D, torch.float16, rng_seed + 1)
    c1 = kvc.ThriftKVCache(B, H, D, capacity=64, fp4_layout="nibble")
    c2 = kvc.ThriftKVCache(B, H, D, capacity=64, fp4_layout="bits")
    assert kvc.DEFAULT_FP4_LAYOUT == "bits" and kvc.ThriftKVCache(1, 1, 64).fp4_layout == "bits"
    c1.append(k[:, :70], v[:, :70])
    c1.append(k[:, 70:], v[:, 70:])
    for i in range(L):
        c2.append(k[:, i:i + 1], v[:, i:i + 1])
    nb = -(-L // 64)
    assert not torch.equal(c1.tiles[:, :nb], c2.tiles[:, :nb])
    assert torch.equal(kvc.relayout_tiles(c1.tiles[:, :nb], "nibble", "bits"), c2.tiles[:, :nb])
    for a, b in zip(c1.fp4_contract(0), c2.fp4_contract(0)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with pytest.raises(ValueError, match="fp4_layout"):
        kvc.ThriftKVCache(1, 1, 64, fp4_layout="nibbles")
