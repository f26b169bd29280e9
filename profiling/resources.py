"""`python -m profiling.resources`: static tile-schedule report, no GPU needed.

For every shipped schedule of every kernel (profiling/compile_targets.py) and each arch (default sm_120a and
sm_90a) it compiles with fake tensors in a subprocess per arch (the CuTe DSL reads CUTE_DSL_ARCH & co. at
import), then reads, per kernel entry:

- registers/thread, spill stores/loads, stack frame, static smem: ``ptxas -arch=<arch> -v`` on the DSL's PTX
  (ptxas from PATH or $PTXAS; the DSL embeds its own ptxas for the cubin, so numbers can differ slightly);
- dynamic smem per CTA and threads per CTA: the launch configuration in the compiled host IR (the DSL infers
  the dynamic size from the kernel's SmemAllocator) and the PTX's .reqntid/.maxntid;
- CTAs per SM the arch allows from registers, shared memory, warps and the CTA cap (ARCH_LIMITS, with the
  limiting resource named);
- the PTX MMA instruction mix (every mma.sync / wgmma / tcgen05.mma variant, incl. kind::mxf4nvf4.block_scale)
  plus a few data-movement counts (ldmatrix, cp.async, ...). Counts are static (instructions in the code).

``main(argv=None)`` prints the table (``--json`` writes the rows); ``collect(archs, ...)`` returns the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = ("sm_120a", "sm_90a")

# Per-SM / per-CTA limits. Sources: CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability" (CC 12.0: 64K 32-bit registers/SM, 255 regs/thread, 48 resident warps (1536 threads)/SM,
# 32 resident CTAs/SM, 100 KB shared memory/SM, 99 KB max per CTA; CC 9.0: 64K regs, 64 warps (2048 threads),
# 32 CTAs, 228 KB/SM, 227 KB per CTA), 1 KB of shared memory reserved by the system per CTA (CC >= 8.0), and
# registers allocated per warp in units of 256. The per-CTA smem maxima match the DSL's own table
# (cutlass.cutlass_dsl SMEM_CAPACITY_MAP: sm_120 = (100-1) KB, sm_90 = (228-1) KB).
ARCH_LIMITS: Dict[str, dict] = {
    "sm_120": dict(regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit=256, max_warps=48, max_ctas=32,
                   smem_per_sm=100 * 1024, smem_per_cta=99 * 1024, smem_reserved_per_cta=1024, smem_unit=128),
    "sm_90": dict(regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit=256, max_warps=64, max_ctas=32,
                  smem_per_sm=228 * 1024, smem_per_cta=227 * 1024, smem_reserved_per_cta=1024, smem_unit=128),
}
ARCH_LIMITS["sm_121"] = ARCH_LIMITS["sm_120"]
ARCH_LIMITS["sm_100"] = dict(ARCH_LIMITS["sm_90"], max_warps=64)


def limits_for(arch: str) -> dict:
    """Limits of 'sm_120a' / 'sm_90a' / ... (the 'a' suffix ignored)."""
    base = re.sub(r"[af]$", "", arch)
    if base not in ARCH_LIMITS:
        raise ValueError(f"arch: expected one of {sorted(ARCH_LIMITS)} (optionally with 'a'), got {arch!r}")
    return ARCH_LIMITS[base]


def ctas_per_sm(arch: str, regs: int, threads: int, smem_bytes: int) -> dict:
    """CTAs per SM allowed by registers, shared memory, warps and the CTA cap; ``limiter`` names the minimum."""
    lim = limits_for(arch)
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // warps if regs <= lim["max_regs_per_thread"] else 0
    smem_cta = -(-max(smem_bytes, 0) // lim["smem_unit"]) * lim["smem_unit"]
    if smem_cta > lim["smem_per_cta"]:
        by_smem = 0
    else:
        by_smem = lim["smem_per_sm"] // (smem_cta + lim["smem_reserved_per_cta"])
    by_warps = lim["max_warps"] // warps
    cands = {"regs": by_regs, "smem": by_smem, "warps": by_warps, "cta_cap": lim["max_ctas"]}
    n = min(cands.values())
    limiter = min(cands, key=lambda k: (cands[k], ["smem", "regs", "warps", "cta_cap"].index(k)))
    return {"ctas_per_sm": n, "limiter": limiter, "occupancy_warps": n * warps,
            "occupancy_pct": round(100.0 * n * warps / lim["max_warps"], 1), **{f"by_{k}": v for k, v in cands.items()}}


# ------------------------------------------------------------------------------------------ PTX / ptxas parsing

_ENTRY_RE = re.compile(r"^\s*\.(?:visible\s+)?\.entry\s+([A-Za-z_$][\w$]*)\s*\(", re.M)
_MMA_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:mma|wgmma\.mma_async|tcgen05\.mma)[\w.:]*)", re.M)
_OTHER_OPS = {
    "ldmatrix": r"ldmatrix\.", "stmatrix": r"stmatrix\.", "cp.async": r"cp\.async\.(?!bulk)",
    "cp.async.bulk": r"cp\.async\.bulk", "ld.global": r"ld\.global", "st.global": r"st\.global",
    "ld.shared": r"ld\.shared", "st.shared": r"st\.shared", "bar.sync": r"bar(?:rier)?\.sync",
    "shfl": r"shfl\.sync", "ex2": r"ex2\.approx", "cvt.e2m1": r"cvt\.rn\.satfinite\.e2m1x2",
    "cvt.e4m3": r"cvt\.rn\.satfinite\.e4m3x2",
}
_OTHER_RE = {k: re.compile(r"^\s*(?:@!?%\w+\s+)?" + v, re.M) for k, v in _OTHER_OPS.items()}


def split_ptx_entries(ptx: str) -> Dict[str, str]:
    """{entry name: its PTX text} for every .entry in a PTX module."""
    ms = list(_ENTRY_RE.finditer(ptx))
    out = {}
    for i, m in enumerate(ms):
        end = ms[i + 1].start() if i + 1 < len(ms) else len(ptx)
        out[m.group(1)] = ptx[m.start():end]
    return out


def mma_mix(ptx_text: str) -> Dict[str, int]:
    """Static count of each MMA opcode (full PTX spelling, e.g. mma.sync.aligned.m16n8k16.row.col.f32.bf16...)."""
    counts: Dict[str, int] = {}
    for m in _MMA_RE.finditer(ptx_text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items()))


def other_mix(ptx_text: str) -> Dict[str, int]:
    """Static counts of a few data-movement / special instructions (only the non-zero ones)."""
    out = {}
    for k, rx in _OTHER_RE.items():
        n = len(rx.findall(ptx_text))
        if n:
            out[k] = n
    return out


def threads_from_ptx(entry_ptx: str) -> Optional[int]:
    m = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", entry_ptx)
    if not m:
        return None
    x, y, z = (int(g) if g else 1 for g in m.groups())
    return x * y * z


def parse_ptxas(text: str) -> Dict[str, dict]:
    """{entry: {registers, spill_stores, spill_loads, stack_bytes, smem_static, barriers}} from ``ptxas -v``."""
    out: Dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for)\s+'?([\w$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": None, "spill_stores": 0, "spill_loads": 0,
                                              "stack_bytes": 0, "smem_static": 0, "barriers": None})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            if b:
                cur["barriers"] = int(b.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_static"] = int(s.group(1)) if s else 0
    return out


def run_ptxas(ptx_path: str, arch: str) -> dict:
    """``ptxas -arch=<arch> -v`` on one PTX file; returns parse_ptxas() of its report (or {'_error': ...})."""
    exe = os.environ.get("PTXAS") or shutil.which("ptxas")
    if not exe:
        return {"_error": "ptxas not found (set $PTXAS or put CUDA's bin on PATH)"}
    r = subprocess.run([exe, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True)
    if r.returncode != 0:
        return {"_error": f"ptxas failed: {(r.stderr or r.stdout).strip()[:300]}"}
    return parse_ptxas(r.stdout + "\n" + r.stderr)


def parse_launch_configs(ir_text: str) -> List[dict]:
    """Launches in the compiled host IR, in order: {'kernel': symbol, 'smem_dynamic': bytes or None}.

    The DSL fills a cudaLaunchConfig-like struct {grid[3], block[3], i64 dynamicSmemBytes, stream, attrs, n} and
    calls _cudaLaunchKernelEx with the kernel's @kernels_<name> global; the smem field holds a constant once
    the DSL has inferred the kernel's SmemAllocator usage (None when it is a run-time value)."""
    launches = []
    for fn in re.split(r"\n\s*llvm\.func ", ir_text):
        consts = dict(re.findall(r"(%\w+) = llvm\.mlir\.constant\((-?\d+) : i64\)", fn))
        cfg_allocas = re.findall(r"(%\w+) = llvm\.alloca %\w+ x !llvm\.struct<\(array<3 x i32>, array<3 x i32>, i64",
                                 fn)
        smem_vals = []
        for a in cfg_allocas:
            gep = re.search(rf"(%\w+) = llvm\.getelementptr {re.escape(a)}\[0, 2\]", fn)
            val = None
            if gep:
                st = re.search(rf"llvm\.store (%\w+), {re.escape(gep.group(1))} : i64", fn)
                if st and st.group(1) in consts:
                    val = int(consts[st.group(1)])
            smem_vals.append(val)
        kernels = re.findall(r"llvm\.mlir\.addressof @kernels_([\w$]+)\s*:", fn)
        calls = fn.count("llvm.call @_cudaLaunchKernelEx")
        if not calls:
            continue
        kernels = kernels[-calls:] if len(kernels) >= calls else kernels + [None] * (calls - len(kernels))
        for i in range(calls):
            launches.append({"kernel": kernels[i], "smem_dynamic": smem_vals[i] if i < len(smem_vals) else None})
    return launches


