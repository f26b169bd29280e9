"""Entry point of ThriftAttention decode: `thrift_decode(q, cache, ...)` over a ThriftKVCache, and its reference.

Selection for a single query (per KV head): score of complete block j = max over the KV head's G query heads of
q . mean(K block j) (fp32); the top-k complete blocks with k = topk_for_budget(n_complete, budget, causal=False)
(per sequence) are read from the FP16 cache; the partial last block (if the length is not a multiple of 64) is
always read in FP16 -- it holds the newest tokens, is at most 63 keys, and its FP4 V groups are still filling.
So budget=0 means "all complete blocks FP4". The reference (`thrift_decode_ref`) feeds exactly this selection to
kernels.reference.thrift_attention_ref (Sq = 1, bottom-right causal: the query sees every cached key).

The GPU work is a torch.library custom op `thrift::decode_fwd` (tensors only; selection and the query's Hadamard
rotation happen before it in torch; the query's NVFP4 quantization happens inside the kernel, with the cache's
scale_rule: "mse" by default, kernels/arch_paths.nvfp4_mse_scale, or "amax").
"""
from __future__ import annotations

import math

import torch

from ._validate import check_budget, check_choice, softmax_scale_or_default
from .kv_cache import BLOCK, DEFAULT_FP4_LAYOUT, ThriftKVCache
from .selection import topk_for_budget
from profiling.nvtx_ranges import phase  # NVTX "<variant>/<phase>/<shape>" ranges (no-op without a profiler)

_COMPILED: dict = {}
# 1-warp CTAs; 11 fit an H100 SM (159-161 regs, 18.6 KB smem each). 8 rather than 10: at B=1, 128k, budget 0.05
# 128 splits (8/SM) took 107.8 us vs 116.4 us with 158 (10/SM) on an H100 (113.1 vs 119.6 in an earlier run) --
# the per-SM tile count is the same, so the per-CTA fixed cost and the concurrent streams are what differ.
DEFAULT_CTAS_PER_SM = 8


