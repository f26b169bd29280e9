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
    """

    tile_m: int = 64
    tile_n: int = 64
    num_warps: int = 4
    stages: int = 2
    mask_split: bool = True

    def __post_init__(self):
        if self.tile_n != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_n must be {SELECTION_BLOCK} (the selection block), got {self.tile_n}")
        if self.tile_m != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_m must be {SELECTION_BLOCK} (one query block per CTA), got {self.tile_m}")
        if self.num_warps * 16 != self.tile_m:
            raise ValueError(f"schedule.num_warps must be tile_m/16 = {self.tile_m // 16}, got {self.num_warps}")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"schedule.stages must be in [2, 4], got {self.stages}")

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
    # default: double-buffered, separate masked/unmasked steps
    "m64_w4_s2": PrefillSchedule(stages=2, mask_split=True),
    # deeper pipeline (more smem, hides longer load latency at long context)
    "m64_w4_s3": PrefillSchedule(stages=3, mask_split=True),
    # smallest code: every step carries the mask (compile-time / I-cache trade-off)
    "m64_w4_s2_allmask": PrefillSchedule(stages=2, mask_split=False),
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
