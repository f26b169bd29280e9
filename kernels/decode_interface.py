"""Entry point of ThriftAttention decode: `thrift_decode(q, cache, ...)` over a ThriftKVCache, and its reference.

Selection for a single query (per KV head): score of complete block j = max over the KV head's G query heads of
q . mean(K block j) (fp32); the top-k complete blocks with k = topk_for_budget(n_complete, budget, causal=False)
(per sequence) are read from the FP16 cache; the partial last block (if the length is not a multiple of 64) is
always read in FP16 -- it holds the newest tokens, is at most 63 keys, and its FP4 V groups are still filling.
So budget=0 means "all complete blocks FP4". The reference (`thrift_decode_ref`) feeds exactly this selection to
kernels.reference.thrift_attention_ref (Sq = 1, bottom-right causal: the query sees every cached key).

The GPU work is a torch.library custom op `thrift::decode_fwd` (tensors only; selection happens before it in torch,
and the query's Hadamard rotation + NVFP4 quantization (the cache's scale_rule) once per call in the prefill quantizer
kernel, `prequantize_query`). The split kernel's static schedule is a kernels.decode.DecodeConfig.
"""
from __future__ import annotations

import math

import torch

from ._validate import check_budget, check_choice, softmax_scale_or_default
from .kv_cache import BLOCK, DEFAULT_FP4_LAYOUT, ThriftKVCache
from .selection import topk_for_budget
from profiling.nvtx_ranges import phase  # NVTX "<variant>/<phase>/<shape>" ranges (no-op without a profiler)

_COMPILED: dict = {}
# One-warp CTAs per SM the split plan aims at (12 fit an H100 SM: ~157-168 registers, 13.9 KB smem with the default
# K/V-half ring). 8 when the splits are short: at B=1, 128k, budget 0.05 10/SM (158 splits of 13 tiles) took 101.1 us
# vs 98.0 at 8/SM with the static splits, and 83.5 vs 79.1 with the dynamic items (session 4); 11 / 12 per SM 81.6 /
# 81.3 vs 78.9 (session 6). 11 once a split keeps >= LONG_SPLIT_TILES tiles: B=8, 128k, budget 0.05 (23 splits of 90
# tiles) 474.6 vs 487.7 us at 10/SM, 533.8 at 8/SM; B=8, 32k 138.4 vs 141.3 (session 6, two runs each; 12/SM: 25
# splits, more CTAs than fit at once, 580.7 us) (profiling/RESULTS.md, decode sections, H100, 2026-11-22).
DEFAULT_CTAS_PER_SM = 8
LONG_CTAS_PER_SM = 11
LONG_SPLIT_TILES = 20


