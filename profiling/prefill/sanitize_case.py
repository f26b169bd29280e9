"""Small causal case for compute-sanitizer: both phases (budget 0.25), partial tiles, GQA 2:1.
argv[1]: a schedule name (default: the GPU's default schedule)."""
import math, sys, torch
sys.path.insert(0, ".")
from kernels.interface import _run_prefill
from kernels.schedules import get_schedule
from kernels.selection import select_blocks
torch.manual_seed(0)
q = torch.randn(1, 200, 2, 64, device="cuda", dtype=torch.float16)
k = torch.randn(1, 230, 1, 64, device="cuda", dtype=torch.float16)
v = torch.randn(1, 230, 1, 64, device="cuda", dtype=torch.float16)
sel = select_blocks(q, k, budget=0.25, causal=True)
out, lse = _run_prefill(q, k, v, sel.to(torch.int32).contiguous(), True, 1 / 8, get_schedule(sys.argv[1] if len(sys.argv) > 1 else None),
                        "nvfp4")
torch.cuda.synchronize()
print("sanitize case done, finite:", torch.isfinite(out).all().item())
