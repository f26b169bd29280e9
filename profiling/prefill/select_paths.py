"""The prefill's ways of getting its selection, timed in one process (GPU): 32k, B=1, H=32, D=128, bf16, causal, at
b = 0.05 and 1.0 -- the public op (fused means, CuTe top-k), _run_prefill given select_blocks' result (with and
without the LSE output), given select_and_mask's (sel, mask), and with FusedMeanSelect; plus whether the two
selections and bitmasks are equal and every output is the same bits. Written for bench.py's quant+prefill rows, which
came out slower than its end-to-end rows at b > 0 (sessions 15-16); session 16 did not reproduce that here.
    python profiling/prefill/select_paths.py"""
import math, sys, torch
sys.path.insert(0, ".")
from triton.testing import do_bench
import kernels
from kernels.interface import _run_prefill, FusedMeanSelect, selection_bitmask
from kernels.schedules import get_schedule
from kernels.selection import select_blocks
from kernels.select_topk import select_and_mask
B, H, D, S = 1, 32, 128, 32768
torch.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
sch = get_schedule(None); sc = 1 / math.sqrt(D)
for b in (0.05, 1.0):
    sel = select_blocks(q, k, budget=b, causal=True)
    sel2, mask2 = select_and_mask(q, k, budget=b, causal=True)
    m1 = selection_bitmask(sel.to(torch.int32), S // 64)
    print(f"b={b} sel {tuple(sel.shape)} {sel.dtype} equal={torch.equal(sel.to(torch.int32), sel2)} mask equal={torch.equal(m1, mask2)}", flush=True)
    si = sel.to(torch.int32).contiguous()
    o = torch.empty_like(q); l = torch.empty(B, H, S, device="cuda")
    fns = {
        "e2e": lambda: kernels.thrift_attention(q, k, v, budget=b, causal=True),
        "given sel, lse": lambda: _run_prefill(q, k, v, si, True, sc, sch, "nvfp4", out=o, lse=l),
        "given sel": lambda: _run_prefill(q, k, v, si, True, sc, sch, "nvfp4"),
        "given (sel2,mask2)": lambda: _run_prefill(q, k, v, (sel2, mask2), True, sc, sch, "nvfp4"),
        "fused, lse": lambda: _run_prefill(q, k, v, FusedMeanSelect(b), True, sc, sch, "nvfp4", out=o, lse=l),
        "e2e again": lambda: kernels.thrift_attention(q, k, v, budget=b, causal=True),
    }
    outs = {}
    for name, fn in fns.items():
        r = fn(); torch.cuda.synchronize()
        outs[name] = (r[0] if isinstance(r, tuple) else r).clone()
        ms = do_bench(fn, warmup=10, rep=300, return_mode="median")
        print(f"b={b} {name:20s} {ms:8.3f} ms", flush=True)
    ref = outs["e2e"]
    for name, x in outs.items():
        print(f"  {name}: max|diff| vs e2e {(x.float() - ref.float()).abs().max().item():.3e}", flush=True)
