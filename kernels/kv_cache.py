"""FP16 + FP4 KV cache for ThriftAttention decode (issue 4, item 1).

Per layer it keeps, for a batch of sequences with their own lengths:
  * ``k16, v16``  [B, cap, Hkv, D] in the input dtype (the selected blocks are read from here; [B, S, H, D] as
    everywhere in the project, so prefill/SDPA can use the same tensors);
  * ``tiles``     uint8 [B, cap/64, Hkv, 72*D]: NVFP4 K (groups of 16 along D) and V (groups of 16 along the
    sequence, from key 0) with their E4M3 scales, one contiguous *decode tile* per (sequence, 64-token block,
    KV head) -- the byte image the decode kernel copies to shared memory with 16-byte cp.async, laid out so that
    every thread then reads its MMA fragments with conflict-free 16-byte loads (see ``tile_layout`` below);
    the group scales follow the cache's ``scale_rule`` (quant.nvfp4's "mse" encoder rule by default, or "amax");
  * ``kmean``     fp32 [B, cap/64, Hkv, D]: per-block K means over the valid tokens (selection).

Appends (prefill chunks or single tokens, per-sequence counts) re-quantize every 64-token block they touch from
the FP16 copy (the part of a block beyond the length is zero, exactly the zero padding of one-shot
quantization), so the cache after any sequence of appends equals quantizing the whole sequence at once, bit for
bit (tests/test_kv_cache.py). Capacity grows geometrically. Pure torch (a block re-quantization per append).

Decode tile layout (D = 64 or 128; lane = 4*r + t, r = lane//4, t = lane%4; c = key sub-tile of 16, h = 0/1):
  key(c, r, h) = 16*(r//2) + 8*(c//2) + 4*(c%2) + 2*h + (r%2)  -- the key held by MMA row r (+8h) of sub-tile c;
      it makes each thread's 16 keys one NVFP4 group of V (and of P), and adjacent nibbles the MMA pairs.
  drow(dt, r, hh) = (D/8)*r + 2*dt + hh                         -- the head-dim row of O^T/V^T row r (+8hh) of
      m-tile dt; each thread's V rows are 16 (D=128) adjacent channels.
  [0, 32D)     K codes   [j=2c+h (8)][lane (32)][D/8 B]: row key(c, r, h), channels [t*D/4, (t+1)*D/4)
  [32D, 36D)   K scales  [lane][j (8)][D/64]: E4M3 of those channels' groups
  [36D, 68D)   V codes   [dt (D/16)][lane][hh (2)][8 B]: channel drow(dt, r, hh), keys 16t..16t+15
  [68D, 72D)   V scales  [lane][dt][hh]: E4M3 of (drow(dt, r, hh), keys 16t..16t+15)

Bit order inside each 32-bit word of the K and V code regions (``fp4_layout``; scales are never permuted). The
word holds 8 E2M1 codes, elements e = 0..7 (the kernel turns them into 4 f16x2 words, pair k = elements 2k, 2k+1):
  * "nibble": element e in bits 4e..4e+3 (code = s<<3 | e1 e0 m), i.e. the contract's packing.
  * "bits" (default since 2026-11-22: bit-identical decode output, 3-12% faster on an H100, profiling/RESULTS.md
    decode section): each code's magnitude field (e1 e0 m, 3 bits) and sign bit moved so that 16-bit half h of pair k is
    an fp16 bit pattern after one shift and mask: s<<15 | (e1 e0 m)<<9 is exactly E2M1 * 2^-14 in fp16 (normal
    codes: exponent e1e0, mantissa m; e = 0 lands in the fp16 subnormals: m * 2^-15). Element e: magnitude at
    bits BITS_POS[e][0].., sign at BITS_POS[e][1]; the kernel builds pair 0 = w & 0x8E008E00, pair 1 =
    (w << 3) & 0x8E008E00, pair 2 = (w << 6 & 0x0E000E00) | (w << 1 & 0x80008000), pair 3 = (w << 9 & 0x0E000E00)
    | (w << 2 & 0x80008000): 5 shifts + 6 logic ops per 8 codes instead of 15 (see kernels/decode.py).
"""
from __future__ import annotations

