"""Shared-memory layouts of the fused prefill kernel and the byte map of its aliased region.

Byte map (one CTA; D = head_dim, Tm = tile_m = 64, Tn = tile_n = 64, S = schedule.stages,
kv16 = Tn*D*2 bytes = one 16-bit K (or V) tile; every piece starts on a 128 B boundary, the
aliased region on a 1024 B boundary):

    [0, q16)                sQ: 16-bit Q tile (Tm x D, 128 B-swizzled rows).  Phase 1 holds the
                            decoded FP4 Q (exact fp16/bf16 values of dq(Q), times 2^(FP4_EXP-14) from "bits"
                            code words); phase 2 overwrites it with
                            the real fp16/bf16 Q (loaded only if the CTA has a selected tile).
                            (qk_rotation="hadamard", the default: the FP4 Q/K -- Qp/Qs, Kp/Ks, dq(K) -- are
                            of the Hadamard-rotated Q/K, quant/rotation.py; the 16-bit Q and K are unrotated.
                            Q.K^T is the same either way, so the kernel does not know. Likewise the E4M3
                            group scales of Qp/Kp/Vp are chosen by the quantizer's scale_rule -- "mse" by
                            default, quant.nvfp4 -- an encoder choice: the stored format is unchanged.)
    [R, R + region)         the aliased region, R = round_up(q16, 1024):
      phase 1 (FP4)   R + 0             kdec: decoded K tile, 16-bit, same layout as a phase-2 K tile
                      R + kv16          vdec: decoded V^T tile (D x Tn, keys contiguous), 16-bit
                      R + 2*kv16 + s*fp4_stage, s < S: FP4 stage s =
                                        kp  Tn x D/2   packed E2M1 K rows (K-major, = Kp rows)
                                        ks  Tn x D/16  E4M3 K scales
                                        vp  D x Tn/2   packed E2M1 V^T rows (keys contiguous, = Vp)
                                        vs  D x Tn/16  E4M3 V scales (groups of 16 keys)
                                        (the code words' bit order, nibble or "bits", is the quantizer's
                                        fp4_layout = kernels.prefill.fp4_word_layout; the bytes are the same size)
      phase 2 (FP16)  R + t*kv16, t < 2: FP16 K stage t (Tn x D);  R + 2*kv16 + t*kv16: FP16 V stage t
    region = max(2*kv16 + S*fp4_stage, fp16_stages*2*kv16)   (fp16_stages = schedule.fp16_stages, 2 or 1; with 1
    the single FP16 K/V stage sits at R + 0 / R + kv16, where kdec / vdec lived)

SM90 dq16 schedules (kv_dq16, an opt-in experiment; default is the FP4 path above): phase 1 streams the 16-bit dq(K)/dq(V) tiles through the
phase-2 stage buffers (FP16 K/V stages t < 2) and leaves kdec/vdec and the FP4 stages unused; same total.

So the FP16 K stages of phase 2 overwrite the decoded tiles and the V stages overwrite the FP4 stages
of phase 1 (V stage 0 starts at R + 2*kv16, exactly where FP4 stage 0 lived); phase 2 starts only
after every warp passed the CTA barrier that ends phase 1.  The SM120 block-scaled path reads the FP4 stages
directly and leaves kdec/vdec unused (the map is kept identical so the kernel body is shared).

D=128, S=2: q16 = 16 KiB, kv16 = 16 KiB, fp4_stage = 9 KiB -> region = max(50, 64) KiB, total 80 KiB
(fits the 99 KiB of sm_120).  D=64 halves everything.
"""
from __future__ import annotations