# ------------------------------------------------------------------------------------------ worker (one arch)

def _clean_msg(msg: str, n: int = 300) -> str:
    """One line, no ANSI colour codes (DSL errors carry both)."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(msg))
    return " ".join(msg.split())[:n]


def _rows_for_compiled(compiled, base: dict, arch: str, work: str, stem: str, compile_s: float,
                       note: str) -> List[dict]:
    """One row per kernel entry of one compiled object."""
    ptx = getattr(getattr(compiled, "artifacts", None), "PTX", None)
    if not ptx:
        return [{**base, "status": "error", "note": "no PTX in compiled.artifacts (CUTE_DSL_KEEP=ptx?)"}]
    if os.path.exists(str(ptx)) and not str(ptx).lstrip().startswith("//"):
        with open(ptx) as f:
            ptx = f.read()
    ptx_path = os.path.join(work, f"{stem}.{arch}.ptx")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    stats = run_ptxas(ptx_path, arch)
    try:
        launches = parse_launch_configs(str(compiled.ir_module))
    except Exception:
        launches = []
    rows = []
    for name, eptx in split_ptx_entries(ptx).items():
        st = stats.get(name, {})
        dyn = next((l["smem_dynamic"] for l in launches if l["kernel"] == name), None)
        threads = threads_from_ptx(eptx)
        row = {**base, "entry": name, "status": "ok" if "_error" not in stats else "error",
               "compile_s": compile_s, "threads": threads, "registers": st.get("registers"),
               "spill_stores": st.get("spill_stores"), "spill_loads": st.get("spill_loads"),
               "stack_bytes": st.get("stack_bytes"), "barriers": st.get("barriers"),
               "smem_static": st.get("smem_static"), "smem_dynamic": dyn,
               "mma_mix": mma_mix(eptx), "other_mix": other_mix(eptx), "ptx": ptx_path, "note": note}
        if "_error" in stats:
            row["note"] = stats["_error"]
        if row["registers"] is not None and threads:
            smem_total = (row["smem_static"] or 0) + (dyn or 0)
            row["smem_total"] = smem_total
            row.update(ctas_per_sm(arch, row["registers"], threads, smem_total))
            if dyn is None:
                row["note"] = (row["note"] + "; " if row["note"] else "") + "dynamic smem not constant/unknown"
        rows.append(row)
    return rows


def _keep(name: str, schedule: str, kernels, schedules) -> bool:
    if kernels and not any(name.startswith(k) for k in kernels):
        return False
    if schedules and not any(schedule.startswith(x) for x in schedules):
        return False
    return True


def _worker(arch: str, json_out: str, kernels: Optional[Sequence[str]], demo: bool,
            schedules: Optional[Sequence[str]] = None, quick: bool = False) -> int:
    """Runs in a subprocess whose CUTE_DSL_* env is already set: compile each target, write rows as JSON."""
    sys.path.insert(0, ROOT)
    from profiling import compile_targets as ct

    work = os.environ.get("CUTE_DSL_DUMP_DIR") or tempfile.mkdtemp(prefix="resources_")
    targets, skipped = ct.discover(arch, include_demo=demo)
    rows: List[dict] = []
    for s in skipped:
        if kernels and not any(s.kernel.startswith(k) for k in kernels):
            continue
        rows.append({"arch": arch, "kernel": s.kernel, "schedule": s.schedule, "status": "skip", "note": s.reason})
    seen = set()
    for t in targets:
        if not _keep(t.kernel, t.schedule, kernels, schedules):
            continue
        if quick and t.kernel in seen:  # --quick: the first (default) schedule of each kernel only
            continue
        seen.add(t.kernel)
        base = {"arch": arch, "kernel": t.kernel, "schedule": t.schedule}
        t0 = time.time()
        try:
            compiled = t.compile()
        except Exception as e:
            rows.append({**base, "status": "error", "note": "compile failed: " + _clean_msg(f"{type(e).__name__}: {e}")})
            continue
        compile_s = round(time.time() - t0, 2)
        objs = list(compiled) if isinstance(compiled, (tuple, list)) else [compiled]
        for oi, obj in enumerate(objs):
            rows += _rows_for_compiled(obj, base, arch, work, f"{t.kernel}.{t.schedule}.{oi}", compile_s, t.note)
    with open(json_out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------ driver

def collect(archs: Sequence[str] = DEFAULT_ARCHS, *, kernels: Optional[Sequence[str]] = None, demo: bool = True,
            keep_dir: Optional[str] = None, timeout: float = 900.0,
            schedules: Optional[Sequence[str]] = None, quick: bool = False) -> List[dict]:
    """Compile every target for every arch (one subprocess per arch) and return the rows."""
    rows: List[dict] = []
    for arch in archs:
        limits_for(arch)  # validate early
        dump = os.path.join(keep_dir, arch) if keep_dir else tempfile.mkdtemp(prefix=f"resources_{arch}_")
        os.makedirs(dump, exist_ok=True)  # the DSL writes nothing unless the dump dir already exists
        out_json = os.path.join(dump, "rows.json")
        # file caching off: a compiled object restored from the DSL's disk cache may carry no PTX / host IR
        env = dict(os.environ, CUTE_DSL_ARCH=arch, CUTE_DSL_KEEP="ptx,cubin", CUTE_DSL_DUMP_DIR=dump,
                   CUTE_DSL_DISABLE_FILE_CACHING="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "profiling.resources", "--_worker", "--arch", arch, "--_json-out", out_json]
        if kernels:
            cmd += ["--kernels", ",".join(kernels)]
        if not demo:
            cmd += ["--no-demo"]
        if schedules:
            cmd += ["--schedules", ",".join(schedules)]
        if quick:
            cmd += ["--quick"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.exists(out_json):
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            rows.append({"arch": arch, "kernel": "*", "schedule": "*", "status": "error",
                         "note": "worker failed: " + " | ".join(tail)[:400]})
            continue
        with open(out_json) as f:
            rows += json.load(f)
        if not keep_dir:
            shutil.rmtree(dump, ignore_errors=True)
    return rows


def short_entry(entry: str) -> str:
    """Readable kernel name from the DSL's mangled entry, e.g. 'ThriftDecodeCombine' or 'demo_gemm_kernel'."""
    m = re.match(r"kernel_cutlass_(?:kernel_)?(.*?)(?:_object_at_|_tensor|$)", entry or "")
    name = m.group(1) if m else (entry or "")
    name = re.sub(r"^(?:kernels(?:prefill|decode|fp4_mma_sm120)?|quantquant_kernel)", "", name).lstrip("_")
    return name[:40] or (entry or "")[:40]


