"""Where the FP4 attention error comes from, and which NVFP4 encoder choice pays (issue 7 probes, CPU).

Two subcommands on SmolLM2-135M over the Austen corpus (same windows as `python -m harness quality`, seed 0):

  parts   kernel-level relative L2 ||O - O_exact|| / ||O_exact|| of the attention output on the Q/K/V captured from
          the exact run of the first 2k window, with FP4 applied to only some operands (q, k, v, p or any
          combination; the others stay exact): which quantization dominates the error.
          python -m profiling.quality.fp4_levers_probe parts --variants fp4,thrift-5,thrift-5+hadamard --parts qkvp,qk,q,k,v,p
  nll     mean NLL and recovery of the FP4 -> exact gap (exact and fp4 rows from the same run) at one context,
          with the "mse" scale rule's candidate set overridden (--mse-steps="1,2;-1,1,2": one row per set) and/or
          one more row with the "4/6" rule (per 16-group: scale from amax/6 or amax/4, the lower squared error
          wins; --four-six) instead of mse for Q/K/V.
          python -m profiling.quality.fp4_levers_probe nll --variants thrift-5+hadamard+mse --mse-steps="1,2;-1,1,2" --four-six

Both monkeypatch the emulation's quantizer hooks (harness.hf_backend._fq / quantize_p_fast) in this process only.
"""
from __future__ import annotations

import argparse
import time

import torch


def _load():
    from harness import hf_backend as hb
    from harness import quality as hq
    from harness.corpus import NOVELS, load_novels
    model, tok = hb.load_smollm2()
    text = "\n\n\n".join(load_novels()[n] for n in NOVELS)
    return hb, hq, model, hq._token_ids(tok, "smollm2_all", text)