def _arch(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _get_kernels(D: int, hkv: int, G: int, dtype: torch.dtype, arch: int, prefetch: int | None = None,
                 fp4_layout: str = DEFAULT_FP4_LAYOUT, stages: int | None = None, scale_rule: str = "mse"):
    from quant.nvfp4 import MSE_SCALE_STEPS

    from .decode import DEFAULT_PREFETCH, DEFAULT_STAGES

    prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
    stages = DEFAULT_STAGES if stages is None else stages
    # the query's scale rule and its candidate tuple (quant.nvfp4.MSE_SCALE_STEPS) are compiled in
    key = (D, hkv, G, dtype, arch, prefetch, fp4_layout, stages, scale_rule,
           tuple(MSE_SCALE_STEPS) if scale_rule == "mse" else ())
    if key not in _COMPILED:
        from .decode import compile_decode

        try:
            import tvm_ffi  # noqa: F401  (the compiled functions take torch tensors through TVM FFI)
        except ImportError as e:
            raise RuntimeError("thrift_decode needs apache-tvm-ffi (pip install apache-tvm-ffi)") from e
        _COMPILED[key] = compile_decode(D, hkv, G, "bf16" if dtype == torch.bfloat16 else "f16", arch,
                                        tvm_ffi=True, prefetch=prefetch, fp4_layout=fp4_layout, stages=stages,
                                        scale_rule=scale_rule)
    return _COMPILED[key]


def plan_splits(max_tiles: int, batch: int, num_kv_heads: int, num_sms: int, schedule=None):
    """(num_splits, tiles_per_split): enough 1-warp CTAs to fill every SM about once (one wave)."""
    sched = dict(schedule or {})
    unknown = set(sched) - {"num_splits", "ctas_per_sm", "prefetch", "stages"}
    if unknown:
        raise ValueError(f"thrift_decode: schedule keys must be num_splits/ctas_per_sm/prefetch/stages, got "
                         f"{sorted(unknown)}")
    if "num_splits" in sched:
        ns = int(sched["num_splits"])
        if ns < 1:
            raise ValueError(f"thrift_decode: schedule['num_splits'] must be >= 1, got {ns}")
    else:
        target = num_sms * int(sched.get("ctas_per_sm", DEFAULT_CTAS_PER_SM))
        ns = -(-target // (batch * num_kv_heads))
    ns = max(1, min(ns, max_tiles))
    tps = -(-max_tiles // ns)
    return -(-max_tiles // tps), tps


_QPRE: dict = {}  # compiled query quantizers, keyed on everything that changes the code
_QPRE_SCRATCH: dict = {}  # their never-read outputs (Qp/Qs/Kp/Ks/Vp/Vs/Km/Vd) per shape


def _query_quantizer(D: int, dtype: torch.dtype, arch: int, rotate: bool, scale_rule: str):
    """The prefill quantizer kernel (quant/quant_kernel.py, with_dq=True) compiled once with fake tensors for TVM FFI
    (torch tensors straight in, current stream: no per-call from_dlpack), for [B, S, 1, D] inputs."""
    from quant.nvfp4 import MSE_SCALE_STEPS

    key = (D, dtype, arch, bool(rotate), scale_rule, tuple(MSE_SCALE_STEPS) if scale_rule == "mse" else ())
    fn = _QPRE.get(key)
    if fn is None:
        import cutlass
        import cutlass.cute as cute
        from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

        from quant.quant_kernel import QuantKernel

        dt = cutlass.BFloat16 if dtype == torch.bfloat16 else cutlass.Float16
        u8 = cutlass.Uint8
        B, S, NKB = cute.sym_int(), cute.sym_int(), cute.sym_int()
        VP, VS = cute.sym_int(divisibility=32), cute.sym_int(divisibility=4)

        def f(t, shape):
            return make_fake_compact_tensor(t, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)),
                                            assumed_align=16)
        x = f(dt, (B, S, 1, D))
        args = (x, x, x, f(u8, (B, S, 1, D // 2)), f(u8, (B, S, 1, D // 16)), f(u8, (B, S, 1, D // 2)),
                f(u8, (B, S, 1, D // 16)), f(u8, (B, 1, D, VP)), f(u8, (B, 1, D, VS)),
                f(cutlass.Float32, (B, NKB, 1, D)), f(dt, (B, S, 1, D)), f(dt, (B, S, 1, D)))
        kern = QuantKernel(dt, D, with_dq=True, rotate=rotate, scale_rule=scale_rule)
        fn = _QPRE[key] = cute.compile(kern, *args, make_fake_stream(use_tvm_ffi_env_stream=True),
                                       options="--enable-tvm-ffi")
    return fn


def prequantize_query(q16: torch.Tensor, qk_rotation: str, scale_rule: str) -> torch.Tensor:
    """dq(NVFP4(rotated q16)) [B, Hq, D] in q16's dtype (exact), for the decode kernel's scale_rule="pre" query.

    One launch of the prefill quantizer kernel with q16 viewed as a [B, Hq, 1, D] "K": its with_dq output dq(K) is
    exactly nvfp4.fake_quantize(hadamard_rotate(q16), scale_rule=...) (rotation and scale rule in registers, bit for
    bit); the same view fills the Q/V slots (their outputs go to scratch). Once per call instead of once per
    split-KV CTA, and through TVM FFI, so the host cost is one launch."""
    B, HQ, D = q16.shape
    dev = q16.device
    fn = _query_quantizer(D, q16.dtype, _arch(dev), qk_rotation == "hadamard", scale_rule)
    x = q16.view(B, HQ, 1, D)
    skey = (dev, q16.dtype, B, HQ, D)
    sc = _QPRE_SCRATCH.get(skey)
    if sc is None:
        u8 = torch.uint8
        skp = -(-HQ // 64) * 64
        sc = _QPRE_SCRATCH[skey] = (
            torch.empty((B, HQ, 1, D // 2), dtype=u8, device=dev), torch.empty((B, HQ, 1, D // 16), dtype=u8, device=dev),
            torch.empty((B, HQ, 1, D // 2), dtype=u8, device=dev), torch.empty((B, HQ, 1, D // 16), dtype=u8, device=dev),
            torch.empty((B, 1, D, skp // 2), dtype=u8, device=dev), torch.empty((B, 1, D, skp // 16), dtype=u8, device=dev),
            torch.empty((B, skp // 64, 1, D), dtype=torch.float32, device=dev), torch.empty_like(x))
    qp, qs, kp, ks, vp, vs, km, vd = sc  # written, never read (a race between streams on them is harmless)
    kd = torch.empty_like(x)
    fn(x, x, x, qp, qs, kp, ks, vp, vs, km, kd, vd)
    return kd.view(B, HQ, D)


@torch.library.custom_op("thrift::decode_fwd", mutates_args=())
def decode_fwd(q16: torch.Tensor, q_rot: torch.Tensor, tiles: torch.Tensor, k16: torch.Tensor, v16: torch.Tensor,
               flags: torch.Tensor, lens: torch.Tensor, softmax_scale: float, num_splits: int,
               tiles_per_split: int, prefetch: int = -1,
               fp4_layout: str = DEFAULT_FP4_LAYOUT, stages: int = -1,
               scale_rule: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode + LSE combine. q16 [B, Hq, D] (the FP16 tiles' query); q_rot [B, Hq, D] the same type: the
    query NVFP4-quantized inside the kernel for the FP4 tiles (hadamard_rotate(q16), or q16 itself without rotation);
    tiles/k16/v16/flags/lens from the cache; prefetch: L2 prefetch distance in tiles (-1 = the default);
    fp4_layout: the bit order of the tiles' code words (the cache's fp4_layout); stages: cp.async stages of FP4
    tiles (2 or 3, -1 = the default); scale_rule: "pre" (q_rot = prequantize_query(...), what thrift_decode passes)
    or the NVFP4 rule of an in-kernel quantization of q_rot ("mse" or "amax", the cache's scale_rule).
    Returns O [B, 1, Hq, D] (q16's dtype) and LSE fp32 [B, Hq]."""
    B, HQ, D = q16.shape
    hkv = tiles.shape[2]
    dec, comb = _get_kernels(D, hkv, HQ // hkv, q16.dtype, _arch(q16.device), None if prefetch < 0 else prefetch,
                             fp4_layout, None if stages < 0 else stages, scale_rule)
    o_part = torch.empty((B, HQ, num_splits, D), dtype=torch.float32, device=q16.device)
    lse_part = torch.empty((B, HQ, num_splits), dtype=torch.float32, device=q16.device)
    out = torch.empty((B, 1, HQ, D), dtype=q16.dtype, device=q16.device)
    lse = torch.empty((B, HQ), dtype=torch.float32, device=q16.device)
    with phase("attention"):  # split-KV kernel
        dec(tiles, k16, v16, q16, q_rot, flags, lens, o_part, lse_part, softmax_scale * math.log2(math.e), tiles_per_split)
    with phase("combine"):
        comb(o_part, lse_part, out, lse)
    return out, lse


@decode_fwd.register_fake
def _(q16, q_rot, tiles, k16, v16, flags, lens, softmax_scale, num_splits, tiles_per_split, prefetch=-1,
      fp4_layout=DEFAULT_FP4_LAYOUT, stages=-1, scale_rule="mse"):
    B, HQ, D = q16.shape
    return q16.new_empty((B, 1, HQ, D)), q16.new_empty((B, HQ), dtype=torch.float32)


def _check_q_cache(q, cache, where):
    if not isinstance(cache, ThriftKVCache):
        raise TypeError(f"{where}: cache must be a ThriftKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{where}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != cache.dtype:
        raise TypeError(f"{where}: q must have the cache dtype {cache.dtype}, got {q.dtype}")
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    if q.dim() != 4 or q.shape[0] != B or q.shape[1] != 1 or q.shape[3] != D or q.shape[2] % H:
        raise ValueError(f"{where}: q must be [B={B}, 1, Hq, D={D}] with Hq a multiple of Hkv={H}, got "
                         f"{tuple(q.shape)}")
    G = q.shape[2] // H
    if not 1 <= G <= 16:
        raise ValueError(f"{where}: Hq/Hkv must be in [1, 16], got {G}")
    if q.device != cache.device:
        raise ValueError(f"{where}: q must be on the cache device {cache.device}, got {q.device}")
    return G


def select_decode_blocks(q, cache: ThriftKVCache, budget: float = 0.05, selection: str = "block_mean"):
    """uint8 flags [B, Hkv, cap/64]: 1 for the complete blocks read from the FP16 cache (see module docstring).
    The partial last block is not flagged: the kernel always reads it in FP16."""
    where = "select_decode_blocks"
    G = _check_q_cache(q, cache, where)
    f = check_budget(budget, where=where)
    check_choice("selection", selection, ("block_mean",), where=where)
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    nblk = cache.capacity // BLOCK
    flags = torch.zeros((B, H, nblk), dtype=torch.uint8, device=q.device)
    n_full = [L // BLOCK for L in cache.lengths]
    ks = [topk_for_budget(n, f, causal=False) if n > 0 else 0 for n in n_full]
    kmax = max(ks)
    if kmax == 0:
        return flags
    nmax = max(n_full)
    qg = q[:, 0].float().reshape(B, H, G, D)
    scores = torch.einsum("bhgd,bjhd->bhgj", qg, cache.kmean[:, :nmax]).amax(dim=2)  # [B, H, nmax]
    # per-sequence n_full and k on the device without host->device copies (the cache keeps the lengths there);
    # k = clamp(floor(f*n + 0.5), 1, n) in float64, exactly topk_for_budget(n, f, causal=False)
    n_dev = cache.lengths_tensor(q.device).long() // BLOCK
    k_dev = torch.where(n_dev > 0, torch.minimum(torch.floor(n_dev.double() * f + 0.5).long().clamp(min=1), n_dev),
                        torch.zeros_like(n_dev))
    scores.masked_fill_(torch.arange(nmax, device=q.device)[None, None, :] >= n_dev[:, None, None], float("-inf"))
    idx = torch.topk(scores, kmax, dim=-1).indices  # [B, H, kmax]
    keep = torch.arange(kmax, device=q.device)[None, None, :] < k_dev[:, None, None]
    flags.scatter_(-1, idx, keep.to(torch.uint8).expand(B, H, kmax).contiguous())
    return flags


def _flags_to_selected(flags_b, L, G):
    """One sequence's flags [Hkv, nblk] -> a select_blocks-style int32 [1, Hq, 1, k] (plus the partial block)."""
    H = flags_b.shape[0]
    nb = -(-L // BLOCK)
    rows = []
    for h in range(H):
        blocks = torch.nonzero(flags_b[h, :nb]).flatten().tolist()
        if L % BLOCK:
            blocks.append(nb - 1)
        rows.append(blocks)
    k = max(len(x) for x in rows)
    sel = torch.full((1, H * G, 1, k), -1, dtype=torch.int32)
    for h, blocks in enumerate(rows):
        if blocks:
            sel[0, h * G:(h + 1) * G, 0, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return sel


def thrift_decode_ref(q, cache: ThriftKVCache, *, budget=0.05, selection="block_mean", softmax_scale=None,
                      return_lse=False, flags=None):
    """Reference decode: the same selection (or the given `flags`) through kernels.reference.thrift_attention_ref,
    one sequence at a time on its valid tokens, with the cache's qk_rotation and scale_rule (Q, K, V). Returns O [B, 1, Hq, D] (and LSE fp32
    [B, Hq])."""
    from .reference import thrift_attention_ref

    G = _check_q_cache(q, cache, "thrift_decode_ref")
    if flags is None:
        flags = select_decode_blocks(q, cache, budget, selection)
    B, HQ, D = q.shape[0], q.shape[2], q.shape[3]
    out = torch.zeros((B, 1, HQ, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, HQ), float("-inf"), dtype=torch.float32, device=q.device)
    for b, L in enumerate(cache.lengths):
        if L == 0:
            continue
        sel = _flags_to_selected(flags[b].cpu(), L, G).to(q.device)
        o, l = thrift_attention_ref(q[b:b + 1], cache.keys(b), cache.values(b), causal=True, selected=sel,
                                    softmax_scale=softmax_scale, return_lse=True, qk_rotation=cache.qk_rotation,
                                    scale_rule=cache.scale_rule)
        out[b:b + 1] = o
        lse[b] = l[0, :, 0]
    return (out, lse) if return_lse else out


def thrift_decode(q, cache: ThriftKVCache, *, budget=0.05, selection="block_mean", softmax_scale=None,
                  return_lse=False, schedule=None, flags=None):
    """ThriftAttention for one new query token per sequence over `cache` (a ThriftKVCache).

    q [B, 1, Hq, D] in the cache dtype (fp16/bf16), Hq/Hkv in [1, 16], D in {64, 128}. budget: fraction of the
    complete 64-token blocks read in FP16 (top by block-mean score, per KV head); the partial last block is
    always FP16. schedule: {"num_splits": n} or {"ctas_per_sm": c}, optionally {"prefetch": distance in tiles
    of the L2 prefetch, 0 = off} and {"stages": 2 or 3 cp.async stages of FP4 tiles (3: unmeasured)}. flags: a precomputed select_decode_blocks
    result (skips selection). Returns O [B, 1, Hq, D] (and LSE fp32 [B, Hq]; -inf for empty sequences)."""
    where = "thrift_decode"
    G = _check_q_cache(q, cache, where)
    if q.device.type != "cuda":
        raise ValueError(f"{where}: q and the cache must be on a CUDA device, got {q.device}")
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1], where=where)
    if flags is None:
        with phase("select"):
            flags = select_decode_blocks(q, cache, budget, selection)
    B, H = cache.batch, cache.num_kv_heads
    q16 = q[:, 0].contiguous()
    # the FP4 tiles hold NVFP4 of the rotated K (cache.qk_rotation) with the cache's scale rule: their query is
    # dq(NVFP4(rotated q)) with the same rule, computed once here; the FP16 tiles keep q16.
    with phase("quantize"):  # once per call, not per CTA (ThriftDecodeSplitKV scale_rule="pre")
        q_rot = prequantize_query(q16, cache.qk_rotation, cache.scale_rule)
    max_tiles = max(1, -(-cache.max_length // BLOCK))
    ns, tps = plan_splits(max_tiles, B, H, torch.cuda.get_device_properties(q.device).multi_processor_count,
                          schedule)
    pf = int((schedule or {}).get("prefetch", -1))
    if not -1 <= pf <= 8:
        raise ValueError(f"{where}: schedule['prefetch'] must be in [0, 8], got {pf}")
    st = int((schedule or {}).get("stages", -1))
    if st not in (-1, 2, 3):
        raise ValueError(f"{where}: schedule['stages'] must be 2 or 3, got {st}")
    out, lse = decode_fwd(q16, q_rot, cache.tiles, cache.k16, cache.v16, flags, cache.lengths_tensor(q.device),
                          float(scale), ns, tps, pf, cache.fp4_layout, st, "pre")
    return (out, lse) if return_lse else out
