"""Variant discovery for the benchmark: baselines (FA2/cuDNN via SDPA, FA4, flash_attn 2.x, SageAttention)
and this project's kernels (thrift at budgets, fp4-only = budget 0), each included when importable and
usable here, otherwise skipped with a printed reason.

A variant's ``prepare(problem, inputs)`` runs outside the timing (layout transposes, KV expansion for GQA,
KV-cache building for decode, one trial call that triggers JIT compilation) and returns a zero-argument
closure that does exactly the timed work and returns O in [B, Sq, Hq, D].

All inputs are [B, S, H, D] (FlashAttention's layout). Causal is bottom-right aligned (the project contract);
SDPA's ``is_causal`` is top-left aligned, so SDPA/Sage baselines are used causally only when Sq == Skv (or
Sq == 1, where causal bottom-right means "see everything"), and skipped with a reason otherwise.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark shape. mode: 'prefill' or 'decode' (decode: Sq is the number of new tokens, usually 1)."""
    mode: str
    b: int
    sq: int
    skv: int
    hq: int
    hkv: int
    d: int
    causal: bool = True
    dtype: str = "bf16"

    def __post_init__(self):
        if self.mode not in ("prefill", "decode"):
            raise ValueError(f"mode: expected 'prefill' or 'decode', got {self.mode!r}")
        for f in ("b", "sq", "skv", "hq", "hkv", "d"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}: expected a positive int, got {v!r}")
        if self.hq % self.hkv:
            raise ValueError(f"hq: expected a multiple of hkv={self.hkv}, got {self.hq}")
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"dtype: expected 'bf16' or 'fp16', got {self.dtype!r}")

    @property
    def tag(self) -> str:
        from profiling.nvtx_ranges import shape_tag

        return shape_tag(self.b, self.sq, self.skv, self.hq, self.hkv, self.d, causal=self.causal)

    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float16


@dataclasses.dataclass
class Variant:
    """A runnable attention implementation. nvtx: the label of its NVTX variant range (no '/')."""
    name: str
    family: str                      # 'baseline' or 'thrift'
    modes: Tuple[str, ...]
    prepare: Callable                # (problem, (q, k, v)) -> zero-arg closure returning O [B, Sq, Hq, D]
    budget: Optional[float] = None
    note: str = ""
    kv_elem_bytes: Optional[float] = None  # bytes per K/V element actually read (quantized caches), for roofline
    bytes_fn: Optional[Callable] = None     # (problem) -> minimum bytes, overrides the dense count

    @property
    def nvtx(self) -> str:
        return self.name.replace("/", "_")


@dataclasses.dataclass
class Skipped:
    name: str
    reason: str
    modes: Tuple[str, ...] = ("prefill", "decode")


class Unsupported(Exception):
    """Raised by prepare() when a variant cannot run a given problem (reason in the message)."""


# --------------------------------------------------------------------------------------------------- helpers

_MEMO: dict = {}  # per-shape artefacts shared between variants (decode caches); see clear_caches()


def clear_caches() -> None:
    """Drop per-shape artefacts (call when the inputs they were built from go away)."""
    _MEMO.clear()


def _cuda_reason() -> Optional[str]:
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return f"torch not importable ({e})"
    if not torch.cuda.is_available():
        return "CUDA not available (no GPU visible)"
    return None


def _cc() -> Tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


def _import(mod: str):
    try:
        return importlib.import_module(mod), None
    except Exception as e:
        return None, f"{mod} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def _expand_kv(k, hq: int):
    """[B, S, Hkv, D] -> [B, S, Hq, D] (GQA by repetition) for kernels without native GQA."""
    hkv = k.shape[2]
    return k if hkv == hq else k.repeat_interleave(hq // hkv, dim=2)


def _sdpa_causal_flag(p: Problem) -> bool:
    """SDPA / Sage use top-left causal; usable for bottom-right only when Sq == Skv (or Sq == 1 -> no mask)."""
    if not p.causal:
        return False
    if p.sq == 1:
        return False
    if p.sq == p.skv:
        return True
    raise Unsupported("is_causal is top-left aligned; contract needs bottom-right with Sq != Skv")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------------- baselines

def _sdpa_variant(name: str, backend_attr: str, note: str) -> Tuple[Optional[Variant], Optional[str]]:
    why = _cuda_reason()
    if why:
        return None, why
    import torch
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:
        return None, f"torch.nn.attention.sdpa_kernel not available ({e})"
    backend = getattr(SDPBackend, backend_attr, None)
    if backend is None:
        return None, f"SDPBackend.{backend_attr} not in this torch ({torch.__version__})"

    def prepare(p: Problem, qkv):
        q, k, v = qkv
        is_causal = _sdpa_causal_flag(p)
        qt = q.transpose(1, 2)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)

        def run_gqa():
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal,
                                                                     enable_gqa=p.hq != p.hkv)
            return o.transpose(1, 2)

        try:
            run_gqa()
            return run_gqa
        except Exception:
            if p.hq == p.hkv:
                raise
        ke = _expand_kv(k, p.hq).transpose(1, 2)
        ve = _expand_kv(v, p.hq).transpose(1, 2)

        def run_expanded():
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=is_causal)
            return o.transpose(1, 2)

        run_expanded()
        return run_expanded

    return Variant(name, "baseline", ("prefill", "decode"), prepare, note=note), None