import functools

import torch

from quant import nvfp4

BLOCK = 64
_DTYPES = (torch.float16, torch.bfloat16)
FP4_LAYOUTS = ("nibble", "bits")
DEFAULT_FP4_LAYOUT = "bits"
# "bits" layout: (first bit of the 3-bit magnitude field, sign bit) of element e of a 32-bit code word
BITS_POS = ((9, 15), (25, 31), (6, 12), (22, 28), (3, 14), (19, 30), (0, 13), (16, 29))


def _check_layout(layout, where):
    if layout not in FP4_LAYOUTS:
        raise ValueError(f"{where}: fp4_layout must be one of {FP4_LAYOUTS}, got {layout!r}")


def _permute_code_words(x, to_bits: bool):
    """uint8 [..., 4n] (contiguous code bytes) -> the same words in the other bit order (nibble <-> bits)."""
    w = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for e, (mb, sp) in enumerate(BITS_POS):
        if to_bits:
            out |= ((w >> (4 * e)) & 7) << mb | ((w >> (4 * e + 3)) & 1) << sp
        else:
            out |= ((w >> mb) & 7) << (4 * e) | ((w >> sp) & 1) << (4 * e + 3)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)
    return out.view(torch.uint8).reshape(x.shape)


def relayout_tiles(tiles, src: str, dst: str):
    """Decode tiles uint8 [..., 72D] in fp4_layout src -> the same tiles in layout dst (a new tensor)."""
    _check_layout(src, "relayout_tiles")
    _check_layout(dst, "relayout_tiles")
    if src == dst:
        return tiles.clone()
    D = tiles.shape[-1] // 72
    out = tiles.clone()
    for a, b in ((0, 32 * D), (36 * D, 68 * D)):  # K codes, V codes
        out[..., a:b] = _permute_code_words(tiles[..., a:b], dst == "bits")
    return out


def tile_bytes(head_dim: int) -> int:
    """Bytes of one decode tile (64 tokens of one KV head): FP4 K + V and their scales, 72*D."""
    return 72 * head_dim


