"""Tile schedules of the fused ThriftAttention prefill kernel.

A schedule is everything about *how* the kernel tiles the problem that is not implied by the
problem itself (dtype, head_dim, causal, format, arch).  It is part of the compile-cache key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SELECTION_BLOCK = 64  # the selection granularity (64x64 query/key block pairs) -- fixed by the contract


@dataclass(frozen=True)
class PrefillSchedule:
    """Static tiling of one CTA.

    tile_m:     query rows per CTA; must equal the selection block (one CTA = one query block, so
                one bitmask/selected-list row per CTA).
    tile_n:     keys per mainloop step; must equal the selection block (a key tile is one
                selectable block, so a tile is wholly FP4 or wholly FP16).
    num_warps:  warps per CTA; each warp owns tile_m / num_warps = 16 query rows (m16 MMA atoms).
    stages:     cp.async pipeline depth of the K/V tile buffers (>= 2: tile j+1 loads while j computes).
    mask_split: emit a mask-free variant of the mainloop step for tiles that need no causal /
                sequence-end masking (bigger code, fewer instructions per interior tile).
    kv_dq16:    SM90 path only, opt-in experiment (ignored on sm_120, whose MMA reads the packed FP4 stages):
                the quantizer also writes dq(K), dq(V) in 16 bit (exact values) and phase 1 streams those
                through the same 16-bit stage ring as phase 2 -- no per-tile FP4 decode in the main loop (the
                profile had it at ~530 instructions per warp and tile, ~28% of the stall samples), but 16-bit
                K/V memory traffic and an extra 16-bit K/V copy in memory, which is not this project's design
                (FP4 traffic on every arch).  It measures the cost of the decode: 32k/5% quant+prefill 42.7 ms
                vs 55.0 ms on the FP4 path (H100, profiling/RESULTS.md).  False (default): packed FP4 stages
                decoded into 16-bit smem tiles each tile (``stages`` deep ring).
    """

    tile_m: int = 64
    tile_n: int = 64
    num_warps: int = 4
    stages: int = 2
    mask_split: bool = True
    kv_dq16: bool = False

    def __post_init__(self):
        if self.tile_n != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_n must be {SELECTION_BLOCK} (the selection block), got {self.tile_n}")
        if self.tile_m != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_m must be {SELECTION_BLOCK} (one query block per CTA), got {self.tile_m}")
        if self.num_warps * 16 != self.tile_m:
            raise ValueError(f"schedule.num_warps must be tile_m/16 = {self.tile_m // 16}, got {self.num_warps}")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"schedule.stages must be in [2, 4], got {self.stages}")

    def uses_dq16(self, arch: int) -> bool:
        """Whether phase 1 reads dq(K)/dq(V) in 16 bit on sm_<arch> (SM90 decode path only)."""
        return self.kv_dq16 and arch not in (120, 121)

    @property
    def num_threads(self) -> int:
        return 32 * self.num_warps

    def key(self) -> tuple:
        """Hashable identity used in the compile cache."""
        return tuple(sorted(asdict(self).items()))

    def validate_for(self, head_dim: int, arch: int) -> None:
        """Raise ValueError if this schedule cannot run head_dim on arch (shared-memory budget)."""
        from layouts.prefill import PrefillSmemMap

        smem = PrefillSmemMap(head_dim, self.tile_m, self.tile_n, self.stages).total_bytes
        limit = 99 * 1024 if arch >= 120 else 227 * 1024
        if smem > limit:
            raise ValueError(
                f"schedule {self} needs {smem} B of shared memory at head_dim={head_dim}; sm_{arch} allows {limit}"
            )


SCHEDULES: dict[str, PrefillSchedule] = {
    # default: packed FP4 K/V double-buffered (FP4 memory traffic), separate masked/unmasked steps
    "m64_w4_s2": PrefillSchedule(stages=2, mask_split=True),
    # deeper FP4 pipeline (more smem, hides longer load latency at long context)
    "m64_w4_s3": PrefillSchedule(stages=3, mask_split=True),
    # smallest code: every step carries the mask (compile-time / I-cache trade-off)
    "m64_w4_s2_allmask": PrefillSchedule(stages=2, mask_split=False),
    # SM90 experiment: phase 1 streams exact 16-bit dq(K)/dq(V) instead of decoding FP4 tiles (see kv_dq16)
    "m64_w4_s2_dq16": PrefillSchedule(stages=2, mask_split=True, kv_dq16=True),
}

DEFAULT_SCHEDULE = "m64_w4_s2"


def get_schedule(schedule) -> PrefillSchedule:
    """Resolve None / a name / a PrefillSchedule to a PrefillSchedule (ValueError/TypeError otherwise)."""
    if schedule is None:
        return SCHEDULES[DEFAULT_SCHEDULE]
    if isinstance(schedule, PrefillSchedule):
        return schedule
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown name {schedule!r}; expected one of {sorted(SCHEDULES)}")
        return SCHEDULES[schedule]
    raise TypeError(f"schedule: expected None, a name or a PrefillSchedule, got {type(schedule).__name__}")
