"""Quick prefill timing: B=1, H=32, D=128, causal, bf16, budget 0.05 at S=8k/32k: SDPA flash vs thrift
(end-to-end and quant+prefill with the selection given, per schedule). Median of triton do_bench, L2 flushed.
argv: optional schedule names (default: the default schedule). DTYPE=fp16 times fp16 inputs instead of bf16;
SIZES=32768 (comma-separated) picks the sequence lengths. AB_SIDE=1 also times end to end with the selection in order on
the current stream (kernels.interface.SELECT_SIDE_STREAM = False); AB_TOPK=1 with the top-k and bitmask the public op
does not use by default (SELECT_TOPK_KERNEL flipped: torch's sort where the CuTe kernels/select_topk.py is the
default, and the other way round; the row names which), on the side stream and in order; AB_PRIO=1 end to end with
the side stream at high priority (SELECT_STREAM_PRIORITY = -1), with the default top-k and (AB_TOPK=1) the other one;
AB_MEANS=1 with the block means the public op does not use by default (SELECT_FUSED_MEANS flipped: the quantizer
kernel's Q / K means and the selection after it in order, or select_blocks' torch means on the side stream).
ROUNDS=6 (default; 0: off) then times SDPA and the end to end again in alternating order (profiling/prefill/timing.py)
and prints their per-round ratios and median: the number to quote, since the rows above run in a fixed order on a
warming GPU. The "(end-to-end)" row is the shipped configuration (the first line printed names its flags). The
module flags are put back after each A/B block."""
import math, os, sys, torch
sys.path.insert(0, ".")
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
import kernels
from kernels import interface as iface
from kernels.interface import _run_prefill
from kernels.schedules import get_schedule
from kernels.selection import select_blocks
from profiling.prefill.timing import interleaved, ratio_line

scheds = sys.argv[1:] or [None]
ROUNDS = int(os.environ.get("ROUNDS", "6"))  # interleaved SDPA / end-to-end rounds (0: none)
print(f"shipped: SELECT_TOPK_KERNEL={iface.SELECT_TOPK_KERNEL} SELECT_SIDE_STREAM={iface.SELECT_SIDE_STREAM} "
      f"SELECT_STREAM_PRIORITY={iface.SELECT_STREAM_PRIORITY} SELECT_FUSED_MEANS={iface.SELECT_FUSED_MEANS}",
      flush=True)
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DTYPE", "bf16")]
B, H, D = 1, 32, 128
for S in [int(x) for x in os.environ.get("SIZES", "8192,32768").split(",")]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
    fl = 4 * B * H * S * S * D / 2
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    def row(name, ms):  # printed as soon as it is timed, so a run cut by a timeout keeps what it measured
        print(f"{str(dtype)[6:]} S={S:6d} {name:48s} {ms:9.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s", flush=True)
    row("sdpa_flash", do_bench(sdpa, warmup=30, rep=1000, return_mode="median"))
    sel = select_blocks(q, k, budget=0.05, causal=True).to(torch.int32).contiguous()
    o = torch.empty_like(q); l = torch.empty(B, H, S, device="cuda")
    for sc in scheds:
        run = lambda: _run_prefill(q, k, v, sel, True, 1 / math.sqrt(D), get_schedule(sc), "nvfp4", out=o, lse=l)
        run()
        row(f"thrift b=0.05 {sc or 'default'} (quant+prefill)", do_bench(run, warmup=10, rep=1000, return_mode="median"))
        e2e = lambda: kernels.thrift_attention(q, k, v, budget=0.05, causal=True, schedule=sc)
        e2e()
        row(f"thrift b=0.05 {sc or 'default'} (end-to-end)", do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
        if ROUNDS:  # SDPA and the end to end in alternating order (profiling/prefill/timing.py)
            res = interleaved({"sdpa_flash": sdpa, "e2e": e2e}, rounds=ROUNDS)
            print(f"{str(dtype)[6:]} S={S:6d} interleaved, {sc or 'default'} b=0.05 "
                  + ratio_line(res, "sdpa_flash", "e2e")[1], flush=True)
        topk0, side0 = iface.SELECT_TOPK_KERNEL, iface.SELECT_SIDE_STREAM  # restored after each A/B block
        if os.environ.get("AB_MEANS") == "1":  # the other source of the block means (kernels.interface)
            means0 = iface.SELECT_FUSED_MEANS
            iface.SELECT_FUSED_MEANS = not means0
            alt_m = "torch means, side stream" if means0 else "quantizer means, in order"
            row(f"thrift b=0.05 {sc or 'default'} (e2e, {alt_m})",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
            iface.SELECT_FUSED_MEANS = means0
            row(f"thrift b=0.05 {sc or 'default'} (end-to-end, again)",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
        if os.environ.get("AB_SIDE") == "1":  # the same with the selection in order on the current stream
            iface.SELECT_SIDE_STREAM = False
            row(f"thrift b=0.05 {sc or 'default'} (e2e, select in order)",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
            iface.SELECT_SIDE_STREAM = side0
        alt = "torch top-k" if topk0 else "CuTe top-k"  # AB_TOPK: the top-k the public op does not use by default
        if os.environ.get("AB_TOPK") == "1":  # the same with the other top-k + bitmask (kernels.interface)
            iface.SELECT_TOPK_KERNEL = not topk0
            row(f"thrift b=0.05 {sc or 'default'} (e2e, {alt})",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
            iface.SELECT_SIDE_STREAM = False
            row(f"thrift b=0.05 {sc or 'default'} (e2e, {alt}, in order)",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
            iface.SELECT_SIDE_STREAM, iface.SELECT_TOPK_KERNEL = side0, topk0
        if os.environ.get("AB_PRIO") == "1":  # the side stream at high priority (kernels.interface.SELECT_STREAM_PRIORITY)
            prio0 = iface.SELECT_STREAM_PRIORITY
            iface.SELECT_STREAM_PRIORITY = -1
            row(f"thrift b=0.05 {sc or 'default'} (e2e, side prio -1)",
                do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
            if os.environ.get("AB_TOPK") == "1":
                iface.SELECT_TOPK_KERNEL = not topk0
                row(f"thrift b=0.05 {sc or 'default'} (e2e, {alt}, side prio -1)",
                    do_bench(e2e, warmup=10, rep=1000, return_mode="median"))
                iface.SELECT_TOPK_KERNEL = topk0
            iface.SELECT_STREAM_PRIORITY = prio0