from dataclasses import dataclass


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class PrefillSmemMap:
    """Byte offsets (relative to the start of dynamic shared memory) of every tile of the kernel."""

    head_dim: int
    tile_m: int = 64
    tile_n: int = 64
    stages: int = 2
    elem_bytes: int = 2
    fp16_stages: int = 2

    @property
    def q16(self) -> int:
        return self.tile_m * self.head_dim * self.elem_bytes

    @property
    def kv16(self) -> int:
        return self.tile_n * self.head_dim * self.elem_bytes

    # FP4 stage pieces (bytes)
    @property
    def kp_bytes(self) -> int:
        return self.tile_n * self.head_dim // 2

    @property
    def ks_bytes(self) -> int:
        return self.tile_n * self.head_dim // 16

    @property
    def vp_bytes(self) -> int:
        return self.head_dim * self.tile_n // 2

    @property
    def vs_bytes(self) -> int:
        return self.head_dim * self.tile_n // 16

    @property
    def kp_off(self) -> int:
        return 0

    @property
    def ks_off(self) -> int:
        return _up(self.kp_off + self.kp_bytes, 128)

    @property
    def vp_off(self) -> int:
        return _up(self.ks_off + self.ks_bytes, 128)

    @property
    def vs_off(self) -> int:
        return _up(self.vp_off + self.vp_bytes, 128)

    @property
    def fp4_stage(self) -> int:
        return _up(self.vs_off + self.vs_bytes, 1024)

    @property
    def region_off(self) -> int:
        return _up(self.q16, 1024)

    @property
    def kdec_off(self) -> int:
        return self.region_off

    @property
    def vdec_off(self) -> int:
        return self.region_off + self.kv16

    def fp4_stage_off(self, s: int) -> int:
        return self.region_off + 2 * self.kv16 + s * self.fp4_stage

    def fp16_k_off(self, t: int) -> int:
        return self.region_off + t * self.kv16

    def fp16_v_off(self, t: int) -> int:
        return self.region_off + self.fp16_stages * self.kv16 + t * self.kv16

    @property
    def region_bytes(self) -> int:
        return max(2 * self.kv16 + self.stages * self.fp4_stage, self.fp16_stages * 2 * self.kv16)

    @property
    def total_bytes(self) -> int:
        return self.region_off + self.region_bytes

    def describe(self) -> str:
        rows = [f"sQ            [0, {self.q16})"]
        rows.append(f"kdec (ph1)    [{self.kdec_off}, {self.kdec_off + self.kv16})")
        rows.append(f"vdec (ph1)    [{self.vdec_off}, {self.vdec_off + self.kv16})")
        for s in range(self.stages):
            o = self.fp4_stage_off(s)
            rows.append(f"fp4 stage {s}   [{o}, {o + self.fp4_stage})  kp+{self.kp_off} ks+{self.ks_off} vp+{self.vp_off} vs+{self.vs_off}")
        for t in range(self.fp16_stages):
            rows.append(f"fp16 K{t} (ph2) [{self.fp16_k_off(t)}, {self.fp16_k_off(t) + self.kv16})")
            rows.append(f"fp16 V{t} (ph2) [{self.fp16_v_off(t)}, {self.fp16_v_off(t) + self.kv16})")
        rows.append(f"total         {self.total_bytes} B")
        return "\n".join(rows)


