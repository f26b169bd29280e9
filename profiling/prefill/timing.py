"""Same-run A/B timing that does not favour whichever side runs first.

A long benchmark heats the GPU and its clocks drift down over tens of seconds (H100, session 16: the same end-to-end
call timed 24.82 ms, then 25.27 ms five benchmarks later), so "time A for a second, then B" is biased towards A.
interleaved() times the candidates in rounds, the order reversed every other round (A B, B A, A B, ...), each time a
median of triton do_bench (L2 flushed between runs); the result keeps every round, so the per-round ratios show the
spread next to their median."""
from __future__ import annotations

import statistics

from triton.testing import do_bench


def interleaved(fns: dict, rounds: int = 6, rep: int = 200, warmup: int = 10) -> dict:
    """{name: [ms per round]} for the zero-argument callables fns (each already run once: compiled, warm)."""
    names = list(fns)
    res = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            res[n].append(do_bench(fns[n], warmup=warmup, rep=rep, return_mode="median"))
    return res


def ratio_line(res: dict, base: str, other: str) -> tuple[float, str]:
    """(median over rounds of base_ms / other_ms, a printable line with the per-round ratios and both medians)."""
    ratios = [a / b for a, b in zip(res[base], res[other])]
    med = statistics.median(ratios)
    line = (f"{other} vs {base}: median {statistics.median(res[other]):.3f} vs {statistics.median(res[base]):.3f} ms, "
            f"speedup median {med:.3f}x over {len(ratios)} rounds (per round: "
            + " ".join(f"{x:.3f}" for x in ratios) + ")")
    return med, line
