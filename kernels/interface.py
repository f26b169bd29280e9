"""Public entry of the fused prefill: ``thrift_attention(q, k, v, ...)`` as a torch custom op.

Pipeline per call (on torch.cuda.current_stream(); the selection on a side stream, see SELECT_SIDE_STREAM):
  1. selection  = kernels.selection.select_blocks(q, k, ...)          (torch; shared with the reference; with
                                                                     SELECT_TOPK_KERNEL, the default, its top-k and
                                                                     3. are one CuTe launch, kernels/select_topk.py;
                                                                     with SELECT_FUSED_MEANS its block means come
                                                                     from 2. and 1. runs after it, in order)
  2. one CuTe launch: Qp/Qs, Kp/Ks, Vp/Vs (+ K, Q block means)        (quant/quant_kernel.py; with qk_rotation=
     "hadamard", the default, Q and K are Hadamard-rotated in registers first: quant/rotation.py; with
     scale_rule="mse", the default, the NVFP4 group scales of Q, K and V follow quant.nvfp4's "mse" encoder rule.
     P, quantized inside the prefill kernel per tile, always keeps the amax rule)
  3. the selection as a bitmask [B, Hq, nqb, ceil(nkb/32)] int32 (torch scatter; with 1, concurrent with 2)
  4. one CuTe launch: ThriftPrefillKernel                               (kernels/prefill.py)

Compile cache: one entry per (arch, dtype, head_dim, causal, fmt, schedule, lse) for the prefill and per
(arch, dtype, head_dim, with_dq, rotate, scale_rule, quant.nvfp4.MSE_SCALE_STEPS, fp4_layout, with_qmean) for the
quantizer; batch, lengths, head counts and the GQA ratio are runtime values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._validate import KERNEL_DTYPES, KERNEL_HEAD_DIMS, SELECTION_METHODS, check_bool, check_budget, \
    check_choice, check_qkv, check_scale_rule, softmax_scale_or_default
from kernels.schedules import PrefillSchedule, get_schedule, schedule_str
from quant.rotation import check_qk_rotation
from profiling.nvtx_ranges import phase  # NVTX "<variant>/<phase>/<shape>" ranges (no-op without a profiler)

MIN_ARCH = 90  # the SM90 decode path uses cvt.e4m3x2 (sm_89+) and mul.bf16x2 (sm_90+)
_PREFILL_CACHE: dict = {}
_QUANT_CACHE: dict = {}


def _arch(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _cute(t: torch.Tensor, dynamic_last: bool = False, div_last: int = 1):
    """torch -> cute tensor: every mode dynamic except (unless dynamic_last) the contiguous last one."""
    from cutlass.cute.runtime import from_dlpack

    x = from_dlpack(t, assumed_align=16)
    order = t.dim_order()
    for i in range(t.ndim):
        if i != t.ndim - 1:
            x = x.mark_compact_shape_dynamic(mode=i, stride_order=order)
        elif dynamic_last:
            x = x.mark_compact_shape_dynamic(mode=i, stride_order=order, divisibility=div_last)
    return x


def _stream():
    import cuda.bindings.driver as cuda

    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


def _torch_to_cutlass(dt):
    import cutlass

    return {torch.float16: cutlass.Float16, torch.bfloat16: cutlass.BFloat16}[dt]


def quant_outputs(q, k, v, with_dq: bool = False, with_qmean: bool = False):
    """Empty (Qp, Qs, Kp, Ks, Vp, Vs, Km, Kd, Vd, Qm) in the quantizer's contract layouts (quant/quant_kernel.py);
    without with_dq, Kd / Vd are k and v themselves, without with_qmean Qm is Km (the kernel never writes them: they
    only fill the slots)."""
    B, Sq, Hq, D = q.shape
    _, Skv, Hkv, _ = k.shape
    skp = -(-Skv // 64) * 64
    dev = q.device
    u8 = torch.uint8
    Kd, Vd = (torch.empty_like(k), torch.empty_like(v)) if with_dq else (k, v)
    Km = torch.empty((B, skp // 64, Hkv, D), dtype=torch.float32, device=dev)
    Qm = torch.empty((B, -(-Sq // 64), Hq, D), dtype=torch.float32, device=dev) if with_qmean else Km
    return (torch.empty((B, Sq, Hq, D // 2), dtype=u8, device=dev), torch.empty((B, Sq, Hq, D // 16), dtype=u8, device=dev),
            torch.empty((B, Skv, Hkv, D // 2), dtype=u8, device=dev), torch.empty((B, Skv, Hkv, D // 16), dtype=u8, device=dev),
            torch.empty((B, Hkv, D, skp // 2), dtype=u8, device=dev), torch.empty((B, Hkv, D, skp // 16), dtype=u8, device=dev),
            Km, Kd, Vd, Qm)


def quant_args(q, k, v, outs) -> list:
    """The quantizer kernel's tensor arguments (cute views; Vp / Vs with their dynamic, 32- / 4-divisible last mode)."""
    Qp, Qs, Kp, Ks, Vp, Vs, Km, Kd, Vd, Qm = outs
    return [_cute(q), _cute(k), _cute(v), _cute(Qp), _cute(Qs), _cute(Kp), _cute(Ks),
            _cute(Vp, True, 32), _cute(Vs, True, 4), _cute(Km), _cute(Kd), _cute(Vd), _cute(Qm)]