def key_of(c, r, h):
    """Key (0..63) of MMA row r (+8h) of 16-key sub-tile c in the decode tile order (see module docstring)."""
    return 16 * (r // 2) + 8 * (c // 2) + 4 * (c % 2) + 2 * h + (r % 2)


def drow_of(dt, r, hh, head_dim):
    """Head-dim channel of O^T/V^T row r (+8hh) of m-tile dt."""
    return (head_dim // 8) * r + 2 * dt + hh


@functools.lru_cache(maxsize=None)
def _tile_index(head_dim: int):
    """CPU index tensors that gather the contract layouts of one block into the decode tile regions."""
    D = head_dim
    lane = torch.arange(32)
    r, t = lane // 4, lane % 4
    j = torch.arange(8)
    c, h = j // 2, j % 2
    kkey = key_of(c[:, None], r[None, :], h[:, None])  # [8, 32]
    kt = t[None, :].expand(8, 32)
    dt = torch.arange(D // 16)
    hh = torch.arange(2)
    vrow = drow_of(dt[:, None, None], r[None, :, None], hh[None, None, :], D)  # [D/16, 32, 2]
    vt = t[None, :, None].expand(D // 16, 32, 2)
    return kkey, kt, vrow, vt


def pack_tiles(kp, ks, vp, vs, fp4_layout: str = DEFAULT_FP4_LAYOUT):
    """Contract-layout NVFP4 codes of whole 64-token blocks -> decode tiles (code words in `fp4_layout`).

    kp uint8 [N, nb*64, H, D/2], ks e4m3 [N, nb*64, H, D/16] (quantize(k, dim=-1));
    vp uint8 [N, H, D, nb*32], vs e4m3 [N, H, D, nb*4] (quantize(v.permute(0, 2, 3, 1), dim=-1)).
    Returns uint8 [N, nb, H, 72*D]."""
    N, S, H, D2 = kp.shape
    D, nb = 2 * D2, S // BLOCK
    kkey, kt, vrow, vt = (x.to(kp.device) for x in _tile_index(D))
    ksb = ks.view(torch.uint8)
    # K: [N, nb, H, 64, 4, D/8] -> [..., 8, 32, D/8]
    kb = kp.reshape(N, nb, BLOCK, H, 4, D // 8).permute(0, 1, 3, 2, 4, 5)[:, :, :, kkey, kt]
    ksr = ksb.reshape(N, nb, BLOCK, H, 4, D // 64).permute(0, 1, 3, 2, 4, 5)[:, :, :, kkey.T, kt.T]
    # V: [N, H, D, nb, 4, 8] -> [N, nb, H, D, 4, 8] -> [..., D/16, 32, 2, 8]
    vb = vp.reshape(N, H, D, nb, 4, 8).permute(0, 3, 1, 2, 4, 5)[:, :, :, vrow, vt]
    vsr = vs.view(torch.uint8).reshape(N, H, D, nb, 4).permute(0, 3, 1, 2, 4)[:, :, :, vrow.permute(1, 0, 2),
                                                                                vt.permute(1, 0, 2)]
    _check_layout(fp4_layout, "pack_tiles")
    parts = [x.reshape(N, nb, H, -1) for x in (kb, ksr, vb, vsr)]
    if fp4_layout == "bits":
        parts[0], parts[2] = _permute_code_words(parts[0], True), _permute_code_words(parts[2], True)
    return torch.cat(parts, dim=-1)


def unpack_tiles(tiles, fp4_layout: str = DEFAULT_FP4_LAYOUT):
    """Inverse of pack_tiles: uint8 [N, nb, H, 72D] -> (kp, ks, vp, vs) in the contract layouts."""
    _check_layout(fp4_layout, "unpack_tiles")
    if fp4_layout != "nibble":
        tiles = relayout_tiles(tiles, fp4_layout, "nibble")
    N, nb, H, TB = tiles.shape
    D = TB // 72
    kkey, kt, vrow, vt = (x.to(tiles.device) for x in _tile_index(D))
    o = [0, 32 * D, 36 * D, 68 * D, 72 * D]
    kb = tiles[..., o[0]:o[1]].reshape(N, nb, H, 8, 32, D // 8)
    ksr = tiles[..., o[1]:o[2]].reshape(N, nb, H, 32, 8, D // 64)
    vb = tiles[..., o[2]:o[3]].reshape(N, nb, H, D // 16, 32, 2, 8)
    vsr = tiles[..., o[3]:o[4]].reshape(N, nb, H, 32, D // 16, 2)
    kp = torch.empty((N, nb, H, BLOCK, 4, D // 8), dtype=torch.uint8, device=tiles.device)
    ks = torch.empty((N, nb, H, BLOCK, 4, D // 64), dtype=torch.uint8, device=tiles.device)
    kp[:, :, :, kkey, kt] = kb
    ks[:, :, :, kkey.T, kt.T] = ksr
    vp = torch.empty((N, nb, H, D, 4, 8), dtype=torch.uint8, device=tiles.device)
    vs = torch.empty((N, nb, H, D, 4), dtype=torch.uint8, device=tiles.device)
    vp[:, :, :, vrow, vt] = vb
    vs[:, :, :, vrow.permute(1, 0, 2), vt.permute(1, 0, 2)] = vsr
    kp = kp.permute(0, 1, 3, 2, 4, 5).reshape(N, nb * BLOCK, H, D // 2)
    ks = ks.permute(0, 1, 3, 2, 4, 5).reshape(N, nb * BLOCK, H, D // 16).view(torch.float8_e4m3fn)
    vp = vp.permute(0, 2, 3, 1, 4, 5).reshape(N, H, D, nb * 32)
    vs = vs.permute(0, 2, 3, 1, 4).reshape(N, H, D, nb * 4).view(torch.float8_e4m3fn)
    return kp, ks, vp, vs


def quantize_blocks(k, v, fp4_layout: str = DEFAULT_FP4_LAYOUT, scale_rule: str = "mse"):
    """One-shot NVFP4 of whole blocks: k, v [N, nb*64, H, D] (zero beyond the valid tokens) -> decode tiles.
    scale_rule: quant.nvfp4's encoder rule of the K and V group scales ("mse" default, or "amax")."""
    kp, ks = nvfp4.quantize(k, dim=-1, scale_rule=scale_rule)
    vp, vs = nvfp4.quantize(v.permute(0, 2, 3, 1), dim=-1, scale_rule=scale_rule)
    return pack_tiles(kp, ks, vp, vs, fp4_layout)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class ThriftKVCache:
    """FP16 + NVFP4 KV cache of one attention layer for a batch of sequences (see the module docstring).

    cache = ThriftKVCache(batch, num_kv_heads, head_dim, dtype=torch.float16, device="cuda")
    cache.append(k, v)                      # k, v [B, T, Hkv, D]: T new tokens for every sequence
    cache.append(k, v, num_new=[5, 0, 3])   # per-sequence counts (<= T; the rest of the rows is ignored)
    fp4_layout: bit order of the FP4 code words in the tiles ("nibble" or "bits", module docstring); the decode
    kernel reads cache.fp4_layout and decodes accordingly.
    qk_rotation: "hadamard" (default) stores NVFP4 of quant.rotation.hadamard_rotate(k) in the FP4 tiles (thrift_decode
    then rotates q the same way for its FP4 path); "none" stores NVFP4 of k. The FP16 copy and the K block means
    (selection) are always of the unrotated k.
    scale_rule: "mse" (default) chooses the NVFP4 group scales of the FP4 K and V by quant.nvfp4's "mse" encoder rule
    (each group on its own, so appends stay bit-identical to one-shot quantization); "amax" is E4M3_RNE(amax/6).
    thrift_decode quantizes the query with the same rule inside the kernel, thrift_decode_ref uses it for Q, K, V.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, capacity: int = 1024,
                 dtype=torch.float16, device=None, growth: float = 2.0,
                 fp4_layout: str = DEFAULT_FP4_LAYOUT, qk_rotation: str = "hadamard", scale_rule: str = "mse"):
        for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads), ("capacity", capacity)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"ThriftKVCache: {name} must be a positive int, got {val!r}")
        if head_dim not in (64, 128):
            raise ValueError(f"ThriftKVCache: head_dim must be 64 or 128, got {head_dim!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"ThriftKVCache: dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        if not (isinstance(growth, (int, float)) and growth > 1.0):
            raise ValueError(f"ThriftKVCache: growth must be a number > 1, got {growth!r}")
        _check_layout(fp4_layout, "ThriftKVCache")
        from quant.rotation import check_qk_rotation

        self.qk_rotation = check_qk_rotation(qk_rotation, "ThriftKVCache")
        from ._validate import check_scale_rule

        self.scale_rule = check_scale_rule(scale_rule, "ThriftKVCache")
        self.fp4_layout = fp4_layout
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        dev = torch.device(device or "cpu")
        if dev.type == "cuda" and dev.index is None:  # "cuda" -> "cuda:N", so device checks compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.device, self.growth = dtype, dev, float(growth)
        self.lengths = [0] * batch
        self._lens_dev = None
        self.capacity = 0
        self._alloc(_round_up(capacity, BLOCK))

    # ----------------------------------------------------------------------------------------------- storage
    def _alloc(self, cap: int):
        B, H, D, dev = self.batch, self.num_kv_heads, self.head_dim, self.device
        new = dict(
            k16=torch.zeros((B, cap, H, D), dtype=self.dtype, device=dev),
            v16=torch.zeros((B, cap, H, D), dtype=self.dtype, device=dev),
            tiles=torch.zeros((B, cap // BLOCK, H, tile_bytes(D)), dtype=torch.uint8, device=dev),
            kmean=torch.zeros((B, cap // BLOCK, H, D), dtype=torch.float32, device=dev),
        )
        if self.capacity:
            old_cap = self.capacity
            for name, t in new.items():
                n = old_cap if name in ("k16", "v16") else old_cap // BLOCK
                t[:, :n] = getattr(self, name)[:, :n]
        for name, t in new.items():
            setattr(self, name, t)
        self.capacity = cap

    def reserve(self, total: int):
        """Make room for `total` tokens per sequence (geometric growth, multiples of 64)."""
        if total > self.capacity:
            self._alloc(_round_up(max(total, int(self.capacity * self.growth)), BLOCK))

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    def lengths_tensor(self, device=None) -> torch.Tensor:
        """int32 [B] sequence lengths (cached on the device until the next append)."""
        dev = torch.device(device or self.device)
        if self._lens_dev is None or self._lens_dev.device != dev:
            self._lens_dev = torch.tensor(self.lengths, dtype=torch.int32, device=dev)
        return self._lens_dev

    # ------------------------------------------------------------------------------------------------ append
    def append(self, k: torch.Tensor, v: torch.Tensor, num_new=None):
        """Append k, v [B, T, Hkv, D] (the cache's dtype and device). num_new: per-sequence token counts
        (list/tuple/1-D tensor of ints in [0, T]); default T for every sequence."""
        where = "ThriftKVCache.append"
        B, H, D = self.batch, self.num_kv_heads, self.head_dim
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dtype != self.dtype:
                raise TypeError(f"{where}: {name} must have the cache dtype {self.dtype}, got {x.dtype}")
            if x.dim() != 4 or x.shape[0] != B or x.shape[2] != H or x.shape[3] != D:
                raise ValueError(f"{where}: {name} must have shape [B={B}, T, Hkv={H}, D={D}], got {tuple(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"{where}: {name} must be on the cache device {self.device}, got {x.device}")
        if k.shape != v.shape:
            raise ValueError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        T = k.shape[1]
        if num_new is None:
            counts = [T] * B
        else:
            counts = [int(c) for c in (num_new.tolist() if isinstance(num_new, torch.Tensor) else num_new)]
            if len(counts) != B or any(c < 0 or c > T for c in counts):
                raise ValueError(f"{where}: num_new must give {B} counts in [0, {T}], got {counts}")
        self.reserve(max(L + c for L, c in zip(self.lengths, counts)))
        for b, c in enumerate(counts):
            if c == 0:
                continue
            L0 = self.lengths[b]
            self.k16[b, L0:L0 + c] = k[b, :c]
            self.v16[b, L0:L0 + c] = v[b, :c]
            self.lengths[b] = L0 + c
            self._lens_dev = None
            self._requantize(b, L0 // BLOCK, -(-(L0 + c) // BLOCK))

    def _requantize(self, b: int, blk0: int, blk1: int):
        """Re-quantize blocks [blk0, blk1) of sequence b from the FP16 copy (zero past the length)."""
        from .selection import block_means

        t0, t1 = blk0 * BLOCK, blk1 * BLOCK
        kb, vb = self.k16[b:b + 1, t0:t1], self.v16[b:b + 1, t0:t1]
        from quant.rotation import maybe_rotate

        # per-row rotation: token-by-token appends and one append give the same tiles bit for bit
        self.tiles[b:b + 1, blk0:blk1] = quantize_blocks(maybe_rotate(kb, self.qk_rotation), vb, self.fp4_layout,
                                                         self.scale_rule)
        L = self.lengths[b]
        self.kmean[b:b + 1, blk0:blk1] = block_means(self.k16[b:b + 1, t0:L])

    # --------------------------------------------------------------------------------------------- accessors
    def keys(self, b: int) -> torch.Tensor:
        """FP16 keys of sequence b: [1, L, Hkv, D] (a view)."""
        return self.k16[b:b + 1, :self.lengths[b]]

    def values(self, b: int) -> torch.Tensor:
        return self.v16[b:b + 1, :self.lengths[b]]

    def fp4_contract(self, b: int):
        """Sequence b's FP4 data in the contract layouts (kp, ks, vp, vs), for tests and other kernels (K codes are
        of the rotated k when cache.qk_rotation == "hadamard")."""
        nb = -(-self.lengths[b] // BLOCK)
        return unpack_tiles(self.tiles[b:b + 1, :nb], self.fp4_layout)
