"""Argument checks shared by the reference, the selection and the kernels' entry points.

Every failure raises TypeError (wrong type/dtype) or ValueError (wrong value/shape) with a message that names
the argument and says what was expected, so a caller never gets a shape error from deep inside a matmul.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

#: Input dtypes of the reference (the kernels take fp16/bf16 only and pass `dtypes=KERNEL_DTYPES`).
REF_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: head_dim values the GPU kernels are built for (the reference accepts any multiple of 16).
KERNEL_HEAD_DIMS = (64, 128)
SELECTION_METHODS = ("block_mean", "quest", "local", "random")


def _fn(where: str) -> str:
    return f"{where}: " if where else ""


def check_tensor(name: str, x, *, dtypes=REF_DTYPES, ndim: int | None = None, where: str = "") -> None:
    """`x` is a non-empty torch.Tensor of one of `dtypes` (and rank `ndim` if given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_fn(where)}{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{_fn(where)}{name} must have dtype {names}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{_fn(where)}{name} must be a rank-{ndim} tensor [B, S, H, D], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{_fn(where)}{name} must not be empty, got shape {tuple(x.shape)}")


def check_qkv(q, k, v=None, *, dtypes=REF_DTYPES, head_dims: Iterable[int] | None = None, where: str = ""):
    """Checks q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] (v optional, e.g. for selection).

    One dtype and one device for all; Hq % Hkv == 0 (GQA/MQA). head_dims=None accepts any D that is a multiple
    of 16 (the FP4 group along D); the kernels pass KERNEL_HEAD_DIMS. Returns (B, Sq, Hq, D, Skv, Hkv).
    """
    check_tensor("q", q, dtypes=dtypes, ndim=4, where=where)
    check_tensor("k", k, dtypes=dtypes, ndim=4, where=where)
    named = [("k", k)]
    if v is not None:
        check_tensor("v", v, dtypes=dtypes, ndim=4, where=where)
        named.append(("v", v))
    for name, t in named:
        if t.dtype != q.dtype:
            raise TypeError(f"{_fn(where)}{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_fn(where)}{name} must be on q's device {q.device}, got {t.device}")
    B, Sq, Hq, D = q.shape
    _, Skv, Hkv, _ = k.shape
    if k.shape[0] != B:
        raise ValueError(f"{_fn(where)}k must have q's batch size {B}, got k.shape={tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"{_fn(where)}k must have q's head_dim {D}, got k.shape={tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{_fn(where)}v must have k's shape {tuple(k.shape)} [B, Skv, Hkv, D], got {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{_fn(where)}the number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv}) (GQA/MQA)")
    if head_dims is not None:
        head_dims = tuple(head_dims)
        if D not in head_dims:
            raise ValueError(f"{_fn(where)}head_dim must be one of {head_dims}, got {D}")
    elif D % 16:
        raise ValueError(f"{_fn(where)}head_dim must be a multiple of 16 (the FP4 group), got {D}")
    return B, Sq, Hq, D, Skv, Hkv


def check_budget(budget, *, where: str = "") -> float:
    """A real number in [0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{_fn(where)}budget must be a float in [0, 1], got {type(budget).__name__}")
    b = float(budget)
    if not (0.0 <= b <= 1.0):  # also rejects NaN
        raise ValueError(f"{_fn(where)}budget must be in [0, 1], got {budget}")
    return b


def check_int(name: str, x, *, minimum: int = 0, where: str = "") -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{_fn(where)}{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{_fn(where)}{name} must be >= {minimum}, got {x}")
    return x


def check_bool(name: str, x, *, where: str = "") -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{_fn(where)}{name} must be a bool, got {type(x).__name__}")
    return x


def check_choice(name: str, x, choices, *, where: str = "") -> str:
    if not isinstance(x, str):
        raise TypeError(f"{_fn(where)}{name} must be a str, one of {tuple(choices)}, got {type(x).__name__}")
    if x not in choices:
        raise ValueError(f"{_fn(where)}unknown {name} {x!r}; expected one of {tuple(choices)}")
    return x


def check_fmt(fmt, *, where: str = ""):
    """The quant format object for `fmt` ("nvfp4"/"mxfp4"); ValueError naming fmt otherwise."""
    if not isinstance(fmt, str):
        raise TypeError(f"{_fn(where)}fmt must be a str such as 'nvfp4' or 'mxfp4', got {type(fmt).__name__}")
    from quant.formats import get_format  # lazy: the codecs live in their own package

    try:
        return get_format(fmt)
    except ValueError as e:
        raise ValueError(f"{_fn(where)}unknown fmt {fmt!r} ({e})") from None


def softmax_scale_or_default(softmax_scale, head_dim: int, *, where: str = "") -> float:
    """softmax_scale if given (a positive finite number), else 1/sqrt(head_dim)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{_fn(where)}softmax_scale must be None or a float, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{_fn(where)}softmax_scale must be positive and finite, got {softmax_scale}")
    return s


#: NVFP4 encoder scale rules of Q, K and V (quant.nvfp4 module docstring); "mse" is the default everywhere.
SCALE_RULES = ("mse", "amax")
DEFAULT_SCALE_RULE = "mse"


def check_scale_rule(scale_rule, where: str = "") -> str:
    """Validate the scale_rule option ("mse" | "amax"); ValueError naming it otherwise."""
    if not isinstance(scale_rule, str) or scale_rule not in SCALE_RULES:
        raise ValueError(f"{_fn(where)}scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    return scale_rule
