"""Tile schedules of the fused ThriftAttention prefill kernel.

A schedule is everything about *how* the kernel tiles the problem that is not implied by the
problem itself (dtype, head_dim, causal, format, arch).  It is part of the compile-cache key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

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
    mma:        "sync" (default): warp-level mma.sync m16n8k16 everywhere, Q/K/V fragments ldmatrix'ed from
                shared memory by every warp.  "wgmma": on sm_90a the 16-bit MMAs are warpgroup MMAs -- the CTA's 4
                warps are exactly one warpgroup and the 64-row query block is exactly one m64 wgmma, so
                S = Q K^T runs as m64n64k16 with both operands read by the tensor cores straight from shared
                memory (no ldmatrix, no Q/K fragments in registers) and O += P V as m64nDk16 with P from
                registers.  Same numerics (fp32 accumulation of the same exact 16-bit products).  Other archs
                (sm_120a: block-scaled FP4 MMA + mma.sync FP16 phase) ignore it.
    fp16_stages: depth of phase 2's 16-bit K/V ring (2: the next selected tile loads while one computes; 1: no
                look-ahead, 32 KB less shared memory at D=128 -- phase 2 is ~5% of the tiles at the default
                budget, so one stage costs little there and lets 3 CTAs share an SM).  The dq16 experiment streams
                phase 1 through this ring and needs 2.
    min_ctas:   .minnctapersm launch hint (0 = none): ptxas caps the registers so that this many CTAs fit an SM.
    warp_spec:  sm_90a wgmma FP4-decode path only (kernels/prefill_ws.py; other archs and the dq16 experiment ignore
                it): a CTA of 1 + `consumers` warpgroups -- one producer that loads each FP4 key tile and decodes it
                ONCE into a staged 16-bit ring (mbarrier full/empty handshake, no CTA barrier in the consumers'
                loop), and `consumers` consumers, each one 64-row query block (adjacent blocks per CTA), that run S,
                the softmax, the two-level P quantization and P.V on the ring's tiles.  1/consumers of the decode per
                query block; setmaxnreg moves registers from the producer (producer_regs) to the consumers.  Phase
                2 goes through the same ring: after the FP4 tiles the producer cp.asyncs each consumer's selected
                16-bit K/V tiles into it (look-ahead up to the ring's depth).  Needs fp16_stages=1 (the field of
                the one-warpgroup kernel's own phase-2 buffer; unused here).
    consumers:  warp_spec: consumer warpgroups (query blocks) per CTA, 2 or 3 (one CTA per SM either way).
    ring_stages: warp_spec: stages of the 16-bit ring (a decoded K + V^T tile, or a 16-bit K + V tile, each);
                0 = max(2, consumers).
    producer_regs: warp_spec: the producer warpgroup's setmaxnreg count; the consumers get the rest of the CTA's
                registers (consumer_regs; setmaxnreg.inc waits for registers the producer's setmaxnreg.dec released,
                so asking for more than the CTA holds hangs).
    """

    tile_m: int = 64
    tile_n: int = 64
    num_warps: int = 4
    stages: int = 2
    mask_split: bool = True
    kv_dq16: bool = False
    mma: str = "sync"
    fp16_stages: int = 2
    min_ctas: int = 0
    warp_spec: bool = False
    consumers: int = 2
    producer_regs: int = 96
    ring_stages: int = 0

    def __post_init__(self):
        if self.tile_n != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_n must be {SELECTION_BLOCK} (the selection block), got {self.tile_n}")
        if self.tile_m != SELECTION_BLOCK:
            raise ValueError(f"schedule.tile_m must be {SELECTION_BLOCK} (one query block per CTA), got {self.tile_m}")
        if self.num_warps * 16 != self.tile_m:
            raise ValueError(f"schedule.num_warps must be tile_m/16 = {self.tile_m // 16}, got {self.num_warps}")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"schedule.stages must be in [2, 4], got {self.stages}")
        if self.mma not in ("sync", "wgmma"):
            raise ValueError(f"schedule.mma must be 'sync' or 'wgmma', got {self.mma!r}")
        if self.fp16_stages not in (1, 2):
            raise ValueError(f"schedule.fp16_stages must be 1 or 2, got {self.fp16_stages}")
        if self.kv_dq16 and self.fp16_stages != 2:
            raise ValueError("schedule.kv_dq16 streams phase 1 through the 16-bit ring: needs fp16_stages=2")
        if not 0 <= self.min_ctas <= 8:
            raise ValueError(f"schedule.min_ctas must be in [0, 8] (0 = no hint), got {self.min_ctas}")
        if self.warp_spec and (self.mma != "wgmma" or self.fp16_stages != 1 or self.kv_dq16 or self.min_ctas):
            raise ValueError("schedule.warp_spec needs mma='wgmma', fp16_stages=1, kv_dq16=False and min_ctas=0")
        if self.consumers not in (2, 3):
            raise ValueError(f"schedule.consumers must be 2 or 3, got {self.consumers}")
        if self.ring_stages != 0 and not 2 <= self.ring_stages <= 6:
            raise ValueError(f"schedule.ring_stages must be 0 (= max(2, consumers)) or in [2, 6], got "
                             f"{self.ring_stages}")
        if self.producer_regs % 8 or not 24 <= self.producer_regs <= self.entry_regs:
            raise ValueError(f"schedule.producer_regs must be a multiple of 8 in [24, {self.entry_regs}] (the "
                             f"registers a thread of the {self.ws_threads}-thread CTA starts with), got "
                             f"{self.producer_regs}")

    @property
    def ws_threads(self) -> int:
        """warp_spec: threads per CTA (1 producer + `consumers` warpgroups of 128)."""
        return 128 * (1 + self.consumers)

    @property
    def ws_ring(self) -> int:
        """warp_spec: the 16-bit ring's stages (ring_stages, 0 = max(2, consumers))."""
        return self.ring_stages or max(2, self.consumers)

    @property
    def entry_regs(self) -> int:
        """warp_spec: the registers per thread ptxas allots at entry (one CTA per SM: 65536 / threads, in 8s)."""
        return 65536 // self.ws_threads // 8 * 8

    @property
    def consumer_regs(self) -> int:
        """warp_spec: the consumers' setmaxnreg count, producer + consumers x it <= (1 + consumers) x entry_regs
        (168 x 3 = 504 with 2 consumers, 128 x 4 = 512 with 3)."""
        total = (1 + self.consumers) * self.entry_regs
        return min(256, (total - self.producer_regs) // self.consumers // 8 * 8)

    def uses_dq16(self, arch: int) -> bool:
        """Whether phase 1 reads dq(K)/dq(V) in 16 bit on sm_<arch> (SM90 decode path only)."""
        return self.kv_dq16 and arch not in (120, 121)

    def uses_wgmma(self, arch: int) -> bool:
        """Whether the 16-bit MMAs are warpgroup MMAs on sm_<arch> (wgmma exists on sm_90a only)."""
        return self.mma == "wgmma" and arch == 90

    def uses_ws(self, arch: int) -> bool:
        """Whether sm_<arch> runs the warp-specialized kernel (kernels/prefill_ws.py)."""
        return self.warp_spec and self.uses_wgmma(arch) and not self.uses_dq16(arch)

    @property
    def num_threads(self) -> int:
        return 32 * self.num_warps

    def key(self) -> tuple:
        """Hashable identity used in the compile cache."""
        return tuple(sorted(asdict(self).items()))

    def validate_for(self, head_dim: int, arch: int) -> None:
        """Raise ValueError if this schedule cannot run head_dim on arch (shared-memory budget)."""
        from layouts.prefill import PrefillSmemMap, PrefillWSSmemMap

        if self.uses_ws(arch):
            smem = PrefillWSSmemMap(head_dim, self.tile_m, self.tile_n, self.stages, ring=self.ws_ring,
                                    consumers=self.consumers).total_bytes
        else:
            smem = PrefillSmemMap(head_dim, self.tile_m, self.tile_n, self.stages,
                                  fp16_stages=self.fp16_stages).total_bytes
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
    # sm_90a default: warpgroup MMAs (see `mma`), phase 2 single-buffered (66 KB of smem at D=128): 3 CTAs (12 warps)
    # per SM, as ptxas needs <= 168 registers here (the sm_90a compile test asserts it).  Measured on an H100
    # (profiling/RESULTS.md, session 5): fp16_stages=2 (80 KB, 2 CTAs/SM) 7% slower; a .minnctapersm 3 hint
    # (min_ctas=3) makes ptxas pick 156 registers and 4% slower code; min_ctas=2 (190 registers) 13% slower.
    "m64_wg_s2_f1": PrefillSchedule(stages=2, mask_split=True, mma="wgmma", fp16_stages=1),
    # sm_90a warp specialization (see `warp_spec`): 1 producer warpgroup decoding each FP4 tile once for 2 consumer
    # warpgroups (2 query blocks per CTA), 1 CTA of 384 threads per SM
    "wg2_ws_s2": PrefillSchedule(stages=2, mask_split=True, mma="wgmma", fp16_stages=1, warp_spec=True),
    # 1 producer + 3 consumers (3 query blocks per CTA, 512 threads): a third of the decode per block, 12 math warps
    # per SM; the producer runs on 56 registers (the most that leaves the consumers 152: 56 + 3 x 152 = 4 x 128)
    "wg3_ws_s2": PrefillSchedule(stages=2, mask_split=True, mma="wgmma", fp16_stages=1, warp_spec=True,
                                 consumers=3, producer_regs=56),
    # wgmma + the dq16 experiment: what the tiling costs without the per-tile FP4 decode
    "m64_wg_s2_dq16": PrefillSchedule(stages=2, mask_split=True, kv_dq16=True, mma="wgmma"),
}