def _arch(device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def decode_config(fp4_layout: str = DEFAULT_FP4_LAYOUT, scale_rule: str = "pre", parts: int = -1, stages: int = -1,
                  f16_cost: int = -1, min_ctas: int = -1,
                  f16_depth: int = -1, work: str = ""):
    """kernels.decode.DecodeConfig from the custom op's scalar arguments (-1 / "" = the DecodeConfig default)."""
    from .decode import DecodeConfig

    kw = {k: v for k, v in dict(parts=parts, stages=stages, f16_cost=f16_cost, min_ctas=min_ctas,
                                f16_depth=f16_depth).items() if v != -1}
    if work:
        kw["work"] = work
    if "parts" in kw and "stages" not in kw:  # the stage count must suit the part count
        kw["stages"] = {1: 2, 2: 3}.get(kw["parts"], -1)
    return DecodeConfig(fp4_layout=fp4_layout, scale_rule=scale_rule, **kw)


def _get_kernels(D: int, hkv: int, G: int, dtype: torch.dtype, arch: int, config=None):
    """(split kernel, combine kernel) compiled for TVM FFI, cached on everything that changes the code: shape
    constants, dtype, arch, the DecodeConfig, and the mse candidate tuple when the query is quantized in-kernel."""
    from quant.nvfp4 import MSE_SCALE_STEPS

    from .decode import DecodeConfig

    config = config or DecodeConfig()
    key = (D, hkv, G, dtype, arch, config, tuple(MSE_SCALE_STEPS) if config.scale_rule == "mse" else ())
    if key not in _COMPILED:
        from .decode import compile_decode

        try:
            import tvm_ffi  # noqa: F401  (the compiled functions take torch tensors through TVM FFI)
        except ImportError as e:
            raise RuntimeError("thrift_decode needs apache-tvm-ffi (pip install apache-tvm-ffi)") from e
        _COMPILED[key] = compile_decode(D, hkv, G, "bf16" if dtype == torch.bfloat16 else "f16", arch,
                                        tvm_ffi=True, config=config)
    return _COMPILED[key]


# schedule dict keys: the split plan (num_splits | ctas_per_sm) and the DecodeConfig fields
CONFIG_KEYS = ("parts", "stages", "f16_cost", "min_ctas", "f16_depth")  # DecodeConfig fields, decode_fwd order
SCHEDULE_KEYS = {"num_splits", "ctas_per_sm", "work", *CONFIG_KEYS}  # "work": DecodeConfig.work (a string)


def default_work(tiles_per_split: int) -> str:
    """DecodeConfig.work when the schedule does not name one: "dynamic", except for splits of fewer than
    decode.BALANCE_MIN_TILES tiles (B=1, 8k: 1 tile per split), where the items are few and the static plan is
    ~1 us faster (H100: 20.5 vs 21.5 us at budget 0.05; profiling/RESULTS.md, decode session 4)."""
    from .decode import BALANCE_MIN_TILES

    return "dynamic" if tiles_per_split >= BALANCE_MIN_TILES else "static"


def plan_splits(max_tiles: int, batch: int, num_kv_heads: int, num_sms: int, schedule=None):
    """(num_splits, tiles_per_split): enough 1-warp CTAs to fill every SM about once (one wave): ctas_per_sm of
    them (default: LONG_CTAS_PER_SM if the splits then keep >= LONG_SPLIT_TILES tiles, else DEFAULT_CTAS_PER_SM)."""
    sched = dict(schedule or {})
    unknown = set(sched) - SCHEDULE_KEYS
    if unknown:
        raise ValueError(f"thrift_decode: schedule keys must be in {sorted(SCHEDULE_KEYS)}, got {sorted(unknown)}")
    if "num_splits" in sched:
        ns = int(sched["num_splits"])
        if ns < 1:
            raise ValueError(f"thrift_decode: schedule['num_splits'] must be >= 1, got {ns}")
    else:
        cps = sched.get("ctas_per_sm")
        if cps is None:
            long_ns = -(-num_sms * LONG_CTAS_PER_SM // (batch * num_kv_heads))
            cps = LONG_CTAS_PER_SM if max_tiles >= LONG_SPLIT_TILES * long_ns else DEFAULT_CTAS_PER_SM
        if int(cps) < 1:
            raise ValueError(f"thrift_decode: schedule['ctas_per_sm'] must be >= 1, got {cps}")
        ns = -(-num_sms * int(cps) // (batch * num_kv_heads))
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
                f(cutlass.Float32, (B, NKB, 1, D)), f(dt, (B, S, 1, D)), f(dt, (B, S, 1, D)),
                f(cutlass.Float32, (B, NKB, 1, D)))  # the Q-means slot (with_qmean off: never written)
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
    fn(x, x, x, qp, qs, kp, ks, vp, vs, km, kd, vd, km)
    return kd.view(B, HQ, D)


def pad_flags(flags: torch.Tensor) -> torch.Tensor:
    """Flags with the last dim padded to a multiple of 16 (zeros) and contiguous: the split kernel reads 16 flags per
    16-byte load when it balances its splits (DecodeConfig.f16_cost)."""
    nb = flags.shape[-1]
    if nb % 16 == 0 and flags.is_contiguous():
        return flags
    return torch.nn.functional.pad(flags, (0, -nb % 16)).contiguous()


_COUNTERS: dict = {}  # (device, stream) -> int32 work counters of DecodeConfig.work "dynamic" (kept alive)
_OLD_COUNTERS: list = []  # replaced (smaller) counter buffers: a captured CUDA graph may still point at them


def work_counters(device, batch: int, num_kv_heads: int) -> torch.Tensor:
    """int32 [B, Hkv, 2] (work counter, finished-CTA counter) per (sequence, KV head) for the dynamic split kernel,
    zero between launches: the last CTA of each head resets its pair, so one zeroed buffer per stream serves every
    call on that stream (no memset per call). Launches on different streams get different buffers."""
    key = (torch.device(device), torch.cuda.current_stream(device).cuda_stream)
    buf = _COUNTERS.get(key)
    n = 2 * batch * num_kv_heads
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OLD_COUNTERS.append(buf)
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf[:n].view(batch, num_kv_heads, 2)


def work_from_flags(flags: torch.Tensor) -> torch.Tensor:
    """The FP16 work list int32 [B, Hkv, KL] of caller-given flags: each head's flagged blocks, -1-padded to the
    largest count KL (>= 1). Costs a device->host sync for KL; select_decode_blocks(..., return_work=True) builds
    the same list from its top-k without one."""
    cnt = int(flags.sum(dim=-1, dtype=torch.int32).max().item()) if flags.numel() else 0
    kl = max(1, cnt)
    vals, idx = torch.topk(flags.to(torch.int32), kl, dim=-1)
    return torch.where(vals > 0, idx, torch.full_like(idx, -1)).to(torch.int32).contiguous()


@torch.library.custom_op("thrift::decode_fwd", mutates_args=())
def decode_fwd(q16: torch.Tensor, q_rot: torch.Tensor, tiles: torch.Tensor, k16: torch.Tensor, v16: torch.Tensor,
               flags: torch.Tensor, work: torch.Tensor, lens: torch.Tensor, softmax_scale: float, num_splits: int,
               tiles_per_split: int, fp4_layout: str = DEFAULT_FP4_LAYOUT, scale_rule: str = "pre",
               parts: int = -1, stages: int = -1, f16_cost: int = -1, min_ctas: int = -1, f16_depth: int = -1,
               work_mode: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode + LSE combine. q16 [B, Hq, D] (the FP16 tiles' query); q_rot [B, Hq, D] the same type: the FP4
    tiles' query, prequantize_query(...) with scale_rule "pre" (what thrift_decode passes), or the query to quantize in
    the kernel with the rule "mse" / "amax" (hadamard_rotate(q16) when the cache is rotated); tiles/k16/v16/flags/lens
    from the cache; work: int32 [B, Hkv, KL >= 1], each head's selected blocks (-1 = none; select_decode_blocks(...,
    return_work=True) or work_from_flags(flags)): the FP16 work list of DecodeConfig.work "dynamic"; fp4_layout: the
    bit order of the tiles' code words (the cache's fp4_layout); parts / stages / f16_cost / min_ctas / f16_depth /
    work_mode: DecodeConfig fields (-1 / "" = default; work_mode is DecodeConfig.work). Returns O [B, 1, Hq, D]
    (q16's dtype) and LSE fp32 [B, Hq]."""
    B, HQ, D = q16.shape
    hkv = tiles.shape[2]
    cfg = decode_config(fp4_layout, scale_rule, parts, stages, f16_cost, min_ctas, f16_depth, work_mode)
    dec, comb = _get_kernels(D, hkv, HQ // hkv, q16.dtype, _arch(q16.device), cfg)
    o_part = torch.empty((B, HQ, num_splits, D), dtype=torch.float32, device=q16.device)
    lse_part = torch.empty((B, HQ, num_splits), dtype=torch.float32, device=q16.device)
    out = torch.empty((B, 1, HQ, D), dtype=q16.dtype, device=q16.device)
    lse = torch.empty((B, HQ), dtype=torch.float32, device=q16.device)
    flags = pad_flags(flags)
    cnt = work_counters(q16.device, B, hkv)
    with phase("attention"):  # split-KV kernel
        dec(tiles, k16, v16, q16, q_rot, flags, work, cnt, lens, o_part, lse_part, softmax_scale * math.log2(math.e),
            tiles_per_split)
    with phase("combine"):
        comb(o_part, lse_part, out, lse)
    return out, lse


@decode_fwd.register_fake
def _(q16, q_rot, tiles, k16, v16, flags, work, lens, softmax_scale, num_splits, tiles_per_split,
      fp4_layout=DEFAULT_FP4_LAYOUT, scale_rule="pre", parts=-1, stages=-1, f16_cost=-1, min_ctas=-1,
      f16_depth=-1, work_mode=""):
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


def _check_flags(flags, cache: ThriftKVCache, where: str):
    """A caller's flags: uint8 [B, Hkv, n] on the cache device with n covering every cached block (the kernel reads
    the flags of each sequence's blocks; a shorter tensor would be read out of bounds)."""
    if not isinstance(flags, torch.Tensor):
        raise TypeError(f"{where}: flags must be a torch.Tensor (select_decode_blocks output), "
                        f"got {type(flags).__name__}")
    if flags.dtype != torch.uint8:
        raise TypeError(f"{where}: flags must be uint8, got {flags.dtype}")
    need = -(-cache.max_length // BLOCK)
    B, H = cache.batch, cache.num_kv_heads
    if flags.dim() != 3 or flags.shape[0] != B or flags.shape[1] != H or flags.shape[2] < need:
        raise ValueError(f"{where}: flags must be [B={cache.batch}, Hkv={cache.num_kv_heads}, >= {need}] (one per "
                         f"64-token block of the longest sequence), got {tuple(flags.shape)}")
    if flags.device != cache.device:
        raise ValueError(f"{where}: flags must be on the cache device {cache.device}, got {flags.device}")


def select_decode_blocks(q, cache: ThriftKVCache, budget: float = 0.05, selection: str = "block_mean",
                         return_work: bool = False):
    """uint8 flags [B, Hkv, NBP]: 1 for the complete blocks read from the FP16 cache (see module docstring); NBP =
    cap/64 rounded up to a multiple of 16 (pad_flags), entries past cap/64 are 0. The partial last block is not
    flagged: the kernel always reads it in FP16. return_work: also the FP16 work list int32 [B, Hkv, max(k, 1)]
    (the flagged blocks of each head, -1 = none; decode_fwd's `work`), straight from the top-k."""
    where = "select_decode_blocks"
    G = _check_q_cache(q, cache, where)
    f = check_budget(budget, where=where)
    check_choice("selection", selection, ("block_mean",), where=where)
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    nblk = cache.capacity // BLOCK
    flags = torch.zeros((B, H, nblk + (-nblk % 16)), dtype=torch.uint8, device=q.device)
    n_full = [L // BLOCK for L in cache.lengths]
    ks = [topk_for_budget(n, f, causal=False) if n > 0 else 0 for n in n_full]
    kmax = max(ks)
    if kmax == 0:
        return (flags, torch.full((B, H, 1), -1, dtype=torch.int32, device=q.device)) if return_work else flags
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
    if return_work:
        return flags, torch.where(keep, idx, torch.full_like(idx, -1)).to(torch.int32).contiguous()
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
    always FP16. schedule: {"num_splits": n} or {"ctas_per_sm": c}, optionally DecodeConfig fields ("parts",
    "stages", "f16_cost", "min_ctas", "f16_depth", and "work": "dynamic" | "static", default default_work(...);
    kernels/decode.py). flags: a precomputed select_decode_blocks result (skips selection). Returns O [B, 1, Hq, D] (and LSE fp32 [B, Hq]; -inf for empty sequences)."""
    where = "thrift_decode"
    G = _check_q_cache(q, cache, where)
    if q.device.type != "cuda":
        raise ValueError(f"{where}: q and the cache must be on a CUDA device, got {q.device}")
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1], where=where)
    work = None
    if flags is None:
        with phase("select"):
            flags, work = select_decode_blocks(q, cache, budget, selection, return_work=True)
    else:
        _check_flags(flags, cache, where)
    B, H = cache.batch, cache.num_kv_heads
    q16 = q[:, 0].contiguous()
    # the FP4 tiles hold NVFP4 of the rotated K (cache.qk_rotation) with the cache's scale rule: their query is
    # dq(NVFP4(rotated q)) with the same rule, computed once here; the FP16 tiles keep q16.
    with phase("quantize"):  # once per call, not per CTA (ThriftDecodeSplitKV scale_rule="pre")
        q_rot = prequantize_query(q16, cache.qk_rotation, cache.scale_rule)
    max_tiles = max(1, -(-cache.max_length // BLOCK))
    ns, tps = plan_splits(max_tiles, B, H, torch.cuda.get_device_properties(q.device).multi_processor_count,
                          schedule)
    sched = schedule or {}
    try:
        cfg = decode_config(cache.fp4_layout, "pre", *(int(sched.get(k, -1)) for k in CONFIG_KEYS),
                            work=str(sched.get("work") or default_work(tps)))
    except ValueError as e:
        raise ValueError(f"{where}: bad schedule {dict(sched)}: {e}") from None
    if work is None:  # caller flags: the list costs a host sync, so only when the dynamic kernel reads it
        work = work_from_flags(flags) if cfg.work == "dynamic" else torch.full((B, H, 1), -1, dtype=torch.int32,
                                                                               device=q.device)
    out, lse = decode_fwd(q16, q_rot, cache.tiles, cache.k16, cache.v16, flags, work, cache.lengths_tensor(q.device),
                          float(scale), ns, tps, cfg.fp4_layout, "pre", *(getattr(cfg, k) for k in CONFIG_KEYS),
                          cfg.work)
    return (out, lse) if return_lse else out