def quantize_for_prefill(q, k, v, with_dq: bool = False, rotate: bool = False, scale_rule: str = "mse",
                         fp4_layout: str = "nibble", with_qmean: bool = False):
    """Run the CuTe quantizer: returns (Qp, Qs, Kp, Ks, Vp, Vs, Kmean) in the contract layouts (scales as uint8 bits);
    with_dq also (Kd, Vd): dq(K), dq(V) [B, Skv, Hkv, D] in q's dtype (exact; the SM90 prefill's dq16 K/V source).
    rotate: Qp/Qs, Kp/Ks (and Kd) are of quant.rotation.hadamard_rotate(q), (k); Kmean stays of the unrotated k.
    scale_rule: "mse" (default) or "amax": the outputs equal quant.nvfp4.quantize(..., scale_rule=scale_rule).
    fp4_layout: "nibble" (default: the contract's packing, as nvfp4.quantize) or "bits" (each 32-bit code word in
    kernels/kv_cache.py's BITS_POS order: what the SM90 prefill reads, kernels.prefill.fp4_word_layout).
    with_qmean: also returns Qmean [B, nqb, Hq, D] fp32 (last): block_means(q), as Kmean is block_means(k), bit for
    bit (kernels.selection._seq_block_mean's order), for the public op's selection."""
    if fp4_layout not in ("nibble", "bits"):
        raise ValueError(f"quantize_for_prefill: fp4_layout must be 'nibble' or 'bits', got {fp4_layout!r}")
    import cutlass.cute as cute
    from cutlass import Float32  # noqa: F401

    from quant.quant_kernel import QuantKernel

    D = q.shape[3]
    Qp, Qs, Kp, Ks, Vp, Vs, Km, Kd, Vd, Qm = outs = quant_outputs(q, k, v, with_dq, with_qmean)
    args = quant_args(q, k, v, outs)
    check_scale_rule(scale_rule, "quantize_for_prefill")
    from quant.nvfp4 import MSE_SCALE_STEPS

    # the candidate tuple is part of the key: a changed quant.nvfp4.MSE_SCALE_STEPS gets a fresh kernel
    key = (_arch(q.device), q.dtype, D, bool(with_dq), bool(rotate), scale_rule,
           tuple(MSE_SCALE_STEPS) if scale_rule == "mse" else (), fp4_layout, bool(with_qmean))
    fn = _QUANT_CACHE.get(key)
    if fn is None:
        kern = QuantKernel(_torch_to_cutlass(q.dtype), D, bool(with_dq), bool(rotate), scale_rule, fp4_layout,
                           bool(with_qmean))
        fn = _QUANT_CACHE[key] = cute.compile(kern, *args, _stream())
    fn(*args, _stream())
    res = (Qp, Qs, Kp, Ks, Vp, Vs, Km) + ((Kd, Vd) if with_dq else ())
    return res + (Qm,) if with_qmean else res