def _fa4_variant() -> Tuple[Optional[Variant], Optional[str]]:
    why = _cuda_reason()
    if why:
        return None, why
    fn = None
    errs = []
    for mod_name in ("flash_attn.cute", "flash_attn.cute.interface"):
        mod, err = _import(mod_name)
        if mod is not None and hasattr(mod, "flash_attn_func"):
            fn = mod.flash_attn_func
            break
        errs.append(err or f"{mod_name} has no flash_attn_func")
    if fn is None:
        return None, "; ".join(errs)
    major, _ = _cc()
    if major not in (9, 10, 11, 12):
        return None, f"FlashAttention-4 (flash_attn.cute) needs SM90/SM100+, device is SM{major}x"

    def prepare(p: Problem, qkv):
        q, k, v = qkv

        def run():
            return _first(fn(q, k, v, causal=p.causal))

        run()
        return run

    return Variant("fa4-cute", "baseline", ("prefill", "decode"), prepare,
                   note="FlashAttention-4 flash_attn.cute.flash_attn_func (bottom-right causal)"), None


def _fa2_pkg_variant() -> Tuple[Optional[Variant], Optional[str]]:
    why = _cuda_reason()
    if why:
        return None, why
    mod, err = _import("flash_attn")
    if mod is None:
        return None, err
    ver = str(getattr(mod, "__version__", "?"))
    if not ver.startswith("2.") or not hasattr(mod, "flash_attn_func"):
        return None, f"flash_attn {ver} is not the 2.x package with flash_attn_func"

    def prepare(p: Problem, qkv):
        q, k, v = qkv

        def run():
            return _first(mod.flash_attn_func(q, k, v, causal=p.causal))

        run()
        return run

    return Variant("fa2-pkg", "baseline", ("prefill", "decode"), prepare, note=f"flash_attn {ver}"), None


def _sage3_variant() -> Tuple[Optional[Variant], Optional[str]]:
    why = _cuda_reason()
    if why:
        return None, why
    major, minor = _cc()
    if major != 12:
        return None, f"sageattn3_blackwell needs SM120 (RTX 50 / RTX PRO Blackwell); device is SM{major}{minor}"
    fn = None
    errs = []
    for mod_name in ("sageattn3", "sageattention3", "sageattn3.api"):
        mod, err = _import(mod_name)
        if mod is not None and hasattr(mod, "sageattn3_blackwell"):
            fn = mod.sageattn3_blackwell
            break
        errs.append(err or f"{mod_name} has no sageattn3_blackwell")
    if fn is None:
        return None, "; ".join(errs)

    def prepare(p: Problem, qkv):
        q, k, v = qkv
        is_causal = _sdpa_causal_flag(p)
        # sageattn3_blackwell takes [B, H, S, D]
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, _expand_kv(k, p.hq), _expand_kv(v, p.hq)))

        def run():
            return _first(fn(qt, kt, vt, is_causal=is_causal)).transpose(1, 2)

        run()
        return run

    return Variant("sage3", "baseline", ("prefill",), prepare, note="SageAttention3 FP4 (SM120)"), None


def _sage_variant() -> Tuple[Optional[Variant], Optional[str]]:
    why = _cuda_reason()
    if why:
        return None, why
    mod, err = _import("sageattention")
    if mod is None:
        return None, err
    if not hasattr(mod, "sageattn"):
        return None, "sageattention has no sageattn"
    ver = "?"
    try:
        from importlib.metadata import version

        ver = version("sageattention")
    except Exception:
        pass

    def prepare(p: Problem, qkv):
        q, k, v = qkv
        is_causal = _sdpa_causal_flag(p)
        # sageattn's smooth_k does `k -= k.mean(seq)` IN PLACE: give it its own copy so the shared inputs of
        # the other variants stay untouched (the subtraction is softmax-invariant and part of its timed work)
        k = k.clone()

        def call(kk, vv):
            return _first(mod.sageattn(q, kk, vv, tensor_layout="NHD", is_causal=is_causal))

        try:
            call(k, v)
            return lambda: call(k, v)
        except Exception:
            if p.hq == p.hkv:
                raise
        ke, ve = _expand_kv(k, p.hq), _expand_kv(v, p.hq)
        call(ke, ve)
        return lambda: call(ke, ve)

    major = ver.split(".")[0] if ver != "?" else "?"
    return Variant(f"sage{major}" if major in ("1", "2") else "sage", "baseline", ("prefill", "decode"), prepare,
                   note=f"sageattention {ver} sageattn (INT8 QK, FP16/FP8 PV)"), None


