"""Triton kernels of :func:`fastrm.ops.swiglu.silu_mul` (the CUDA backend of ``SiluMulFunction``
and of the elementwise part of ``SwiGLUMLPFunction``).

Same contract as the C++ op: ``a = silu(gate) * up`` and its backward from the saved ``gate``
and ``up`` (the MLP keeps ``x``, ``gate = x w1^T`` and ``up = x w3^T`` and recomputes ``a``),
one pass each over flat contiguous tensors, math in fp32, results in the inputs' dtype::

    s = sigmoid(gate)          a = gate * s * up
    grad_gate = grad_a * up * s * (1 + gate * (1 - s))
    grad_up   = grad_a * gate * s

``sigmoid`` is computed from ``exp(-|g|)`` (no overflow, no ``inf``): it saturates to 0 / 1
for large ``|g|``. Offsets are int64: ``N`` may exceed 2^31.
"""

from __future__ import annotations

import torch

from fastrm.ops.triton_support import jit, tl, triton

BLOCK = 1024


@jit
def _sigmoid(g):
    """``1 / (1 + exp(-g))`` from ``z = exp(-|g|)``, which never overflows."""
    z = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, a_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(a_ptr + offs, (g * s * u).to(a_ptr.dtype.element_ty), mask=mask)


@jit
def _silu_mul_bwd_kernel(da_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(dg_ptr + offs, (d * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty),
             mask=mask)
    tl.store(du_ptr + offs, (d * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def silu_mul_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes and dtype) -> contiguous, the inputs' dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    a = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, a, n, BLOCK=BLOCK)
    return a


def silu_mul_backward_triton(grad_a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_gate, grad_up)`` of ``a = silu(gate) * up`` in the inputs' dtype (``grad_a`` of
    any float dtype: it is read as fp32)."""
    grad_a, gate, up = grad_a.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _silu_mul_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad_a, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du
