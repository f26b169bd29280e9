"""Benchmark output: a printed table, JSON, CSV and PNG plots in a timestamped results folder.

Rows are plain dicts (see ``ROW_FIELDS``); missing numbers are None. Plots need matplotlib (the optional
"plots" extra): without it they are skipped with a printed reason, the rest is still written.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

ROW_FIELDS = [
    "mode", "shape", "b", "sq", "skv", "hq", "hkv", "d", "causal", "dtype",
    "variant", "family", "budget", "status", "ms", "ms_p20", "ms_p80", "n_timed", "timer",
    "tflops", "gbs", "speedup_vs_fa2", "rel_l2", "max_abs_err", "floor_ms", "bound", "x_floor",
    "compile_s", "note",
]

_TABLE_COLS = [
    ("mode", "mode", "{}"), ("shape", "shape", "{}"), ("variant", "variant", "{}"),
    ("ms", "ms", "{:.4f}"), ("tflops", "TFLOP/s", "{:.1f}"), ("gbs", "GB/s", "{:.0f}"),
    ("speedup_vs_fa2", "xFA2", "{:.2f}"), ("rel_l2", "relL2", "{:.2e}"), ("max_abs_err", "maxerr", "{:.2e}"),
    ("floor_ms", "floor_ms", "{:.4f}"), ("x_floor", "x_floor", "{:.2f}"), ("status", "status", "{}"),
]


def utc_stamp(now: Optional[_dt.datetime] = None) -> str:
    """UTC timestamp usable as a folder name, e.g. 20261122T013000Z."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def results_dir(base: str = "results", stamp: Optional[str] = None) -> str:
    """Create and return ``<base>/<UTC timestamp>/``."""
    path = os.path.join(base, stamp or utc_stamp())
    os.makedirs(path, exist_ok=True)
    return path


def _fmt(v, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def format_table(rows: Sequence[dict], cols=_TABLE_COLS) -> str:
    """Fixed-width text table of the rows (skipped/errored rows show their status)."""
    header = [c[1] for c in cols]
    body = [[_fmt(r.get(key), fmt) for key, _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    for b in body:
        lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths)))
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """{"meta": ..., "rows": [...]} with NaN written as null."""
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump({"meta": clean(meta or {}), "rows": [clean(dict(r)) for r in rows]}, f, indent=1)
    return path


def write_csv(path: str, rows: Sequence[dict], fields: Sequence[str] = ROW_FIELDS) -> str:
    """One line per row, columns ROW_FIELDS (extra keys ignored)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt, None
    except Exception as e:
        return None, f"matplotlib not importable ({type(e).__name__}: {e}); install the 'plots' extra"


def plot_speed_vs_seqlen(rows: Sequence[dict], path: str) -> Optional[str]:
    """Per mode: TFLOP/s (prefill, x = Sq) or GB/s (decode, x = Skv) of every variant. Returns a skip reason."""
    plt, why = _pyplot()
    if plt is None:
        return why
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    modes = [m for m in ("prefill", "decode") if any(r["mode"] == m for r in ok)]
    if not modes:
        return "no timed rows to plot"
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in ok if r["mode"] == mode]
        xkey, ykey, ylab = ("sq", "tflops", "TFLOP/s") if mode == "prefill" else ("skv", "gbs", "GB/s (min bytes)")
        for var in sorted({r["variant"] for r in sub}):
            pts = sorted((r[xkey], r[ykey]) for r in sub if r["variant"] == var and r.get(ykey) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if var.startswith("thrift") else "-", label=var)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (Sq)" if mode == "prefill" else "KV length (Skv)")
        ax.set_ylabel(ylab)
        ax.set_title(f"{mode}: speed vs sequence length")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_pareto(rows: Sequence[dict], path: str, max_per_mode: int = 4) -> Optional[str]:
    """Error (relative L2 vs fp32) against time per shape: thrift budgets as a line, baselines as markers.
    One row of panels per mode (prefill, decode), the largest shapes first."""
    plt, why = _pyplot()
    if plt is None:
        return why
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms") and r.get("rel_l2") is not None]
    per_mode = []
    for mode in ("prefill", "decode"):
        shapes = []
        for r in ok:
            if r["mode"] == mode and r["shape"] not in shapes:
                shapes.append(r["shape"])
        shapes.sort(key=lambda sh: -max(r["sq"] * r["skv"] for r in ok if (r["mode"], r["shape"]) == (mode, sh)))
        if shapes:
            per_mode.append([(mode, sh) for sh in shapes[:max_per_mode]])
    if not per_mode:
        return "no rows with both time and error"
    ncol = max(len(x) for x in per_mode)
    fig, axes = plt.subplots(len(per_mode), ncol, figsize=(5.5 * ncol, 4.5 * len(per_mode)), squeeze=False)
    panels = []
    for ri, row_shapes in enumerate(per_mode):
        for ci in range(ncol):
            if ci < len(row_shapes):
                panels.append((axes[ri][ci], row_shapes[ci]))
            else:
                axes[ri][ci].axis("off")
    for ax, (mode, shape) in panels:
        sub = [r for r in ok if (r["mode"], r["shape"]) == (mode, shape)]
        groups: Dict[str, list] = {}
        for r in sub:
            if r["family"] == "thrift":
                groups.setdefault(re.sub(r"-(f[\d.e-]+|fp4only)$", "", r["variant"]), []).append(r)
        for gi, (gname, grp) in enumerate(sorted(groups.items())):
            thr = sorted(grp, key=lambda r: r.get("budget") or 0.0)
            ax.plot([r["ms"] for r in thr], [max(r["rel_l2"], 1e-7) for r in thr], "o-", color=f"C{3 + gi}",
                    label=f"{gname} (budgets)")
            for r in thr:
                ax.annotate(f"f={r.get('budget') or 0:g}", (r["ms"], max(r["rel_l2"], 1e-7)), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        for i, r in enumerate(x for x in sub if x["family"] != "thrift"):
            ax.plot([r["ms"]], [max(r["rel_l2"], 1e-7)], marker="sD^vP*X"[i % 7], linestyle="none",
                    color=f"C{i % 3}", label=r["variant"])
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("time (ms, median, log)")
        ax.set_ylabel("relative L2 error vs fp32")
        ax.set_title(f"{mode} {shape}", fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(rows: Sequence[dict], out_dir: str, meta: Optional[dict] = None, *, plots: bool = True,
              echo: bool = True) -> Dict[str, str]:
    """table.txt, results.json, results.csv and (if matplotlib) speed_vs_seqlen.png, pareto.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    table = format_table(rows)
    files["table"] = os.path.join(out_dir, "table.txt")
    with open(files["table"], "w") as f:
        f.write(table + "\n")
    files["json"] = write_json(os.path.join(out_dir, "results.json"), rows, meta)
    files["csv"] = write_csv(os.path.join(out_dir, "results.csv"), rows)
    if plots:
        for key, fn in (("speed_png", plot_speed_vs_seqlen), ("pareto_png", plot_pareto)):
            path = os.path.join(out_dir, f"{'speed_vs_seqlen' if key == 'speed_png' else 'pareto'}.png")
            why = fn(rows, path)
            if why:
                print(f"[report] {os.path.basename(path)} not written: {why}")
            else:
                files[key] = path
    if echo:
        print(table)
        print(f"[report] wrote {', '.join(sorted(os.path.basename(p) for p in files.values()))} to {out_dir}")
    return files


