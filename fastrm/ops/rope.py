"""Rotary position embedding (torchtune's interleaved layout) that saves no activation.

Channel pairs ``(2i, 2i+1)`` of each head are rotated by the angle of the token's position, as
in torchtune's :class:`~torchtune.modules.RotaryPositionalEmbeddings` and
:class:`~torchtune.models.llama3_1.Llama3ScaledRoPE` (whose ``cache [max_seq_len, D/2, 2]`` holds
``(cos, sin)``). torchtune's forward keeps an fp32 copy of ``x`` for its backward; a rotation's
backward is the inverse rotation, so :class:`RopeFunction` keeps only the gathered
``cos_sin [T, D/2, 2]`` (shared by q and k and by every layer of a step).

Shapes: ``x [T, H, D]`` (any leading dims flatten into ``T``), ``cos_sin [T, D/2, 2]`` fp32
(fp64 for fp64 ``x``). Math in fp32, output in ``x``'s dtype.

Backends: the C++ op from ``kernels/rope.cpp`` on CPU (fp32, fp64, bf16), the Triton kernel of
:mod:`fastrm.ops.rope_triton` on CUDA (fp32, bf16, fp16 ``x``), plain torch elsewhere and inside
``torch.compile`` graphs.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastrm import _native
from fastrm.ops import rope_triton
from fastrm.ops.triton_support import triton_ok

OP = "rope_rotate"
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def native_ok(x: torch.Tensor) -> bool:
    """True when the C++ op runs ``x`` (CPU, a native dtype, built, not being compiled)."""
    return (x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and _native.has_op(OP)
            and not torch.compiler.is_compiling())


def rope_cos_sin(cache: torch.Tensor, positions: Optional[torch.Tensor], seq_len: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """``cache[positions]`` (or ``cache[:seq_len]``) as ``[T, D/2, 2]`` in the compute dtype
    of ``dtype`` (fp64 for fp64, else fp32). ``positions``: ``[T]`` or ``[b, s]``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = cache[:seq_len] if positions is None else cache[positions.reshape(-1)]
    return rows.reshape(rows.shape[0], -1, 2).to(acc)


def rope_rotate_torch(x: torch.Tensor, cos_sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Reference rotation of ``x [T, H, D]`` (``inverse``: by the negative angle)."""
    t, h, d = x.shape
    xs = x.to(cos_sin.dtype).reshape(t, h, d // 2, 2)
    cos = cos_sin[:, None, :, 0]
    sin = cos_sin[:, None, :, 1]
    if inverse:
        sin = -sin
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.reshape(t, h, d).to(x.dtype)


def _rotate(x: torch.Tensor, cos_sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    if native_ok(x):
        return torch.ops.fastrm.rope_rotate(x, cos_sin, inverse)
    if triton_ok(x) and cos_sin.dtype == torch.float32:
        return rope_triton.rope_rotate_triton(x, cos_sin, inverse)
    return rope_rotate_torch(x, cos_sin, inverse)


class RopeFunction(torch.autograd.Function):
    """``y = rotate(x [T, H, D], cos_sin [T, D/2, 2])``; saves ``cos_sin`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_sin)
        return _rotate(x, cos_sin, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (cos_sin,) = ctx.saved_tensors
        return _rotate(grad_y, cos_sin, inverse=True), None


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [..., T, H, D]`` (leading dims flattened with ``T``) by ``cos_sin [T', D/2, 2]``
    where ``T'`` is the flattened token count; returns ``x``'s shape and dtype."""
    shape = x.shape
    if x.dim() < 3 or shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [..., T, H, D] with even D, got {tuple(shape)}")
    x3 = x.reshape(-1, shape[-2], shape[-1])
    if cos_sin.shape != (x3.shape[0], shape[-1] // 2, 2):
        raise ValueError(f"apply_rope: cos_sin must be [{x3.shape[0]}, {shape[-1] // 2}, 2], got "
                         f"{tuple(cos_sin.shape)}")
    return RopeFunction.apply(x3, cos_sin).view(shape)