DEFAULT_SCHEDULE = "m64_w4_s2"  # every arch without an entry in ARCH_DEFAULT_SCHEDULES (sm_120a: FP4 MMA + mma.sync)
# sm_90a (H100/H200): warp-specialized wgmma, one producer + 3 consumer warpgroups (one FP4 decode per key tile for
# three query blocks): 32k / 5% quant+prefill 26.5 ms vs 34.6 ms for the one-warpgroup m64_wg_s2_f1 and 30.4 ms for
# wg2_ws_s2 (H100, same run; profiling/RESULTS.md, session 9)
ARCH_DEFAULT_SCHEDULES = {90: "wg3_ws_s2"}


def _current_arch():
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except Exception:  # no torch / no driver: the arch-independent default
        pass
    return None


def default_schedule_name(arch=None) -> str:
    """The default schedule for sm_<arch> (None: the current CUDA device's arch, if any)."""
    if arch is None:
        arch = _current_arch()
    return ARCH_DEFAULT_SCHEDULES.get(arch, DEFAULT_SCHEDULE)


def schedule_str(s: PrefillSchedule) -> str:
    """Every field as "name=value;..." -- get_schedule(schedule_str(s)) == s (the torch.library op carries the
    schedule this way; json is not traceable by dynamo)."""
    return ";".join(f"{f.name}={getattr(s, f.name)}" for f in fields(s))  # fields of the instance: dynamo traces it


