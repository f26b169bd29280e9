"""Roofline floor for attention rows: time >= max(FLOPs / peak, bytes / bandwidth).

Ceilings come from measurement on the GPU at bench start (a large device-to-device copy, counting bytes read
plus written, and an 8192^3 bf16 matmul through torch) or, for SM120 targets we cannot run here, from
datasheet *leads* (see DATASHEET: each entry names its source; values marked "derived" are inferred from the
listed sparse/FP4 figures and must be confirmed on the card).

FLOPs of attention: 4 * B * Hq * D * (visible query-key pairs) (QK^T and PV, 2 FLOPs per MAC each); causal is
bottom-right aligned as in the project contract. For thrift rows the 16-bit fraction of the block pairs runs
at the bf16 rate and the rest at the FP4 rate (or bf16 again where the device has no FP4 MMA, e.g. SM90,
whose path decodes FP4 to FP16). Bytes: Q, K, V read once and O written once (input dtype), optionally LSE;
quantized K/V caches (decode) pass their own bytes per element.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class Ceilings:
    name: str
    bandwidth_gbs: float        # GB/s (1e9 B/s), bytes read + written
    bf16_tflops: float          # dense bf16/fp16 MMA with fp32 accumulate
    fp4_tflops: Optional[float]  # dense block-scaled FP4 MMA; None: no FP4 MMA (use bf16 rate)
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet leads (dense rates). Sources: NVIDIA H100/H200 product datasheets; NVIDIA RTX Blackwell GPU
# architecture whitepaper and GeForce RTX 5090 spec page (170 SMs, 1792 GB/s, 3352 AI TOPS = sparse FP4);
# NVIDIA RTX PRO 6000 Blackwell datasheet (188 SMs, 1792 GB/s GDDR7, 4000 AI TOPS = sparse FP4).
DATASHEET: Dict[str, Ceilings] = {
    "h100-sxm": Ceilings("H100 SXM5 (datasheet)", 3350.0, 989.4, None,
                         "NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense BF16"),
    "h200": Ceilings("H200 SXM (datasheet)", 4800.0, 989.4, None,
                     "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOPS dense BF16"),
    "rtx-5090": Ceilings("GeForce RTX 5090 (datasheet lead)", 1792.0, 209.5, 1676.0,
                         "RTX Blackwell whitepaper: FP16 tensor w/ FP32 accumulate 209.5 TFLOPS dense; "
                         "FP4 1676 dense (= 3352 AI TOPS sparse / 2), 1792 GB/s GDDR7"),
    "rtx-pro-6000": Ceilings("RTX PRO 6000 Blackwell (datasheet lead, derived)", 1792.0, 500.0, 2000.0,
                             "RTX PRO 6000 Blackwell datasheet: 4000 AI TOPS (sparse FP4) -> ~2000 dense FP4; "
                             "bf16 w/ FP32 accumulate ~500 dense derived as FP4/4 (confirm on the card); "
                             "1792 GB/s GDDR7"),
}


def visible_pairs(sq: int, skv: int, causal: bool) -> int:
    """Number of (query, key) pairs a row-wise causal (bottom-right aligned) mask leaves visible."""
    for name, v in (("sq", sq), ("skv", skv)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not causal:
        return sq * skv
    # query i sees keys j <= i + skv - sq  ->  count_i = clamp(i + skv - sq + 1, 0, skv)
    off = skv - sq
    total = 0
    # rows with count < skv: i + off + 1 < skv  <=> i < sq - 1 ... closed form over the ramp
    first_full = max(0, sq - 1)  # row index from which count == skv (i >= sq - 1)
    lo = max(0, -off)  # rows before lo see nothing
    ramp_hi = min(first_full, sq)
    if ramp_hi > lo:
        a = lo + off + 1
        b = ramp_hi - 1 + off + 1
        total += (a + b) * (ramp_hi - lo) // 2
    total += (sq - ramp_hi) * skv
    return total


def attention_flops(b: int, sq: int, skv: int, hq: int, d: int, causal: bool, dv: Optional[int] = None) -> float:
    """FLOPs of QK^T + PV over the visible pairs."""
    dv = d if dv is None else dv
    return 2.0 * b * hq * (d + dv) * visible_pairs(sq, skv, causal)


def attention_bytes(b: int, sq: int, skv: int, hq: int, hkv: int, d: int, *, elem_bytes: float = 2.0,
                    kv_elem_bytes: Optional[float] = None, lse: bool = False) -> float:
    """Fewest bytes: Q read + O written (elem_bytes each), K and V read (kv_elem_bytes each), LSE (fp32)."""
    kv_e = elem_bytes if kv_elem_bytes is None else kv_elem_bytes
    qo = 2.0 * b * sq * hq * d * elem_bytes
    kv = 2.0 * b * skv * hkv * d * kv_e
    return qo + kv + (4.0 * b * sq * hq if lse else 0.0)


def floor_ms(flops: float, nbytes: float, ceil: Ceilings, *, fp16_fraction: float = 1.0) -> dict:
    """Floor time (ms) and which side binds. fp16_fraction: share of FLOPs on 16-bit MMAs, the rest on FP4."""
    if not 0.0 <= fp16_fraction <= 1.0:
        raise ValueError(f"fp16_fraction: expected a value in [0, 1], got {fp16_fraction}")
    fp4_rate = ceil.fp4_tflops if ceil.fp4_tflops else ceil.bf16_tflops
    t_math = (flops * fp16_fraction / (ceil.bf16_tflops * 1e12) + flops * (1 - fp16_fraction) / (fp4_rate * 1e12))
    t_mem = nbytes / (ceil.bandwidth_gbs * 1e9)
    t = max(t_math, t_mem)
    return {"floor_ms": t * 1e3, "math_ms": t_math * 1e3, "mem_ms": t_mem * 1e3,
            "bound": "math" if t_math >= t_mem else "memory"}


def measure_ceilings(device=None, *, copy_bytes: int = 1 << 30, mm: int = 8192, reps: int = 10) -> Ceilings:
    """Measured ceilings on the current CUDA device: D2D copy bandwidth and a bf16 matmul rate (medians)."""
    import statistics

    import torch

    dev = torch.device(device or "cuda")
    name = torch.cuda.get_device_name(dev)
    src = torch.randint(0, 255, (copy_bytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)

    def _median_ms(fn, n):
        times = []
        for _ in range(2):
            fn()
        torch.cuda.synchronize(dev)
        for _ in range(n):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        return statistics.median(times)

    t_copy = _median_ms(lambda: dst.copy_(src), reps)
    bw = 2.0 * copy_bytes / (t_copy * 1e-3) / 1e9
    del src, dst
    a = torch.randn(mm, mm, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(mm, mm, device=dev, dtype=torch.bfloat16)
    t_mm = _median_ms(lambda: a @ bm, reps)
    tflops = 2.0 * mm ** 3 / (t_mm * 1e-3) / 1e12
    del a, bm
    torch.cuda.empty_cache()
    # FP4 MMA only on SM100/SM120 (block-scaled); elsewhere FP4 is decoded to 16-bit
    major, _ = torch.cuda.get_device_capability(dev)
    fp4 = None
    if major in (10, 12):
        fp4 = None  # not measured here: no portable FP4 matmul in torch; callers may supply a datasheet value
    return Ceilings(f"{name} (measured)", bw, tflops, fp4,
                    f"measured: D2D copy {copy_bytes >> 20} MiB (read+write) {t_copy:.3f} ms; "
                    f"bf16 {mm}^3 matmul {t_mm:.3f} ms")


def datasheet(name: str) -> Ceilings:
    """A datasheet entry by key (see DATASHEET)."""
    try:
        return DATASHEET[name]
    except KeyError:
        raise ValueError(f"name: expected one of {sorted(DATASHEET)}, got {name!r}") from None


def fp16_fraction_for_budget(n_q_blocks: int, n_kv_blocks: int, top_k: int, causal: bool) -> float:
    """Share of visible 64x64 block pairs computed in 16-bit when each query block keeps ``top_k`` blocks."""
    if top_k <= 0:
        return 0.0
    if causal:
        # query block i (bottom-right aligned, equal lengths assumed here) sees i+1 key blocks
        vis = sum(min(n_kv_blocks, i + 1 + max(0, n_kv_blocks - n_q_blocks)) for i in range(n_q_blocks))
        sel = sum(min(top_k, min(n_kv_blocks, i + 1 + max(0, n_kv_blocks - n_q_blocks))) for i in range(n_q_blocks))
    else:
        vis = n_q_blocks * n_kv_blocks
        sel = n_q_blocks * min(top_k, n_kv_blocks)
    return sel / vis if vis else 0.0


def ratio(measured_ms: float, floor: float) -> float:
    """measured / floor (>= 1 on a correct ceiling), NaN when either is missing."""
    if not measured_ms or not floor or math.isnan(measured_ms) or math.isnan(floor):
        return math.nan
    return measured_ms / floor