# --------------------------------------------------------------------------------------------------- thrift

def _accepts(fn, name: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return name in sig.parameters or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _thrift_variants(budgets: Sequence[float], schedules: Sequence[Optional[str]] = (None,)
                     ) -> Tuple[List[Variant], List[Skipped]]:
    """thrift prefill at each budget (budget 0 is the fp4-only mode, SageAttention3 numerics) and each tile
    schedule (None = the kernel's default; a name from kernels.schedules.SCHEDULES or an override string,
    see kernels.schedules.get_schedule; appended as '@schedule')."""
    out: List[Variant] = []
    skipped: List[Skipped] = []
    why = _cuda_reason()
    mod, err = _import("kernels")
    fn = getattr(mod, "thrift_attention", None) if mod is not None else None
    names = [_thrift_name(b) + (f"@{sc}" if sc else "") for sc in schedules for b in budgets]
    if fn is None:
        reason = err or "kernels.thrift_attention not exported yet (prefill kernel not landed)"
        return out, [Skipped(n, reason, ("prefill",)) for n in names]
    if why:
        return out, [Skipped(n, why, ("prefill",)) for n in names]

    for sched in schedules:
        for bud in budgets:
            def prepare(p: Problem, qkv, _bud=bud, _sched=sched):
                q, k, v = qkv
                kwargs = {"budget": _bud, "causal": p.causal}
                if _sched is not None:
                    kwargs["schedule"] = _sched
                kwargs = {k_: v_ for k_, v_ in kwargs.items() if _accepts(fn, k_)}

                def run():
                    return _first(fn(q, k, v, **kwargs))

                run()
                return run

            name = _thrift_name(bud) + (f"@{sched}" if sched else "")
            note = "fp4-only (SageAttention3 numerics)" if bud == 0 else f"top blocks at budget {bud}"
            out.append(Variant(name, "thrift", ("prefill",), prepare, budget=float(bud),
                               note=note + (f", schedule {sched}" if sched else "")))
    return out, skipped


def _thrift_name(budget: float) -> str:
    return "thrift-fp4only" if float(budget) == 0.0 else f"thrift-f{float(budget):g}"


def _thrift_decode_variants(budgets: Sequence[float]) -> Tuple[List[Variant], List[Skipped]]:
    """thrift decode (kernels.thrift_decode over a kernels.kv_cache.ThriftKVCache) at each budget."""
    out: List[Variant] = []
    names = [_thrift_name(b).replace("thrift", "thrift-decode") for b in budgets]
    mod, err = _import("kernels")
    fn = getattr(mod, "thrift_decode", None) if mod is not None else None
    if fn is None:
        dmod, derr = _import("kernels.decode_interface")
        fn = getattr(dmod, "thrift_decode", None) if dmod is not None else None
        err = err or derr
    cmod, cerr = _import("kernels.kv_cache")
    cache_cls = getattr(cmod, "ThriftKVCache", None) if cmod is not None else None
    if fn is None or cache_cls is None:
        reason = err or cerr or "kernels.thrift_decode / kernels.kv_cache.ThriftKVCache not available yet"
        return out, [Skipped(n, reason, ("decode",)) for n in names]
    why = _cuda_reason()
    if why:
        return out, [Skipped(n, why, ("decode",)) for n in names]
    tile_bytes = getattr(cmod, "tile_bytes", None)
    block = int(getattr(cmod, "BLOCK", 64))

    for bud, name in zip(budgets, names):
        def prepare(p: Problem, qkv, _bud=bud):
            q, k, v = qkv
            if p.sq != 1:
                raise Unsupported("thrift_decode takes one new query token per sequence (Sq = 1)")
            # the cache is built once per input set, outside the timing (as a serving loop appends over time),
            # and shared by the budgets (clear_caches() drops it when the bench moves to the next shape)
            key = ("thrift-decode-cache", id(k), id(v))
            cache = _MEMO.get(key)
            if cache is None:
                cache = cache_cls(p.b, p.hkv, p.d, capacity=p.skv, dtype=k.dtype, device=k.device)
                cache.append(k, v)
                _MEMO[key] = cache

            def run():
                return _first(fn(q, cache, budget=_bud))

            run()
            return run

        def nbytes(p: Problem, _bud=bud) -> float:
            """Bytes the decode must read: FP4 tiles of the FP4 blocks, FP16 K+V of the selected and partial
            blocks (budget = fraction of complete blocks in FP16), plus Q and O."""
            nblk, part = p.skv // block, 1 if p.skv % block else 0
            nsel = min(nblk, int(round(_bud * nblk)))
            tb = tile_bytes(p.d) if tile_bytes else 2 * (block * p.d // 2 + block * p.d // 16)
            kv = p.b * p.hkv * ((nblk - nsel) * tb + (nsel + part) * block * p.d * 2 * 2)
            return kv + 2.0 * p.b * p.sq * p.hq * p.d * 2

        out.append(Variant(name, "thrift", ("decode",), prepare, budget=float(bud),
                           note="decode over the FP4+FP16 KV cache" if bud == 0 else f"decode, budget {bud}",
                           bytes_fn=nbytes))
    return out, []


# --------------------------------------------------------------------------------------------------- discovery

BASELINE_ORDER = ("fa2-sdpa", "cudnn-sdpa", "fa4-cute", "fa2-pkg", "sage3", "sage")


def _cpu_variants(budgets: Sequence[float]) -> Tuple[List[Variant], List[Skipped]]:
    """device='cpu': torch SDPA (math) and the project's bit-faithful reference at each budget -- to exercise
    the benchmark pipeline end to end without a GPU (tiny shapes; the times are not kernel speeds)."""
    import torch

    def sdpa_prepare(p: Problem, qkv):
        q, k, v = qkv
        is_causal = _sdpa_causal_flag(p)
        ke, ve = _expand_kv(k, p.hq).transpose(1, 2), _expand_kv(v, p.hq).transpose(1, 2)

        def run():
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), ke, ve,
                                                                    is_causal=is_causal).transpose(1, 2)

        run()
        return run

    out = [Variant("sdpa-math", "baseline", ("prefill", "decode"), sdpa_prepare, note="torch SDPA on CPU")]
    mod, err = _import("kernels.reference")
    if mod is None or not hasattr(mod, "thrift_attention_ref"):
        return out, [Skipped("thrift-ref", err or "kernels.reference has no thrift_attention_ref")]
    for bud in budgets:
        def prepare(p: Problem, qkv, _bud=bud):
            q, k, v = qkv

            def run():
                return mod.thrift_attention_ref(q, k, v, budget=_bud, causal=p.causal)

            run()
            return run

        out.append(Variant(_thrift_name(bud).replace("thrift", "thrift-ref"), "thrift", ("prefill", "decode"),
                           prepare, budget=float(bud), note="kernels.reference.thrift_attention_ref (CPU)"))
    return out, []


