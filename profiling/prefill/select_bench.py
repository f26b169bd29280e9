"""Where the selection's time goes (GPU): B=1, H=32, D=128, causal, budget 0.05 (S from SIZES, default 32768),
DTYPE=bf16|fp16. Times (median of do_bench, L2 flushed) of select_blocks, its pieces, selection_bitmask, and
alternative top-k forms, and kernels/select_topk.select_and_mask (checked equal to select_blocks + the bitmask)."""
import os, sys, torch
sys.path.insert(0, ".")
from triton.testing import do_bench
from kernels.selection import select_blocks, topk_for_budget, block_visibility, _block_reduce
from kernels.interface import selection_bitmask

dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DTYPE", "bf16")]
B, H, D = 1, 32, 128
for S in [int(x) for x in os.environ.get("SIZES", "32768").split(",")]:
    torch.manual_seed(0)
    q, k = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(2))
    nb = -(-S // 64)
    kk = topk_for_budget(nb, 0.05, True)
    t = lambda f: do_bench(f, warmup=10, rep=300, return_mode="median")
    rows = []
    rows.append(("select_blocks", t(lambda: select_blocks(q, k, budget=0.05, causal=True))))
    qm = _block_reduce(q, 64, "mean").permute(0, 2, 1, 3)
    km = _block_reduce(k, 64, "mean").permute(0, 2, 1, 3)
    rows.append(("block means q", t(lambda: _block_reduce(q, 64, "mean"))))
    vis = block_visibility(S, S, 64, True, q.device)
    sc = torch.matmul(qm[0], km[0].transpose(-1, -2))
    rows.append(("scores matmul (32 heads)", t(lambda: torch.matmul(qm[0], km[0].transpose(-1, -2)))))
    rows.append(("masked_fill", t(lambda: sc.masked_fill(~vis, float("-inf")))))
    scm = sc.masked_fill(~vis, float("-inf"))
    rows.append(("sort stable desc [32,nb,nb]", t(lambda: torch.sort(scm, dim=-1, descending=True, stable=True))))
    rows.append(("sort unstable desc", t(lambda: torch.sort(scm, dim=-1, descending=True))))
    rows.append(("topk fp32 k", t(lambda: torch.topk(scm, kk, dim=-1))))
    sel = select_blocks(q, k, budget=0.05, causal=True)
    rows.append(("selection_bitmask", t(lambda: selection_bitmask(sel, nb))))
    from kernels.select_topk import select_and_mask
    s2, m2 = select_and_mask(q, k, budget=0.05, causal=True)
    assert torch.equal(s2, sel) and torch.equal(m2, selection_bitmask(sel, nb)), "select_and_mask differs"
    rows.append(("select_and_mask (scores + CuTe top-k)", t(lambda: select_and_mask(q, k, budget=0.05, causal=True))))
    for name, ms in rows:
        print(f"{str(dtype)[6:]} S={S:6d} nb={nb} k={kk} {name:34s} {ms * 1e3:9.1f} us", flush=True)