def _four_six(x: torch.Tensor, dim: int) -> torch.Tensor:
    """NVFP4 fake quantization with the "4/6" scale choice per 16-group (amax/6 or amax/4, lower SSE wins)."""
    from quant import nvfp4
    from quant._fp4common import e2m1_decode, e2m1_encode, fdiv
    xt = x.float().movedim(dim, -1)
    n = xt.shape[-1]
    xt = torch.nn.functional.pad(xt, (0, (-n) % 16))
    g = xt.reshape(-1, xt.shape[-1] // 16, 16)
    amax = g.abs().amax(-1)
    best = berr = None
    for div in (6.0, 4.0):
        s = torch.clamp(fdiv(amax, div), max=448.0).to(nvfp4.SCALE_DTYPE).float()
        ok = s > 0
        dq = e2m1_decode(e2m1_encode(g / torch.where(ok, s, 1.0)[..., None])) * s[..., None]
        err = nvfp4.group_sse(g, torch.where(ok, s, 1.0))
        if best is None:
            best, berr = dq, err
        else:
            take = (err < berr)[..., None]
            best, berr = torch.where(take, dq, best), torch.minimum(err, berr)
    return best.reshape(xt.shape)[..., :n].movedim(-1, dim)


class _Hooks:
    """Replace the emulation's quantizers: FP4 only for the operands in `parts`; optional 4/6 rule."""

    def __init__(self, hb, parts: str = "qkvp", four_six: bool = False):
        self.hb, self.parts, self.four_six = hb, parts, four_six
        self.orig_fq, self.orig_qp, self.n = hb._fq, hb.quantize_p_fast, 0

    def __enter__(self):
        hb = self.hb

        def fq(fmt_obj, x, dim, gs, rule="amax"):
            part = "kvq"[self.n % 3]  # emulated_attention quantizes K, V, then Q per (batch, KV head)
            self.n += 1
            if part not in self.parts:
                return x.float()
            return _four_six(x, dim) if self.four_six else self.orig_fq(fmt_obj, x, dim, gs, rule)

        def qp(p, **kw):
            return self.orig_qp(p, **kw) if "p" in self.parts else p
        hb._fq, hb.quantize_p_fast = fq, qp
        return self

    def __exit__(self, *exc):
        self.hb._fq, self.hb.quantize_p_fast = self.orig_fq, self.orig_qp


def cmd_parts(args) -> int:
    from kernels.reference import attention_exact
    hb, hq, model, ids = _load()
    st = hq.make_windows(len(ids), args.context + 1, 3 if args.context == 2048 else 1, 0)[0]
    layers = [int(x) for x in args.layers.split(",")]
    with hb.use_thrift(model, "exact"), hb.capture_qkv(layers) as cap:
        hq.token_nll(model, ids[st:st + args.context + 1])
    caps = {l: tuple(t.clone() for t in cap[l]) for l in layers}
    print(f"layers {layers}, context {args.context}, window start {st}")
    for v in args.variants.split(","):
        for parts in args.parts.split(","):
            errs = []
            for l in layers:
                q, k, vv = caps[l]
                ref = attention_exact(q, k, vv, causal=True).double()
                with _Hooks(hb, parts, args.four_six) as h:
                    h.n = 0
                    o = hb.emulated_attention(q, k, vv, hb.get_variant(v), causal=True).double()
                errs.append(((o - ref).norm() / ref.norm()).item())
            print(f"{v:28s} fp4 on {parts:5s} mean {sum(errs) / len(errs):.4f}  " +
                  " ".join(f"L{l}={e:.4f}" for l, e in zip(layers, errs)), flush=True)
    return 0


def cmd_nll(args) -> int:
    from quant import nvfp4
    hb, hq, model, ids = _load()
    nw = 3 if args.context == 2048 else 1
    starts = hq.make_windows(len(ids), args.context + 1, nw, 0)
    default_steps = nvfp4.MSE_SCALE_STEPS
    step_sets = [tuple(int(x) for x in grp.split(",")) for grp in args.mse_steps.split(";") if grp] or [default_steps]

    def nll(v, four_six=False):
        vals = []
        for st in starts:
            with hb.use_thrift(model, v), _Hooks(hb, "qkvp", four_six):
                vals.append(float(hq.token_nll(model, ids[st:st + args.context + 1]).mean()))
        return sum(vals) / len(vals)
    ex, f4 = nll("exact"), nll("fp4")
    print(f"context {args.context}, {nw} windows: exact {ex:.4f}, fp4 {f4:.4f}", flush=True)
    runs = [(steps, False) for steps in step_sets] + ([(default_steps, True)] if args.four_six else [])
    for steps, four_six in runs:
        nvfp4.MSE_SCALE_STEPS = steps
        for v in args.variants.split(","):
            t0 = time.time()
            m = nll(v, four_six)
            tag = "4/6 rule instead of mse for Q/K/V" if four_six else f"mse steps {steps}"
            print(f"{v} [{tag}]: NLL {m:.4f}, recovery {100 * (f4 - m) / (f4 - ex):.1f}% ({time.time() - t0:.0f} s)",
                  flush=True)
    nvfp4.MSE_SCALE_STEPS = default_steps
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("parts")
    a.add_argument("--variants", default="fp4,thrift-5,thrift-5+hadamard")
    a.add_argument("--parts", default="qkvp,qk,q,k,v,p")
    a.add_argument("--layers", default="0,5,10,15,20,25,29")
    a.add_argument("--context", type=int, default=2048)
    a.add_argument("--four-six", action="store_true")
    b = sub.add_parser("nll")
    b.add_argument("--variants", default="thrift-5+hadamard+mse")
    b.add_argument("--context", type=int, default=2048)
    b.add_argument("--mse-steps", default="", help='candidate sets, e.g. "1,2;-1,1,2" (default: nvfp4.MSE_SCALE_STEPS)')
    b.add_argument("--four-six", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return cmd_parts(args) if args.cmd == "parts" else cmd_nll(args)


if __name__ == "__main__":
    raise SystemExit(main())