def _with_overrides(base: PrefillSchedule, text: str) -> PrefillSchedule:
    kinds = {f.name: type(f.default) for f in fields(base)}
    kw = {}
    for item in (x for x in text.split(";") if x):
        name, eq, val = item.partition("=")
        if not eq or name not in kinds:
            raise ValueError(f"schedule: expected 'field=value' items separated by ';' with fields in "
                             f"{sorted(kinds)}, got {item!r}")
        kind = kinds[name]
        try:
            if kind is bool:
                if val not in ("True", "False", "1", "0"):
                    raise ValueError(val)
                kw[name] = val in ("True", "1")
            else:
                kw[name] = kind(val)
        except ValueError:
            raise ValueError(f"schedule: {name} must be a {kind.__name__}, got {val!r}") from None
    return replace(base, **kw)


def get_schedule(schedule, arch=None) -> PrefillSchedule:
    """Resolve a schedule (ValueError/TypeError otherwise):
      None                      the default for sm_<arch> (arch None = the current CUDA device)
      "m64_w4_s2"               a name in SCHEDULES
      "m64_w4_s2:stages=3;..."  a named schedule with fields changed (sweeps from the harness)
      "stages=3;min_ctas=2"     the default for sm_<arch> with fields changed (schedule_str writes every field)
      a PrefillSchedule         itself"""
    if schedule is None:
        return SCHEDULES[default_schedule_name(arch)]
    if isinstance(schedule, PrefillSchedule):
        return schedule
    if isinstance(schedule, str):
        name, _, overrides = schedule.partition(":") if ":" in schedule else \
            (("", "", schedule) if "=" in schedule else (schedule, "", ""))
        if name and name not in SCHEDULES:
            raise ValueError(f"schedule: unknown name {name!r}; expected one of {sorted(SCHEDULES)}")
        base = SCHEDULES[name or default_schedule_name(arch)]
        return _with_overrides(base, overrides) if overrides else base
    raise TypeError(f"schedule: expected None, a name or a PrefillSchedule, got {type(schedule).__name__}")
