"""Name -> FP4 codec lookup, so callers can take a `fmt="nvfp4"|"mxfp4"` argument."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import mxfp4, nvfp4


@dataclass(frozen=True)
class FP4Format:
    """One block-scaled FP4 format: group size along the quantized dim, scale dtype and its codec."""

    name: str
    group: int
    scale_dtype: torch.dtype
    quantize: Callable
    dequantize: Callable
    fake_quantize: Callable


FORMATS = {
    m.NAME: FP4Format(m.NAME, m.GROUP, m.SCALE_DTYPE, m.quantize, m.dequantize, m.fake_quantize)
    for m in (nvfp4, mxfp4)
}


def get_format(name) -> FP4Format:
    """The FP4Format called `name` ("nvfp4" or "mxfp4"; an FP4Format passes through)."""
    if isinstance(name, FP4Format):
        return name
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"get_format: name must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]
