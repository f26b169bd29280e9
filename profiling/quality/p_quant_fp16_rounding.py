"""Why the prefill's P quantization rounds to E2M1 in fp32, not in packed fp16x2 (CPU, a few seconds).

Rounding x / sc to E2M1 after converting it to fp16 (to use HADD2/HMNMX2 on pairs) rounds twice; near the E2M1 tie
points (0.25, 0.75, ..., 5) that moves some values one E2M1 step away from the reference's single fp32 rounding.
This measures how far the output O = P' V then drifts from the reference quantization (the kernels' tolerance
against kernels.reference is 2e-3 rel L2), with P~ = exp(S - rowmax), S ~ N(0, sd^2), 64 x 4096, V ~ N(0, 1):

  PYTHONPATH=. python profiling/quality/p_quant_fp16_rounding.py
"""
import torch

from quant._fp4common import e2m1_decode, e2m1_encode


def e2m1(y):
    return e2m1_decode(e2m1_encode(y))


def main():
    torch.manual_seed(0)
    for sd in (1.0, 2.0, 4.0):
        s = torch.randn(64, 4096) * sd
        p = torch.exp(s - s.amax(-1, keepdim=True))
        t = p.reshape(64, 64, 64)  # 64-key tiles: s1 per (row, tile), then NVFP4 groups of 16
        s1 = t.amax(-1, keepdim=True) / 2688
        x = (t / s1).reshape(64, 64, 4, 16)
        sc = (x.amax(-1, keepdim=True) / 6).to(torch.float8_e4m3fn).float()
        y = torch.where(sc > 0, x / sc, torch.zeros(()))
        ref = e2m1(y.clamp(max=6)) * sc
        dbl = e2m1(y.half().float().clamp(max=6)) * sc
        v = torch.randn(4096, 128)
        o_ref = (ref.reshape(64, 64, 64) * s1).reshape(64, 4096) @ v
        o_dbl = (dbl.reshape(64, 64, 64) * s1).reshape(64, 4096) @ v
        o_exact = p @ v
        print(f"sd={sd}: values moved {(ref != dbl).float().mean().item():.2e}, "
              f"O rel L2 vs reference quantization {((o_dbl - o_ref).norm() / o_ref.norm()).item():.2e}, "
              f"(reference quantization vs exact P: {((o_ref - o_exact).norm() / o_exact.norm()).item():.2e})")


if __name__ == "__main__":
    main()
