"""Hadamard rotation of Q and K along head_dim before FP4 quantization (issue 7's winning lever).

Q . K^T is unchanged by an orthogonal rotation applied to both (H symmetric and orthogonal: (qH)(kH)^T = q k^T),
but the rotation spreads outlier channels over the whole head so each 16-element NVFP4 group sees a flatter amax.
Only the FP4 path (Qp/Qs, Kp/Ks) sees rotated values; the FP16 path, V, P and the selection (block means of the
UNrotated Q/K) are unchanged.

Numerics (the one definition; the reference, the CuTe quantizer and the decode path all use it, bit for bit):
    y = x.float()
    fast Walsh-Hadamard butterflies in the fixed stride order 1, 2, 4, 8 (inside each 16-element NVFP4 group),
    then 16, 32, 64, ...: for every pair (a = y[i], b = y[i + s]) with i & s == 0: (a, b) <- (a + b, a - b), fp32
    y = y * fp32(1/sqrt(D))            one fp32 multiply
    return y.to(x.dtype)               RNE to the input dtype (fp16/bf16; no-op for fp32)

Why the order is fixed: fp32 addition is not associative, so any other order (or a matmul, whose summation order
differs between CPU, cuBLAS and the kernel) gives results that differ in the last bits. The CuTe quantizer
(quant/quant_kernel.py, rotate=True) runs strides 1..8 in one thread's registers and 16, 32, 64 by warp shuffles
with exactly these operands in exactly this order, so its FP4 codes equal nvfp4.quantize(hadamard_rotate(x)).
Rounding to the input dtype keeps the quantizers' inputs in the input dtype (unchanged codecs and kernels) and lets
the decode kernel take the rotated query as a second tensor of q's type.

The result equals x @ H_D / sqrt(D) (H_D the Sylvester Hadamard matrix, H_1 = [1], H_2n = [[H, H], [H, -H]]) up to
rounding; applied twice to fp32 input it returns x (to ~1e-6 relative).
"""
from __future__ import annotations

import math

import torch

QK_ROTATIONS = ("hadamard", "none")
DEFAULT_QK_ROTATION = "hadamard"


def check_qk_rotation(qk_rotation, where: str) -> str:
    """Validate the qk_rotation option ("hadamard" | "none"); ValueError naming it otherwise."""
    if not isinstance(qk_rotation, str) or qk_rotation not in QK_ROTATIONS:
        raise ValueError(f"{where}: qk_rotation must be one of {QK_ROTATIONS}, got {qk_rotation!r}")
    return qk_rotation


def _check_dim(D) -> int:
    if not (16 <= D <= 256 and D & (D - 1) == 0):
        raise ValueError(f"hadamard_rotate: the last dim (head_dim) must be a power of two in [16, 256], got {D}")
    return D


def inv_sqrt_fp32(D: int) -> float:
    """fp32(1/sqrt(D)) as a Python float (the constant the kernel multiplies by)."""
    return float(torch.tensor(1.0 / math.sqrt(D), dtype=torch.float32))


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x @ H_D / sqrt(D) along the last dim, with the fixed numerics of the module docstring
    (elementwise fp32 butterflies in the stride order 1, 2, 4, ..., D/2; one fp32 multiply; RNE to x's dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hadamard_rotate: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hadamard_rotate: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("hadamard_rotate: x must have at least one dim")
    D = _check_dim(x.shape[-1])
    lead = x.shape[:-1]
    y = x.float()
    s = 1
    while s < D:
        # index i = j*2s + t*s + r: t = 0 is the lower element of the pair (i & s == 0), t = 1 its partner i + s
        y = y.reshape(*lead, D // (2 * s), 2, s)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        s *= 2
    # 0-dim fp32 tensor on y's device: an elementwise fp32 multiply on every backend
    c = torch.tensor(inv_sqrt_fp32(D), dtype=torch.float32, device=y.device)
    y = y.reshape(x.shape) * c
    return y.to(x.dtype)


def maybe_rotate(x: torch.Tensor, qk_rotation: str) -> torch.Tensor:
    """hadamard_rotate(x) if qk_rotation == "hadamard", else x."""
    return hadamard_rotate(x) if qk_rotation == "hadamard" else x
