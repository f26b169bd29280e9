"""What `profiling.resources` compiles: one entry per (kernel, schedule), each a no-GPU fake-tensor compile.

Import this module only in a process whose CUTE_DSL_ARCH / CUTE_DSL_KEEP / CUTE_DSL_DUMP_DIR are already set:
the DSL reads them at import (profiling.resources runs one subprocess per arch for that reason).

Sources, each used when importable (otherwise listed in ``skipped`` with the reason):
- ``demo``: profiling/demo_kernel.py, a tiny smem-staged mma.sync GEMM, so the tool is testable on its own;
- ``fp4_tile_sm120``: kernels/fp4_mma_sm120.py ``compile_demo`` (SM120 block-scaled FP4 attention tile;
  sm_120a only);
- any kernels module that exposes ``compile_targets(arch) -> iterable`` of
  ``(kernel_name, schedule_name, zero_arg_compile_fn)`` or dicts with those keys (``kernel``, ``schedule``,
  ``compile``, optional ``note``). This is the protocol the prefill and decode modules are asked to provide;
  ``_prefill_targets`` / ``_decode_targets`` below adapt their public classes while they do not.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, List, Tuple


@dataclasses.dataclass
class CompileTarget:
    kernel: str
    schedule: str
    compile: Callable[[], object]   # -> what cute.compile returned (.artifacts, .ir_module), or a tuple of them
    note: str = ""


@dataclasses.dataclass
class SkippedTarget:
    kernel: str
    schedule: str
    reason: str


def _demo_targets(arch: str) -> List[CompileTarget]:
    import cutlass.cute as cute

    from profiling import demo_kernel as dk

    return [CompileTarget("demo_gemm", "t64x64x32_w4", lambda: cute.compile(dk.demo_gemm, *dk.fake_args()),
                          "profiling/demo_kernel.py (tool self-test)")]


def _fp4_tile_targets(arch: str) -> Tuple[List[CompileTarget], List[SkippedTarget]]:
    try:
        mod = importlib.import_module("kernels.fp4_mma_sm120")
    except Exception as e:
        return [], [SkippedTarget("fp4_tile_sm120", "-", f"kernels.fp4_mma_sm120 not importable: {e!r}"[:200])]
    if not hasattr(mod, "compile_demo"):
        return [], [SkippedTarget("fp4_tile_sm120", "-", "kernels.fp4_mma_sm120 has no compile_demo")]
    if not arch.startswith("sm_12"):
        return [], [SkippedTarget("fp4_tile_sm120", "d128_nvfp4", f"SM120 block-scaled MMA only; not built for {arch}")]
    out = []
    for fmt in ("nvfp4", "mxfp4"):
        out.append(CompileTarget("fp4_tile_sm120", f"d128_{fmt}", lambda fmt=fmt: mod.compile_demo(128, fmt),
                                 "kernels/fp4_mma_sm120.py compile_demo"))
    return out, []


def _protocol_targets(mod_name: str, arch: str) -> Tuple[List[CompileTarget], List[SkippedTarget], bool]:
    """Targets from ``<mod>.compile_targets(arch)`` if the module defines it; third value: protocol found."""
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            return [], [SkippedTarget(mod_name, "-", f"{mod_name} not in this checkout yet")], False
        return [], [SkippedTarget(mod_name, "-", f"{mod_name} import failed: {e!r}"[:200])], False
    except Exception as e:
        return [], [SkippedTarget(mod_name, "-", f"{mod_name} import failed: {e!r}"[:200])], False
    fn = getattr(mod, "compile_targets", None)
    if fn is None:
        return [], [], False
    out, skipped = [], []
    try:
        items = list(fn(arch))
    except Exception as e:
        return [], [SkippedTarget(mod_name, "-", f"{mod_name}.compile_targets({arch!r}) failed: {e!r}"[:200])], True
    for it in items:
        if isinstance(it, dict):
            out.append(CompileTarget(str(it["kernel"]), str(it["schedule"]), it["compile"], str(it.get("note", ""))))
        else:
            kname, sname, cfn = it[:3]
            out.append(CompileTarget(str(kname), str(sname), cfn, mod_name))
    return out, skipped, True


def _arch_int(arch: str) -> int:
    """'sm_120a' -> 120, 'sm_90a' -> 90."""
    digits = "".join(ch for ch in arch.split("_", 1)[-1] if ch.isdigit())
    if not digits:
        raise ValueError(f"arch: expected 'sm_<NN>[a]', got {arch!r}")
    return int(digits)


def _prefill_targets(arch: str) -> Tuple[List[CompileTarget], List[SkippedTarget]]:
    """Adapter for kernels/prefill.py's compile_prefill(dtype, head_dim, causal, schedule, arch) over every
    schedule in kernels.schedules.SCHEDULES (bf16, head_dim 128, causal: the production configuration)."""
    try:
        pf = importlib.import_module("kernels.prefill")
        sch = importlib.import_module("kernels.schedules")
    except Exception as e:
        return [], [SkippedTarget("prefill", "-", f"kernels.prefill/schedules not importable: {e!r}"[:200])]
    if not hasattr(pf, "compile_prefill") or not hasattr(sch, "SCHEDULES"):
        return [], [SkippedTarget("prefill", "-", "kernels.prefill has no compile_prefill / SCHEDULES")]
    import cutlass

    out = []
    for name, schedule in sch.SCHEDULES.items():
        def build(schedule=schedule):
            return pf.compile_prefill(cutlass.BFloat16, 128, True, schedule, _arch_int(arch))

        out.append(CompileTarget("prefill", f"{name}_d128_bf16_causal", build, "kernels/prefill.py compile_prefill"))
    return out, []


def _decode_targets(arch: str) -> Tuple[List[CompileTarget], List[SkippedTarget]]:
    """Adapter for kernels/decode.py's compile_decode(head_dim, num_kv_heads, group, dtype_name, arch, config=...),
    which returns (split-KV decode kernel, combine kernel). Compile-time variants: the GQA group / head_dim with the
    default DecodeConfig, and the DecodeConfig schedules worth comparing at D=128, G=4 (the split count is a run-time
    choice: decode_interface.plan_splits)."""
    try:
        dec = importlib.import_module("kernels.decode")
    except Exception as e:
        return [], [SkippedTarget("decode", "-", f"kernels.decode not importable: {e!r}"[:200])]
    if not hasattr(dec, "compile_decode"):
        return [], [SkippedTarget("decode", "-", "kernels.decode has no compile_decode")]
    out = []
    for d, hkv, g in ((128, 8, 4), (128, 8, 1)):
        def build(d=d, hkv=hkv, g=g):
            return dec.compile_decode(d, hkv, g, "bf16", _arch_int(arch))

        out.append(CompileTarget("decode", f"d{d}_kv{hkv}_g{g}_bf16", build, "kernels/decode.py compile_decode"))
    # DecodeConfig variants (kernels/decode.py): whole-tile stages, deeper ring, the register cap, dynamic work
    for tag, kw in (("parts1_st2", {"parts": 1, "stages": 2}),
                    ("parts2_st4", {"parts": 2, "stages": 4, "work": "static"}),
                    ("min_ctas15", {"min_ctas": 15}), ("work_dynamic", {"work": "dynamic"})):
        def build(kw=kw):
            return dec.compile_decode(128, 8, 4, "bf16", _arch_int(arch), **kw)

        out.append(CompileTarget("decode", f"d128_kv8_g4_bf16_{tag}", build, f"compile_decode(..., {kw})"))
    return out, []


def _quant_targets(arch: str) -> Tuple[List[CompileTarget], List[SkippedTarget]]:
    """quant/quant_kernel.py compile_quant(dtype, head_dim): the Q/K/V -> packed FP4 pass ahead of the prefill."""
    try:
        qk = importlib.import_module("quant.quant_kernel")
    except Exception as e:
        return [], [SkippedTarget("quant", "-", f"quant.quant_kernel not importable: {e!r}"[:200])]
    if not hasattr(qk, "compile_quant"):
        return [], [SkippedTarget("quant", "-", "quant.quant_kernel has no compile_quant")]
    import cutlass

    # the plain call, and the one the public op makes on sm_90a with the default schedule (Hadamard rotation, the
    # "mse" rule, the "bits" code-word order, the Q block means for the selection): its register count sets the
    # quantizer's CTAs per SM
    return [CompileTarget("quant", "d128_bf16", lambda: qk.compile_quant(cutlass.BFloat16, 128),
                          "quant/quant_kernel.py compile_quant"),
            CompileTarget("quant", "d128_bf16_rot_bits_qmean",
                          lambda: qk.compile_quant(cutlass.BFloat16, 128, False, True, "mse", "bits", True),
                          "compile_quant(BFloat16, 128, rotate=True, 'mse', 'bits', with_qmean=True)")], []


def discover(arch: str, include_demo: bool = True) -> Tuple[List[CompileTarget], List[SkippedTarget]]:
    """Every compile target for ``arch`` ('sm_120a', 'sm_90a', ...) and the ones skipped, with reasons."""
    targets: List[CompileTarget] = []
    skipped: List[SkippedTarget] = []
    if include_demo:
        targets += _demo_targets(arch)
    t, s = _fp4_tile_targets(arch)
    targets += t
    skipped += s
    t, s = _quant_targets(arch)
    targets += t
    skipped += s
    for mod_name in ("kernels.prefill", "kernels.decode", "kernels.select_topk"):
        t, s, found = _protocol_targets(mod_name, arch)
        if not found and mod_name == "kernels.prefill":
            t, s = _prefill_targets(arch)
        elif not found and mod_name == "kernels.decode":
            t, s = _decode_targets(arch)
        targets += t
        skipped += s
    return targets, skipped
