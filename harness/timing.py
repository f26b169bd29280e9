"""GPU timing: median of many runs, L2 flushed before each, warm-up (and JIT compile) outside the timing.

Two timers:
- ``events`` (default): one CUDA event pair around each call; before each call a buffer twice the L2 size is
  overwritten so no input stays resident in L2; input sets are rotated (call i uses set i % n) so that even
  an L2 larger than expected cannot serve repeats. The flush itself sits outside the event pair.
- ``do_bench``: ``triton.testing.do_bench(..., return_mode="median")`` (it flushes L2 itself); rotation is
  applied by cycling through the calls inside the benched closure.

Both return a :class:`Timing` in milliseconds. Nothing here needs a GPU to import.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, List, Optional, Sequence


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    idx = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[idx]


def summarize(samples_ms: Sequence[float], method: str) -> Timing:
    """Median / min / 20th / 80th percentile of a list of per-call times."""
    s = sorted(float(x) for x in samples_ms)
    if not s:
        raise ValueError("samples_ms: expected at least one timing sample")
    return Timing(statistics.median(s), s[0], _quantile(s, 0.2), _quantile(s, 0.8), len(s), method)


class L2Flusher:
    """Overwrites a buffer of 2x the device's L2 size (defaults to 256 MiB when the size is unknown)."""

    def __init__(self, device=None):
        import torch

        dev = torch.device(device or "cuda")
        l2 = 0
        try:
            l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0))
        except Exception:
            l2 = 0
        nbytes = max(2 * l2, 256 << 20)
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=dev)

    def __call__(self):
        self.buf.fill_(0x5A5A)  # a write pass evicts everything the previous call left in L2


def time_calls(calls: Sequence[Callable[[], object]], *, warmup: int = 3, rep: int = 50,
               min_time_ms: float = 0.0, max_time_s: float = 20.0, flush_l2: bool = True,
               method: str = "events", flusher: Optional[L2Flusher] = None) -> Timing:
    """Time ``calls`` (one closure per rotated input set) on the current CUDA stream.

    warmup: untimed calls first (the first one also triggers any JIT compile/autotune, so call the
    function once yourself beforehand if compilation is expensive and should be reported separately).
    rep: timed calls (at least); min_time_ms: keep going until this much kernel time was measured;
    max_time_s: wall-clock cap on the timed loop.
    """
    if not calls:
        raise ValueError("calls: expected at least one callable")
    if rep < 1:
        raise ValueError(f"rep: expected >= 1, got {rep}")
    if method == "wall":  # CPU pipeline checks: host wall clock, no flush
        for i in range(max(warmup, 0)):
            calls[i % len(calls)]()
        samples = []
        for i in range(rep):
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            samples.append((time.perf_counter() - t0) * 1e3)
        return summarize(samples, "wall-clock (cpu)")
    import torch

    if method == "do_bench":
        return _time_do_bench(calls, warmup=warmup, rep=rep)
    if method != "events":
        raise ValueError(f"method: expected 'events', 'do_bench' or 'wall', got {method!r}")
    flush = flusher if flusher is not None else (L2Flusher() if flush_l2 else None)
    for i in range(max(warmup, 0)):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    samples: List[float] = []
    start_wall = time.perf_counter()
    i = 0
    total = 0.0
    while True:
        if flush is not None:
            flush()
        ev0 = torch.cuda.Event(enable_timing=True)
        ev1 = torch.cuda.Event(enable_timing=True)
        ev0.record()
        calls[i % len(calls)]()
        ev1.record()
        ev1.synchronize()
        ms = ev0.elapsed_time(ev1)
        samples.append(ms)
        total += ms
        i += 1
        if i >= rep and total >= min_time_ms:
            break
        if time.perf_counter() - start_wall > max_time_s and i >= 3:
            break
    return summarize(samples, "cuda-events+l2flush")


def _time_do_bench(calls, *, warmup: int, rep: int) -> Timing:
    from triton.testing import do_bench

    state = {"i": 0}

    def fn():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    # do_bench's warmup/rep are in milliseconds; estimate them from one call's time
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    qs = do_bench(fn, warmup=max(1.0, warmup * one_ms), rep=max(5.0, rep * one_ms),
                  quantiles=[0.0, 0.2, 0.5, 0.8])
    mn, p20, med, p80 = (float(x) for x in qs)
    return Timing(med, mn, p20, p80, rep, "triton.do_bench")


def have_do_bench() -> bool:
    try:
        from triton.testing import do_bench  # noqa: F401

        return True
    except Exception:
        return False
