"""SwiGLU MLP that keeps only ``x``, the gate and the up projection for the backward.

torchtune's :class:`~torchtune.modules.FeedForward` computes ``w2(silu(w1(x)) * w3(x))``; eager
autograd keeps ``x``, ``g = w1(x)``, ``silu(g)``, ``u = w3(x)`` and ``a = silu(g) * u`` (four
``[N, I]`` tensors). :class:`SwiGLUMLPFunction` keeps ``x``, ``g`` and ``u`` and recomputes ``a``
in the backward (one elementwise pass), so the MLP's activation memory halves. The elementwise
part is :func:`silu_mul` (``a = silu(g) * u``) and its backward, one pass each.

Shapes: ``x [..., D]``, ``w1, w3 [I, D]``, ``w2 [D, I]`` (``nn.Linear`` weights, no bias).

Backends of the elementwise part: the C++ op from ``kernels/swiglu.cpp`` on CPU (fp32, fp64,
bf16), the Triton kernels of :mod:`fastrm.ops.swiglu_triton` on CUDA (fp32, bf16, fp16), plain
torch elsewhere and inside ``torch.compile`` graphs. The matmuls are torch's on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrm import _native
from fastrm.ops import swiglu_triton
from fastrm.ops.triton_support import triton_ok

FORWARD_OP = "silu_mul_forward"
BACKWARD_OP = "silu_mul_backward"
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def native_ok(t: torch.Tensor) -> bool:
    """True when the C++ ops run ``t`` (CPU, a native dtype, built, not being compiled)."""
    return (t.device.type == "cpu" and t.dtype in NATIVE_DTYPES and _native.has_op(FORWARD_OP)
            and not torch.compiler.is_compiling())


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 (fp64 for fp64), one rounding to the inputs' dtype."""
    if native_ok(gate):
        return torch.ops.fastrm.silu_mul_forward(gate, up)
    if triton_ok(gate):
        return swiglu_triton.silu_mul_forward_triton(gate, up)
    g = _acc(gate)
    return (g * torch.sigmoid(g) * _acc(up)).to(gate.dtype)


def silu_mul_backward(grad_a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_gate, grad_up)`` of ``a = silu(gate) * up``."""
    if native_ok(gate):
        return torch.ops.fastrm.silu_mul_backward(grad_a, gate, up)
    if triton_ok(gate):
        return swiglu_triton.silu_mul_backward_triton(grad_a, gate, up)
    g, d = _acc(gate), _acc(grad_a)
    s = torch.sigmoid(g)
    dg = d * _acc(up) * s * (1 + g * (1 - s))
    return dg.to(gate.dtype), (d * g * s).to(up.dtype)


class SiluMulFunction(torch.autograd.Function):
    """``a = silu(gate) * up`` (any matching shapes); saves ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return silu_mul_forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a: torch.Tensor):
        gate, up = ctx.saved_tensors
        return silu_mul_backward(grad_a, gate, up)


class SwiGLUMLPFunction(torch.autograd.Function):
    """``y = (silu(x w1^T) * (x w3^T)) w2^T``; saves ``x``, ``g = x w1^T``, ``u = x w3^T``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
                ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        g = F.linear(x2, w1)
        u = F.linear(x2, w3)
        y = F.linear(silu_mul_forward(g, u), w2)
        ctx.save_for_backward(x2, g, u, w1, w3, w2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x2, g, u, w1, w3, w2 = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        dy = grad_y.reshape(-1, w2.shape[0]).to(g.dtype)
        grad_w2 = dy.t().mm(silu_mul_forward(g, u)) if need_w2 else None
        dg, du = silu_mul_backward(dy.mm(w2), g, u)
        del g, u
        grad_w1 = dg.t().mm(x2) if need_w1 else None
        grad_w3 = du.t().mm(x2) if need_w3 else None
        grad_x = torch.addmm(dg.mm(w1), du, w3).view(ctx.shape) if need_x else None
        return grad_x, grad_w1, grad_w3, grad_w2


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with the lean backward of :class:`SiluMulFunction`."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must match")
    return SiluMulFunction.apply(gate, up)


def swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
               ) -> torch.Tensor:
    """torchtune's SwiGLU ``FeedForward`` on ``x [..., D]`` from its three weights (see the
    module docstring); ``[..., D]`` in ``x``'s dtype."""
    d = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != d or w3.shape != w1.shape or w2.shape != (d, w1.shape[0]):
        raise ValueError(
            f"swiglu_mlp: need w1, w3 [I, {d}] and w2 [{d}, I]; got w1 {tuple(w1.shape)}, "
            f"w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)}")
    return SwiGLUMLPFunction.apply(x, w1, w3, w2)
