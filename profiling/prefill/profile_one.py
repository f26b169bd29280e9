"""One prefill launch to profile (B=1, H=32, D=128, causal, bf16, budget 0.05; S from argv, default 8192).
Runs the CuTe prefill twice (first call compiles); profile the second with `ncu --launch-skip 1 -c 1`."""
import math, sys, torch
sys.path.insert(0, ".")
from kernels.interface import _run_prefill
from kernels.schedules import get_schedule
from kernels.selection import select_blocks

S = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
sched = sys.argv[2] if len(sys.argv) > 2 else None
torch.manual_seed(0)
q, k, v = (torch.randn(1, S, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
sel = select_blocks(q, k, budget=0.05, causal=True).to(torch.int32).contiguous()
for _ in range(2):
    out, lse = _run_prefill(q, k, v, sel, True, 1 / math.sqrt(128), get_schedule(sched), "nvfp4")
torch.cuda.synchronize()
print("profile_one done, finite:", torch.isfinite(out).all().item())
