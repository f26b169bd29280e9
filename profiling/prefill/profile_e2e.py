"""Per-kernel GPU time of one end-to-end kernels.thrift_attention call (torch.profiler, CUDA activity): B=1, H=32,
D=128, causal, S from SIZES (default 32768), DTYPE=bf16|fp16, BUDGET (default 0.05). Prints the kernels sorted by
total device time over 5 calls (after 2 warm-up calls)."""
import os, sys, torch
sys.path.insert(0, ".")
from torch.profiler import ProfilerActivity, profile
import kernels

dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DTYPE", "bf16")]
budget = float(os.environ.get("BUDGET", "0.05"))
B, H, D = 1, 32, 128
for S in [int(x) for x in os.environ.get("SIZES", "32768").split(",")]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
    for _ in range(2):
        kernels.thrift_attention(q, k, v, budget=budget, causal=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            kernels.thrift_attention(q, k, v, budget=budget, causal=True)
        torch.cuda.synchronize()
    print(f"== {str(dtype)[6:]} S={S} budget={budget}: per-kernel device time over 5 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