@dataclass(frozen=True)
class PrefillWSSmemMap:
    """Byte map of the warp-specialized prefill (kernels/prefill_ws.py): one producer warpgroup fills a `ring`-stage
    16-bit ring that `consumers` consumer warpgroups (64-row query blocks) read -- first every FP4 key tile decoded
    once (phase 1), then each consumer's selected 16-bit K/V tiles (phase 2, cp.async).

        [0, n*q16)                     sQ[c], c < n = consumers: consumer c's Q tile (decoded FP4 Q in phase 1,
                                       the real 16-bit Q in phase 2, O in the epilogue); stage mode = c, stride q16
        R = round_up(n*q16, 1024), the ring (stages r < ring):
                    R + r*kv16                kring[r]: phase 1 the decoded K tile (Tn x D, fp16), phase 2 a
                                              16-bit K tile (Tn x D, input dtype)
                    R + (ring + r)*kv16       vring[r]: phase 1 the decoded V^T tile (D x Tn, fp16), phase 2 a
                                              16-bit V tile (Tn x D, input dtype; read through a V^T view)
                    R + 2*ring*kv16 + s*fp4_stage  FP4 stage s < S (the producer's cp.async ring for phase 1;
                                              pieces as PrefillSmemMap's)
        meta_off: 2 x int32 per ring stage (key tile index, -1 = end of stream; which consumers use it, and as what)
        mbar_off: full[r] (128 + 1 producer arrivals), empty[r] (128 n consumer arrivals), 8 B each

    D=128, S=2: 2 consumers, ring 2: 32 + 64 + 18 KiB + 48 B = 114 KiB; 3 consumers, ring 3: 48 + 96 + 18 KiB =
    162 KiB, ring 4: 194 KiB (one CTA of 384 / 512 threads per SM either way; registers allow no second one)."""

    head_dim: int
    tile_m: int = 64
    tile_n: int = 64
    stages: int = 2
    ring: int = 2
    consumers: int = 2

    def _fp4(self) -> PrefillSmemMap:
        return PrefillSmemMap(self.head_dim, self.tile_m, self.tile_n, self.stages, fp16_stages=1)

    @property
    def q16(self) -> int:
        return self.tile_m * self.head_dim * 2

    @property
    def kv16(self) -> int:
        return self.tile_n * self.head_dim * 2

    @property
    def fp4_stage(self) -> int:
        return self._fp4().fp4_stage

    @property
    def region_off(self) -> int:
        return _up(self.consumers * self.q16, 1024)

    @property
    def kring_off(self) -> int:
        return self.region_off

    @property
    def vring_off(self) -> int:
        return self.region_off + self.ring * self.kv16

    @property
    def fp4_base(self) -> int:
        return self.region_off + 2 * self.ring * self.kv16

    @property
    def region_bytes(self) -> int:
        return 2 * self.ring * self.kv16 + self.stages * self.fp4_stage

    @property
    def meta_off(self) -> int:
        return self.region_off + self.region_bytes

    @property
    def mbar_off(self) -> int:
        return _up(self.meta_off + 8 * self.ring, 8)

    @property
    def total_bytes(self) -> int:
        return self.mbar_off + 2 * self.ring * 8

    def describe(self) -> str:
        rows = [f"sQ[c<{self.consumers}]     [0, {self.consumers * self.q16})"]
        for name, off, what in (("kring", self.kring_off, "K"), ("vring", self.vring_off, "V")):
            for r in range(self.ring):
                rows.append(f"{name} {r}       [{off + r * self.kv16}, {off + (r + 1) * self.kv16})  "
                            f"(decoded {what} in phase 1, 16-bit {what} in phase 2)")
        for s_ in range(self.stages):
            o = self.fp4_base + s_ * self.fp4_stage
            rows.append(f"fp4 stage {s_}   [{o}, {o + self.fp4_stage})")
        rows.append(f"meta          [{self.meta_off}, {self.meta_off + 8 * self.ring})")
        rows.append(f"mbarriers     [{self.mbar_off}, {self.total_bytes})")
        rows.append(f"total         {self.total_bytes} B")
        return "\n".join(rows)


def smem_tile_layout_16b(rows: int, cols: int):
    """Swizzled K-major 16-bit tile (rows x cols, cols contiguous): 8-row x 64-col atoms with a
    Swizzle<3,3,3> (128 B rows, conflict-free ldmatrix), or 8 x 32 with Swizzle<2,3,3> for 32-col tiles.
    Must be called inside a CuTe JIT context."""
    import cutlass.cute as cute

    kblk = 64 if cols % 64 == 0 else 32
    bits = 3 if kblk == 64 else 2
    atom = cute.make_composed_layout(cute.make_swizzle(bits, 3, 3), 0, cute.make_layout((8, kblk), stride=(kblk, 1)))
    return cute.tile_to_shape(atom, (rows, cols), (0, 1))


def smem_rowmajor_bytes(rows: int, cols_bytes: int):
    """Plain row-major byte tile (packed FP4 rows or E4M3 scale rows); rows x cols_bytes, stride cols_bytes."""
    import cutlass.cute as cute

    return cute.make_layout((rows, cols_bytes), stride=(cols_bytes, 1))


def wgmma_tile_layout_16b(dtype, rows: int, cols: int, stages: int = 0):
    """K-major 16-bit tile (rows x cols, cols contiguous) in the canonical wgmma shared-memory layout
    (the 128 B swizzle atom the warpgroup MMA descriptors describe; 64 or 32 contiguous columns).  The same
    tile can be read by wgmma as a K-major operand, or (transposed view) as an MN-major one.  stages > 0: that
    many such tiles back to back, stage mode last (rows x cols x stages).  Must be called inside a CuTe JIT
    context."""
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90
    from cutlass.cute.nvgpu import warpgroup
    from cutlass.utils import LayoutEnum

    atom = warpgroup.make_smem_layout_atom(sm90.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, cols), dtype)
    if stages:
        return cute.tile_to_shape(atom, (rows, cols, stages), (0, 1, 2))
    return cute.tile_to_shape(atom, (rows, cols), (0, 1))
