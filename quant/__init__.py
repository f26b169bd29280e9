"""Bit-exact reference FP4 codecs (pure torch, CPU/GPU): NVFP4, MXFP4, the SageAttention3 two-level
quantization of softmax probabilities, and a name -> format lookup. No cutlass import here."""
from . import formats, mxfp4, nvfp4, softmax_p
from .formats import FP4Format, get_format
from .softmax_p import quantize_p, quantize_p_parts

__all__ = ["formats", "mxfp4", "nvfp4", "softmax_p", "FP4Format", "get_format", "quantize_p", "quantize_p_parts"]
