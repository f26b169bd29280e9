"""Small causal case for compute-sanitizer: both phases (budget 0.25), partial tiles, GQA 2:1.
argv[1]: a schedule name (default: the GPU's default schedule); argv[2]: fp16 (default) or bf16."""
import math, sys, torch
sys.path.insert(0, ".")
from kernels.interface import _run_prefill
from kernels.schedules import get_schedule
from kernels.selection import select_blocks
torch.manual_seed(0)
dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[2] if len(sys.argv) > 2 else "fp16"]
q = torch.randn(1, 200, 2, 64, device="cuda", dtype=dt)
k = torch.randn(1, 230, 1, 64, device="cuda", dtype=dt)
v = torch.randn(1, 230, 1, 64, device="cuda", dtype=dt)
sel = select_blocks(q, k, budget=0.25, causal=True)
sch = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None
out, lse = _run_prefill(q, k, v, sel.to(torch.int32).contiguous(), True, 1 / 8, get_schedule(sch),
                        "nvfp4")
torch.cuda.synchronize()
print("sanitize case done, finite:", torch.isfinite(out).all().item())
