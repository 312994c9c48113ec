"""Triton kernel of :mod:`fastrm.ops.rope` (the CUDA backend of ``RopeFunction``).

Same contract as the C++ op: rotate ``x [T, H, D]`` by the gathered ``cos_sin [T, D/2, 2]``
fp32 (torchtune's interleaved layout: channel pair ``(2i, 2i+1)`` of every head of token ``t``
by angle ``theta[t, i]``); the backward is the same kernel with ``INVERSE`` (the negative
angle), so the function saves ``cos_sin`` only. Math in fp32, output in ``x``'s dtype::

    y[2i]   = x[2i] * cos - x[2i+1] * sin
    y[2i+1] = x[2i+1] * cos + x[2i] * sin          (sin -> -sin when INVERSE)

Grid ``(T, cdiv(H, BLOCK_H))``: a program loads one token's ``D/2`` angles once and rotates
``BLOCK_H`` heads with them. ``x`` may be strided over ``T`` and ``H`` (torchtune's q / k views);
its channels must be contiguous.
"""

from __future__ import annotations

import torch

from fastrm.ops.triton_support import jit, pow2, tl, triton


@jit
def _rope_kernel(x_ptr, stride_xt, stride_xh, cs_ptr, y_ptr, H, HALF,
                 INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = offs_h < H
    mask_p = offs_p < HALF
    cs_row = cs_ptr + t * (2 * HALF) + 2 * offs_p
    cos = tl.load(cs_row, mask=mask_p, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + 1, mask=mask_p, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    mask = mask_h[:, None] & mask_p[None, :]
    x_pair = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + 2 * offs_p[None, :]
    x0 = tl.load(x_pair, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_pair + 1, mask=mask, other=0.0).to(tl.float32)
    y_pair = y_ptr + t * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + 2 * offs_p[None, :]
    ty = y_ptr.dtype.element_ty
    tl.store(y_pair, (x0 * cos[None, :] - x1 * sin[None, :]).to(ty), mask=mask)
    tl.store(y_pair + 1, (x1 * cos[None, :] + x0 * sin[None, :]).to(ty), mask=mask)


def rope_rotate_triton(x: torch.Tensor, cos_sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x [T, H, D]`` rotated by ``cos_sin [T, D/2, 2]`` (fp32); contiguous, ``x``'s dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, h, d = x.shape
    y = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if x.numel():
        block_p = pow2(d // 2, 1 << 14)
        block_h = pow2(h, max(1, 4096 // block_p))
        _rope_kernel[(t, triton.cdiv(h, block_h))](
            x, x.stride(0), x.stride(1), cos_sin.contiguous(), y, h, d // 2,
            INVERSE=bool(inverse), BLOCK_H=block_h, BLOCK_P=block_p)
    return y