def _short_mma(name: str) -> str:
    return name.replace("mma.sync.aligned.", "").replace("wgmma.mma_async.sync.aligned.", "wgmma.")


def format_rows(rows: Sequence[dict]) -> str:
    """Text table: one line per (arch, kernel, schedule, entry) plus its MMA mix."""
    cols = ["arch", "kernel", "schedule", "entry", "thr", "regs", "spill st/ld", "stack", "smem KB (st+dyn)",
            "CTAs/SM (limiter)", "occ%", "status"]
    lines = []
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r.get("arch", ""), r.get("kernel", ""), r.get("schedule", ""), "", "", "", "", "", "", "", "",
                         f"{r.get('status')}: {r.get('note', '')}"[:120]])
            continue
        st, dy = r.get("smem_static") or 0, r.get("smem_dynamic")
        smem = f"{(st + (dy or 0)) / 1024:.1f} ({st}+{dy if dy is not None else '?'})"
        body.append([r["arch"], r["kernel"], r["schedule"], short_entry(r.get("entry", "")), str(r.get("threads")),
                     str(r.get("registers")),
                     f"{r.get('spill_stores')}/{r.get('spill_loads')}", str(r.get("stack_bytes")), smem,
                     f"{r.get('ctas_per_sm', '?')} ({r.get('limiter', '?')})", str(r.get("occupancy_pct", "?")),
                     "ok"])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r, b in zip(rows, body):
        lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths)))
        if r.get("status") == "ok":
            mix = ", ".join(f"{_short_mma(k)} x{v}" for k, v in (r.get("mma_mix") or {}).items()) or "no MMA"
            lines.append(f"    MMA: {mix}")
            if r.get("other_mix"):
                lines.append("    other: " + ", ".join(f"{k} x{v}" for k, v in r["other_mix"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.resources", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="target arch (repeatable); default sm_120a and sm_90a")
    ap.add_argument("--kernels", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated kernel name prefixes to keep (e.g. prefill,decode)")
    ap.add_argument("--schedules", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated schedule name prefixes to keep (e.g. m64_w4_s2)")
    ap.add_argument("--quick", action="store_true",
                    help="only the first (default) schedule of each kernel and no demo kernel (a fast overview)")
    ap.add_argument("--no-demo", action="store_true", help="leave out the built-in demo kernel")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--keep", help="keep PTX/cubin dumps under this folder (one subfolder per arch)")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_json-out", dest="json_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker(args.arch[0], args.json_out, args.kernels, not args.no_demo, args.schedules, args.quick)
    archs = args.arch or list(DEFAULT_ARCHS)
    rows = collect(archs, kernels=args.kernels, demo=not (args.no_demo or args.quick), keep_dir=args.keep,
                   schedules=args.schedules, quick=args.quick)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
