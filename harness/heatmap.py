"""`python -m harness heatmap`: per-block FP4 error of one attention head (the paper's Fig. 3), CPU ok.

For query block i and key block j (64 x 64) the *contribution* of key block j to the output rows of block i is

    C16_ij = P16~[i, j] . V_j / l16          exact path: S16 = q.k^T * scale (fp32 of the input values)
    C4_ij  = quantize_p(P4~)[i, j] . dq(V)_j / l4   FP4 path: S4 = dq(Q).dq(K)^T * scale, SageAttention3
                                             two-level P, V quantized along the sequence (the contract's numerics)

with P~ = exp(S - rowmax) and l = sum over all visible keys, each path with its own max and sum (as if the
whole row ran in that precision). The heat value is ||C4_ij - C16_ij||_F over the block's 64 rows x D, i.e.
how much output error block (i, j) contributes when computed in FP4. Masked (invisible) blocks are NaN.
The blocks that selection (kernels.selection.select_blocks, block_mean, at --budget) keeps in FP16 are marked,
and the share of the total squared error they hold is printed: what the budget buys.

Writes heatmap.png (if matplotlib is importable; else a printed reason), heatmap.npy (the matrix, float32) and
heatmap.json (matrix, selected blocks, settings) into --out (default results/<UTC timestamp>/).
Input: the built-in long-context workload (harness.workload.make_workload; Gaussian Q/K/V if it is missing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length (Sq = Skv; default 4096)")
    p.add_argument("--head", type=int, default=0, help="query head to show (default 0)")
    p.add_argument("--heads", type=int, default=8, help="query heads in the workload (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads in the workload (default 2)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.05, help="FP16 budget whose selection is marked (default 0.05)")
    p.add_argument("--fmt", choices=("nvfp4", "mxfp4"), default="nvfp4")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--workload", choices=("builtin", "random"), default="builtin",
                   help="structured long-context workload (default) or plain Gaussian inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default results/<UTC timestamp>)")


def _inputs(args):
    import torch

    if args.workload == "builtin":
        try:
            from harness.workload import make_workload

            return make_workload(args.seq_len, batch=1, heads_q=args.heads, heads_kv=args.kv_heads,
                                 head_dim=args.head_dim, dtype=torch.float16, seed=args.seed), "builtin"
        except ImportError as e:
            print(f"[heatmap] harness.workload not available ({e}); using Gaussian inputs")
    g = torch.Generator().manual_seed(args.seed)
    q = torch.randn(1, args.seq_len, args.heads, args.head_dim, generator=g).half()
    k = torch.randn(1, args.seq_len, args.kv_heads, args.head_dim, generator=g).half()
    v = torch.randn(1, args.seq_len, args.kv_heads, args.head_dim, generator=g).half()
    return (q, k, v), "random"


def block_contribution_error(q, k, v, *, causal: bool = True, fmt: str = "nvfp4", block: int = 64,
                             softmax_scale: Optional[float] = None):
    """||C4_ij - C16_ij||_F for one head: q [Sq, D], k, v [Skv, D] (input dtype). Returns float64 [nqb, nkb],
    NaN on causally invisible blocks (bottom-right aligned)."""
    import torch

    from quant.formats import get_format
    from quant.softmax_p import quantize_p

    if q.dim() != 2 or k.dim() != 2 or v.dim() != 2:
        raise ValueError(f"q, k, v: expected 2-D [S, D] tensors of one head, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    f = get_format(fmt)
    Sq, D = q.shape
    Skv = k.shape[0]
    scale = (1.0 / math.sqrt(D)) if softmax_scale is None else softmax_scale
    qf, kf, vf = q.float(), k.float(), v.float()
    dq_q = f.fake_quantize(qf, dim=-1)
    dq_k = f.fake_quantize(kf, dim=-1)
    # V is grouped along the sequence (key axis), groups starting at key 0, tail zero-padded
    skv_pad = -(-Skv // block) * block
    vpad = torch.zeros((skv_pad, D), dtype=torch.float32)
    vpad[:Skv] = vf
    dq_v = f.fake_quantize(vpad.T.contiguous(), dim=-1).T[:Skv]
    nqb, nkb = -(-Sq // block), -(-Skv // block)
    err = torch.full((nqb, nkb), float("nan"), dtype=torch.float64)
    for i in range(nqb):
        r0, r1 = i * block, min(Sq, (i + 1) * block)
        s16 = (qf[r0:r1] @ kf.T) * scale
        s4 = (dq_q[r0:r1] @ dq_k.T) * scale
        if causal:
            rows = torch.arange(r0, r1)[:, None] + (Skv - Sq)
            vis = torch.arange(Skv)[None, :] <= rows
            s16 = s16.masked_fill(~vis, float("-inf"))
            s4 = s4.masked_fill(~vis, float("-inf"))
        outs = []
        for s, vv, quant in ((s16, vf, False), (s4, dq_v, True)):
            m = s.amax(dim=1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            l = p.sum(dim=1, keepdim=True).clamp_min(1e-30)
            if quant:
                p = quantize_p(p, fmt=fmt, p_tile=block)
            # per key block contribution: [rows, nkb, block] x [nkb, block, D] -> [nkb, rows, D]
            pp = torch.zeros((r1 - r0, nkb * block))
            pp[:, :Skv] = p / l
            vb = torch.zeros((nkb * block, D))
            vb[:Skv] = vv
            outs.append(torch.einsum("rjk,jkd->jrd", pp.view(r1 - r0, nkb, block), vb.view(nkb, block, D)))
        e = torch.linalg.vector_norm((outs[1] - outs[0]).reshape(nkb, -1), dim=1).double()
        if causal:
            last_key = r1 - 1 + (Skv - Sq)
            visible = torch.arange(nkb) * block <= last_key
            e = torch.where(visible, e, torch.full_like(e, float("nan")))
        err[i] = e
    return err


def plot(err, selected_mask, path: str, title: str) -> Optional[str]:
    """log10 heat map with the selected (FP16) blocks marked; returns a reason string if not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except Exception as e:
        return f"matplotlib not importable ({type(e).__name__}: {e}); install the 'plots' extra"
    e = np.array(err, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(np.where(e > 0, e, np.nan))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    im = ax.imshow(z, cmap=cmap, origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 ||C_FP4 - C_exact||_F per block")
    if selected_mask is not None:
        ii, jj = np.nonzero(np.array(selected_mask))
        ax.scatter(jj, ii, s=max(2, 600 / max(e.shape)), marker="s", facecolors="none", edgecolors="cyan",
                   linewidths=0.6, label="selected (FP16)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("key block j")
    ax.set_ylabel("query block i")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(args) -> int:
    import numpy as np
    import torch

    from harness import report as rp

    if args.seq_len < 1:
        raise ValueError(f"--seq-len: expected >= 1, got {args.seq_len}")
    if not 0 <= args.head < args.heads:
        raise ValueError(f"--head: expected 0 <= head < {args.heads}, got {args.head}")
    (q, k, v), source = _inputs(args)
    h, hk = args.head, args.head // (args.heads // args.kv_heads)
    err = block_contribution_error(q[0, :, h], k[0, :, hk], v[0, :, hk], causal=args.causal, fmt=args.fmt)
    sel_mask = None
    sel_list = None
    try:
        from kernels.selection import select_blocks, selection_mask

        sel = select_blocks(q, k, budget=args.budget, causal=args.causal)
        sel_mask = selection_mask(sel, err.shape[1])[0, h].numpy()
        sel_list = sel[0, h].tolist()
    except ImportError as e:
        print(f"[heatmap] kernels.selection not available ({e}); selected blocks not marked")
    out = args.out or rp.results_dir()
    os.makedirs(out, exist_ok=True)
    e = err.numpy()
    total = np.nansum(e ** 2)
    share = float(np.nansum((e ** 2)[sel_mask]) / total) if sel_mask is not None and total > 0 else None
    np.save(os.path.join(out, "heatmap.npy"), e.astype(np.float32))
    meta = {"seq_len": args.seq_len, "head": h, "kv_head": hk, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "budget": args.budget, "fmt": args.fmt, "causal": args.causal,
            "workload": source, "seed": args.seed, "selected_error_share": share,
            "definition": "||C4_ij - C16_ij||_F, contribution of key block j to query block i (see harness/heatmap.py)"}
    with open(os.path.join(out, "heatmap.json"), "w") as f:
        json.dump({"meta": meta, "selected": sel_list,
                   "error": [[None if math.isnan(x) else float(x) for x in row] for row in e.tolist()]}, f)
    title = (f"FP4 ({args.fmt}) per-block contribution error, head {h}, S={args.seq_len}, "
             f"{source} workload\nselected at budget {args.budget:g}"
             + (f" hold {100 * share:.1f}% of the squared error" if share is not None else ""))
    why = plot(e, sel_mask, os.path.join(out, "heatmap.png"), title)
    if why:
        print(f"[heatmap] heatmap.png not written: {why}")
    finite = e[np.isfinite(e)]
    print(f"[heatmap] {e.shape[0]}x{e.shape[1]} blocks, error min {finite.min():.3e} median {np.median(finite):.3e} "
          f"max {finite.max():.3e}" + (f"; selected blocks hold {100 * share:.1f}% of the squared error"
                                       if share is not None else ""))
    print(f"[heatmap] wrote {out}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m harness.heatmap")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