def load_rows(path: str) -> List[dict]:
    """Rows back from a results.json."""
    with open(path) as f:
        return list(json.load(f)["rows"])


def rows_from(iterable: Iterable[dict]) -> List[dict]:
    """Normalise dicts to ROW_FIELDS (missing keys -> None), keeping extra keys."""
    out = []
    for r in iterable:
        d = {k: r.get(k) for k in ROW_FIELDS}
        d.update({k: v for k, v in r.items() if k not in d})
        out.append(d)
    return out


def recompute_speedups(rows: List[dict], baseline: str = "fa2-sdpa") -> List[dict]:
    """speedup_vs_fa2 = time of `baseline` on the same (mode, shape) / row time (after merging runs)."""
    ref = {(r["mode"], r["shape"]): r["ms"] for r in rows
           if r.get("variant") == baseline and r.get("status") == "ok" and r.get("ms")}
    for r in rows:
        t = ref.get((r.get("mode"), r.get("shape")))
        r["speedup_vs_fa2"] = (t / r["ms"]) if (t and r.get("ms") and r.get("status") == "ok") else None
    return rows


def merge(paths: Sequence[str], out_dir: str, *, plots: bool = True) -> Dict[str, str]:
    """Merge several results.json (e.g. baselines and thrift run in separate processes) into one report."""
    rows: List[dict] = []
    metas = []
    for pth in paths:
        if os.path.isdir(pth):
            pth = os.path.join(pth, "results.json")
        if not os.path.exists(pth):
            print(f"[report] {pth} missing: skipped")
            continue
        with open(pth) as f:
            data = json.load(f)
        rows += data.get("rows", [])
        metas.append(dict(data.get("meta", {}), source=pth))
    if not rows:
        raise ValueError(f"paths: no rows found in {list(paths)}")
    order = {"prefill": 0, "decode": 1}
    rows.sort(key=lambda r: (order.get(r.get("mode"), 2), r.get("sq") or 0, r.get("skv") or 0,
                             r.get("family") != "baseline", r.get("variant") or ""))
    rows = recompute_speedups(rows_from(rows))
    return write_all(rows, out_dir, {"merged_from": metas}, plots=plots)


def main(argv=None) -> int:
    """`python -m harness.report merge A B ... --out DIR`: merge results and redraw table/CSV/plots."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harness.report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge results.json files (or folders) into one report")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    merge(args.inputs, args.out, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
