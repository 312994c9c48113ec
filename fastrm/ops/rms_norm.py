"""RMSNorm that keeps only its input and ``rstd [R]`` for the backward.

``y = x * rstd * w`` with ``rstd = 1 / sqrt(mean(x^2) + eps)``, computed in fp32 (fp64 for fp64
input) and returned in ``x``'s dtype: torchtune's :class:`~torchtune.modules.RMSNorm`
(``F.rms_norm(x.float(), ..., weight).to(x.dtype)``). torchtune's module keeps an fp32 copy of
``x`` (and more) alive until the backward; :class:`RMSNormFunction` keeps ``x`` itself and one
float per row, and its backward is one pass per row.

Backends: the C++ op from ``kernels/rms_norm.cpp`` on CPU (fp32, fp64, bf16), the Triton
kernels of :mod:`fastrm.ops.rms_norm_triton` on CUDA (fp32, bf16, fp16), plain torch everywhere
else and inside ``torch.compile`` graphs (where inductor fuses the same formula). Every backend
saves the same two tensors and returns ``rstd`` fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch

from fastrm import _native
from fastrm.ops import rms_norm_triton
from fastrm.ops.triton_support import triton_ok

FORWARD_OP = "rms_norm_forward"
BACKWARD_OP = "rms_norm_backward"
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def native_ok(x: torch.Tensor) -> bool:
    """True when the C++ op runs ``x`` (CPU, a native dtype, built, not being compiled)."""
    return (x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and _native.has_op(FORWARD_OP)
            and not torch.compiler.is_compiling())


def rms_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward: ``x [R, D]`` -> ``(y [R, D] x.dtype, rstd [R] fp32 | fp64)``."""
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[:, None] * weight.to(acc)).to(x.dtype), rstd


def rms_norm_backward_torch(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference backward: ``(grad_x [R, D] x.dtype, grad_weight [D] fp32 | fp64)``."""
    acc = rstd.dtype
    xhat = x.to(acc) * rstd[:, None]
    gy = grad_y.to(acc)
    g = gy * weight.to(acc)
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (gy * xhat).sum(0)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on ``x [R, D]`` by the C++ op (CPU) or the Triton kernel (CUDA) when it runs
    ``x``, else the torch formula (no autograd): ``(y [R, D], rstd [R])``."""
    if native_ok(x):
        return torch.ops.fastrm.rms_norm_forward(x, weight, eps)
    if triton_ok(x):
        return rms_norm_triton.rms_norm_forward_triton(x, weight, eps)
    return rms_norm_forward_torch(x, weight, eps)


class RMSNormFunction(torch.autograd.Function):
    """``y = rms_norm(x [..., D], weight [D], eps)``; saves ``x`` and ``rstd``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y, rstd = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        gy = grad_y.reshape(x2.shape).to(x2.dtype)
        if native_ok(x2):
            dx, dw = torch.ops.fastrm.rms_norm_backward(gy, x2, weight, rstd)
        elif triton_ok(x2):
            dx, dw = rms_norm_triton.rms_norm_backward_triton(gy, x2, weight, rstd)
        else:
            dx, dw = rms_norm_backward_torch(gy, x2, weight, rstd)
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` with ``weight [D]`` (see the module docstring); ``x``'s dtype."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    return RMSNormFunction.apply(x, weight, float(eps))