def discover(*, budgets: Sequence[float] = (0.0, 0.05), modes: Sequence[str] = ("prefill", "decode"),
             include: Optional[Sequence[str]] = None, verbose: bool = True, device: str = "cuda",
             schedules: Optional[Sequence[str]] = None) -> Tuple[List[Variant], List[Skipped]]:
    """Every variant usable here, and (name, reason) for every one that is not.

    include: optional list of name prefixes to keep (e.g. ["fa2", "thrift"]); others are dropped silently.
    device: 'cuda' (the benchmark) or 'cpu' (pipeline check: SDPA math + thrift reference only).
    schedules: prefill tile schedules to run the thrift variants with (default: the kernel's default only).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    variants: List[Variant] = []
    skipped: List[Skipped] = []
    if device == "cpu":
        variants, skipped = _cpu_variants(budgets)
        if include:
            variants = [v for v in variants if v.name.startswith(tuple(include))]
        return variants, skipped

    def add(name, result, modes=("prefill", "decode")):
        var, why = result
        if var is None:
            skipped.append(Skipped(name, why or "unavailable", modes))
        else:
            variants.append(var)

    add("fa2-sdpa", _sdpa_variant("fa2-sdpa", "FLASH_ATTENTION", "torch SDPA flash backend (FlashAttention-2)"))
    add("cudnn-sdpa", _sdpa_variant("cudnn-sdpa", "CUDNN_ATTENTION", "torch SDPA cuDNN backend"))
    add("fa4-cute", _fa4_variant())
    add("fa2-pkg", _fa2_pkg_variant())
    add("sage3", _sage3_variant(), ("prefill",))
    add("sage", _sage_variant())
    if "prefill" in modes:
        v, s = _thrift_variants(budgets, tuple(schedules) if schedules else (None,))
        variants += v
        skipped += s
    if "decode" in modes:
        v, s = _thrift_decode_variants(budgets)
        variants += v
        skipped += s
    if include:
        keep = tuple(include)
        variants = [v for v in variants if v.name.startswith(keep)]
        skipped = [s for s in skipped if s.name.startswith(keep)]
    if verbose:
        for s in skipped:
            print(f"[bench] skip {s.name}: {s.reason}")
    return variants, skipped