def selection_bitmask(sel: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """int32 [B, Hq, nqb, ceil(nkb/32)]: bit (j % 32) of word j // 32 set iff key block j is selected."""
    B, Hq, nqb, kk = sel.shape
    nw = max(1, -(-n_kv_blocks // 32))
    words = torch.zeros((B, Hq, nqb, nw), dtype=torch.int64, device=sel.device)
    if kk:
        s = sel.long()
        ok = s >= 0
        sc = s.clamp(min=0)
        bits = torch.where(ok, torch.ones_like(sc) << (sc % 32), torch.zeros_like(sc))
        words.scatter_add_(3, sc // 32, bits)  # distinct bits per word: add == or
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32)


# The selection (torch: block means, scores, a sort, the bitmask) and the quantizer (one compute-bound CuTe launch)
# depend only on q / k / v, so the public op runs the selection on a side stream while the main stream quantizes;
# the main stream waits for it before the attention launch. False: everything on the current stream, in order.
SELECT_SIDE_STREAM = True
# The public op's top-k and bitmask: kernels/select_topk.py (True: one CuTe launch per score chunk, the same result
# bit for bit) or select_blocks' torch sort + selection_bitmask (False). On since session 13: on an H100 at 32k / 5 %
# it took 0.44 (fp16) and 0.58 ms (bf16) off the end to end (profiling/RESULTS.md "Session 13").
SELECT_TOPK_KERNEL = True
# CUDA priority of that side stream (torch.cuda.Stream's: 0 normal, -1 high). -1 was timed in session 13 (H100, 32k,
# same-run A/B): slower in every case (+0.01 to +0.25 ms end to end), so the side stream keeps normal priority.
SELECT_STREAM_PRIORITY = 0
# Where the public op's block means come from (selection "block_mean" with SELECT_TOPK_KERNEL): True: the quantizer
# kernel writes the Q and K block means in the pass that reads Q and K anyway (quant/quant_kernel.py, with_qmean), and
# the scores and the top-k run right after it on the current stream; False: select_blocks' torch block means, the
# selection on the side stream. The same bits either way (block_means is a fixed-order fp32 sum; GPU-tested), so this
# is a speed switch only. On since session 14; on an H100 at 32k / 5 % (same run, session 15) 25.81 vs 27.19 ms (fp16),
# 26.37 vs 27.73 ms (bf16) end to end: block_means' token-order sum is 64 torch launches per tensor on the side stream.
SELECT_FUSED_MEANS = True
_SIDE_STREAMS: dict = {}


@dataclass(frozen=True)
class FusedMeanSelect:
    """A public-op selection request for _run_prefill (SELECT_FUSED_MEANS): select_and_mask(q, k, budget, causal,
    method="block_mean") with the means the quantizer launch writes, run right after that launch."""

    budget: float


def _side_stream(device) -> torch.cuda.Stream:
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    key = (idx, SELECT_STREAM_PRIORITY)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=idx, priority=SELECT_STREAM_PRIORITY)
    return _SIDE_STREAMS[key]


def _selection_inputs(sel, nkb: int):
    """(the kernel's sel: int32, at least one column, contiguous; its bitmask). sel: a select_blocks result, or
    (that, its bitmask) as kernels.select_topk.select_and_mask returns them."""
    if isinstance(sel, tuple):
        sel, mask = sel
    else:
        mask = selection_bitmask(sel, nkb)
    if sel.shape[3] == 0:
        sel = torch.full((sel.shape[0], sel.shape[1], sel.shape[2], 1), -1, dtype=torch.int32, device=sel.device)
    return sel.to(torch.int32).contiguous(), mask


def _run_prefill(q, k, v, sel, causal: bool, scale: float, schedule: PrefillSchedule, fmt: str, out=None, lse=None,
                 qk_rotation: str = "hadamard", scale_rule: str = "mse"):
    """The quantizer, then the prefill kernel, on the current stream. sel: a select_blocks result, or a
    zero-argument callable returning one: then (with SELECT_SIDE_STREAM) it and the bitmask run on a side stream,
    concurrently with the quantizer; or a FusedMeanSelect: the quantizer also writes the Q block means, and the
    selection (kernels/select_topk.py from the quantizer's means) runs after it on the current stream."""
    import math

    import cutlass.cute as cute
    from cutlass import Float32, Int32

    from kernels.prefill import fp4_word_layout, make_prefill_kernel

    B, Sq, Hq, D = q.shape
    _, Skv, Hkv, _ = k.shape
    arch = _arch(q.device)
    schedule.validate_for(D, arch)
    nkb = -(-Skv // 64)
    dq16 = schedule.uses_dq16(arch)
    main = side = None
    fused = isinstance(sel, FusedMeanSelect)
    if fused:
        pass  # after the quantizer
    elif callable(sel):
        select = sel
        if SELECT_SIDE_STREAM:
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
            side.wait_stream(main)  # q, k (and whatever produced them) are ready
            with torch.cuda.stream(side), phase("select"):
                sel, mask = _selection_inputs(select(), nkb)
        else:
            with phase("select"):
                sel, mask = _selection_inputs(select(), nkb)
    else:
        with phase("select"):
            sel, mask = _selection_inputs(sel, nkb)
    with phase("quantize"):
        qo = quantize_for_prefill(q, k, v, with_dq=dq16, rotate=qk_rotation == "hadamard", scale_rule=scale_rule,
                                  fp4_layout=fp4_word_layout(schedule, arch, q.dtype == torch.bfloat16),
                                  with_qmean=fused)
    Qp, Qs, Kp, Ks, Vp, Vs = qo[:6]
    if fused:
        from kernels.select_topk import select_and_mask

        with phase("select"):  # the quantizer's Qmean (last) and Kmean (7th): block_means(q), block_means(k)
            sel, mask = _selection_inputs(select_and_mask(q, k, budget=sel.budget, causal=causal, method="block_mean",
                                                          means=(qo[-1], qo[6])), nkb)
    Kd, Vd = (qo[7], qo[8]) if dq16 else (k, v)  # without dq16 the kernel never reads them
    if side is not None:
        main.wait_stream(side)
        # made on the side stream, read on the main one: their memory is not reused before the main stream is done
        sel.record_stream(main)
        mask.record_stream(main)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    args = [_cute(q), _cute(k), _cute(v), _cute(Qp), _cute(Qs), _cute(Kp), _cute(Ks),
            _cute(Vp, True, 32), _cute(Vs, True, 4), _cute(mask, True), _cute(sel, True),
            _cute(out), _cute(lse, True), _cute(Kd), _cute(Vd)]
    key = (arch, q.dtype, D, causal, fmt, schedule.key())
    fn = _PREFILL_CACHE.get(key)
    sl2 = Float32(scale * math.log2(math.e))
    ratio = Int32(Hq // Hkv)
    if fn is None:
        kern = make_prefill_kernel(_torch_to_cutlass(q.dtype), D, causal, schedule, arch, fmt=fmt)
        fn = _PREFILL_CACHE[key] = cute.compile(kern, *args, sl2, ratio, _stream())
    with phase("attention"):
        fn(*args, sl2, ratio, _stream())
    return out, lse


@torch.library.custom_op("thrift::prefill", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: float, causal: bool, selection: str,
                fmt: str, softmax_scale: float, schedule: str,
                qk_rotation: str = "hadamard", scale_rule: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.selection import select_blocks

    sch = get_schedule(schedule)  # schedule_str: every field
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if SELECT_TOPK_KERNEL and SELECT_FUSED_MEANS and selection == "block_mean":
        return _run_prefill(q, k, v, FusedMeanSelect(budget), causal, softmax_scale, sch, fmt,
                            qk_rotation=qk_rotation, scale_rule=scale_rule)
    if SELECT_TOPK_KERNEL:  # select_blocks' result and its bitmask from one CuTe top-k launch per score chunk
        from kernels.select_topk import select_and_mask

        select = lambda: select_and_mask(q, k, budget=budget, causal=causal, method=selection)  # noqa: E731
    else:
        select = lambda: select_blocks(q, k, budget=budget, causal=causal, method=selection)  # noqa: E731
    return _run_prefill(q, k, v, select, causal, softmax_scale, sch, fmt, qk_rotation=qk_rotation,
                        scale_rule=scale_rule)


@_prefill_op.register_fake
def _prefill_fake(q, k, v, budget, causal, selection, fmt, softmax_scale, schedule, qk_rotation="hadamard",
                  scale_rule="mse"):
    B, Sq, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq), dtype=torch.float32)


def check_device(q: torch.Tensor, where: str = "thrift_attention") -> None:
    """Raise a clear error for CPU tensors or GPUs without a kernel path."""
    if q.device.type != "cuda":
        raise ValueError(f"{where}: q, k, v must be CUDA tensors (the CuTe kernels need an NVIDIA GPU), got device {q.device}")
    arch = _arch(q.device)
    if arch < MIN_ARCH:
        raise RuntimeError(
            f"{where}: no kernel path for sm_{arch} ({torch.cuda.get_device_name(q.device)}); the fused prefill needs "
            f"sm_90 (Hopper, FP4 decoded to 16 bit) or sm_120 (Blackwell GeForce/RTX PRO, block-scaled FP4 MMA)")


def thrift_attention(q, k, v, *, budget=0.05, causal=True, selection="block_mean", fmt="nvfp4", softmax_scale=None,
                     return_lse=False, schedule=None, selected=None, qk_rotation="hadamard", scale_rule="mse"):
    """ThriftAttention prefill: FP4 attention with the top-`budget` 64x64 block pairs in fp16/bf16.

    q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] (fp16/bf16, D in {64, 128}, Hq % Hkv == 0). Returns O (q's dtype) and,
    with return_lse, LSE fp32 [B, Hq, Sq]. `selected` (optional, a select_blocks result) bypasses the selection
    (used by tests to share a selection with the reference; not supported under torch.compile).
    qk_rotation: "hadamard" (default; quant/rotation.py) rotates Q and K along head_dim before FP4 quantization (the
    FP4 path only; the FP16 path and the selection see the unrotated values), "none" quantizes them as they are.
    scale_rule: "mse" (default) chooses each NVFP4 group scale of Q, K and V by quant.nvfp4's "mse" encoder rule (best
    of the amax scale and its E4M3 neighbours, quant.nvfp4.MSE_SCALE_STEPS); "amax" is the standard E4M3_RNE(amax/6).
    P always uses the amax rule (it is quantized per tile inside the kernel). Same option as thrift_attention_ref.
    """
    where = "thrift_attention"
    B, Sq, Hq, D, Skv, Hkv = check_qkv(q, k, v, dtypes=KERNEL_DTYPES, head_dims=KERNEL_HEAD_DIMS, where=where)
    f = check_budget(budget, where=where)
    check_bool("causal", causal, where=where)
    check_bool("return_lse", return_lse, where=where)
    check_choice("selection", selection, SELECTION_METHODS, where=where)
    if fmt != "nvfp4":
        raise ValueError(f"{where}: fmt must be 'nvfp4' (the CuTe prefill kernel implements NVFP4 only), got {fmt!r}")
    scale = softmax_scale_or_default(softmax_scale, D, where=where)
    check_qk_rotation(qk_rotation, where)
    check_scale_rule(scale_rule, where)
    check_device(q, where)
    sch = get_schedule(schedule, arch=_arch(q.device))
    if selected is not None:
        out, lse = _run_prefill(q.contiguous(), k.contiguous(), v.contiguous(), selected.to(torch.int32).contiguous(),
                                causal, scale, sch, fmt, qk_rotation=qk_rotation, scale_rule=scale_rule)
    else:
        out, lse = _prefill_op(q, k, v, f, causal, selection, fmt, scale, schedule_str(sch), qk_rotation, scale_rule)
    return (out, lse) if return_lse else out
