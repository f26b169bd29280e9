"""NVTX ranges named ``variant/phase/shape`` for nsys timelines and ncu's NVTX filter.

Why nested ranges: Nsight Compute's ``--nvtx-include`` reads ``/`` as the separator between *nested push/pop
ranges* ("A/B/" = range B pushed inside range A). So a label ``thrift/attention/b1_sq4096_...`` is emitted as
three nested push/pop ranges -- ``thrift`` > ``attention`` > ``b1_sq4096_...`` -- and the filter
``ncu --nvtx --nvtx-include "thrift/attention/"`` selects exactly the attention kernels of the thrift variant
(any shape); append the shape tag and a trailing ``/`` to pin one shape. In an nsys timeline the same ranges
show up as a three-row stack (variant, phase, shape).

Usage (kernels' entry points, cheap when no profiler is attached):

    from profiling.nvtx_ranges import phase, nvtx_range, annotate

    with phase("quantize"):          # -> "<variant>/quantize/<shape>" from the enclosing variant_scope
        ...
    @annotate("select")              # same, as a decorator
    def select_blocks(...): ...

and the benchmark (or any caller) sets the outer labels once:

    with variant_scope("thrift-b0.05", shape=shape_tag(B, Sq, Skv, Hq, Hkv, D)):
        out = thrift_attention(q, k, v)

Without an enclosing ``variant_scope`` a phase is labelled with the default variant ``thrift`` and no shape.
Backends, first that works: the ``nvtx`` package, then ``torch.cuda.nvtx`` (only when CUDA is available),
else no-op. ``HARNESS_NVTX=0`` in the environment turns everything into a no-op.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator, Optional

DEFAULT_VARIANT = "thrift"
PHASES = ("quantize", "select", "attention", "combine")

_variant: contextvars.ContextVar[str] = contextvars.ContextVar("nvtx_variant", default=DEFAULT_VARIANT)
_shape: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("nvtx_shape", default=None)
_active: contextvars.ContextVar[bool] = contextvars.ContextVar("nvtx_in_scope", default=False)

_backend = None  # (name, push, pop), resolved lazily


def _resolve_backend():
    global _backend
    if _backend is not None:
        return _backend
    if os.environ.get("HARNESS_NVTX", "1") == "0":
        _backend = ("none", None, None)
        return _backend
    try:
        import nvtx  # the `nvtx` package (NVIDIA/NVTX python bindings)

        _backend = ("nvtx", lambda name: nvtx.push_range(message=name), lambda: nvtx.pop_range())
        return _backend
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            _backend = ("torch.cuda.nvtx", torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
            return _backend
    except Exception:
        pass
    _backend = ("none", None, None)
    return _backend


def backend_name() -> str:
    """Which NVTX backend is in use: 'nvtx', 'torch.cuda.nvtx' or 'none'."""
    return _resolve_backend()[0]


def _clean(part: str) -> str:
    # '/' separates nesting levels for ncu; keep each level free of it (and of spaces, for shell filters)
    return str(part).replace("/", "_").replace(" ", "_")


def shape_tag(b: int, sq: int, skv: int, hq: int, hkv: int, d: int, *, causal: Optional[bool] = None,
              dtype: Optional[str] = None) -> str:
    """Compact shape label used as the innermost range, e.g. ``b1_sq4096_skv4096_h32_kv8_d128_c``."""
    tag = f"b{b}_sq{sq}_skv{skv}_h{hq}_kv{hkv}_d{d}"
    if causal is not None:
        tag += "_c" if causal else "_nc"
    if dtype:
        tag += f"_{dtype}"
    return tag


def label(variant: str, phase_name: str, shape: Optional[str] = None) -> str:
    """The ``variant/phase/shape`` path string (what ncu's --nvtx-include matches, plus a trailing '/')."""
    parts = [_clean(variant), _clean(phase_name)] + ([_clean(shape)] if shape else [])
    return "/".join(parts)


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """One push/pop range; ``name`` containing '/' is pushed as nested ranges (one per path component)."""
    _, push, pop = _resolve_backend()
    if push is None:
        yield
        return
    parts = [p for p in str(name).split("/") if p]
    for p in parts:
        push(p)
    try:
        yield
    finally:
        for _ in parts:
            pop()


@contextlib.contextmanager
def variant_scope(variant: str, shape: Optional[str] = None, *, push: bool = True) -> Iterator[None]:
    """Set the variant (and shape) for every ``phase`` inside; with ``push`` also opens the ``variant``
    range itself so that kernels launched outside any phase still sit under it in the timeline."""
    tv = _variant.set(_clean(variant))
    ts = _shape.set(_clean(shape) if shape else None)
    ta = _active.set(push)
    try:
        if push:
            with nvtx_range(_clean(variant)):
                yield
        else:
            yield
    finally:
        _active.reset(ta)
        _shape.reset(ts)
        _variant.reset(tv)


@contextlib.contextmanager
def phase(phase_name: str, shape: Optional[str] = None) -> Iterator[None]:
    """Range ``<variant>/<phase>/<shape>``: pushes only what the enclosing ``variant_scope`` has not pushed."""
    shp = _clean(shape) if shape else _shape.get()
    inner = [_clean(phase_name)] + ([shp] if shp else [])
    if not _active.get():  # no variant range open: push it too
        inner = [_variant.get()] + inner
    with nvtx_range("/".join(inner)):
        yield


def annotate(phase_name: str) -> Callable:
    """Decorator form of :func:`phase` for kernel entry points."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with phase(phase_name):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def current_label(phase_name: str) -> str:
    """The label a ``phase(phase_name)`` would get here (for logs and tests)."""
    return label(_variant.get(), phase_name, _shape.get())
