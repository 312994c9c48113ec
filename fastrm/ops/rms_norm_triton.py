"""Triton kernels of :mod:`fastrm.ops.rms_norm` (the CUDA backend of ``RMSNormFunction``).

Same contract as the C++ op: the forward returns ``y [R, D]`` in ``x``'s dtype and
``rstd [R]`` fp32; the backward takes ``(grad_y, x, weight, rstd)`` (the function saves only
``x`` and ``rstd``, and the norm-output recompute calls the same forward) and returns
``grad_x [R, D]`` in ``x``'s dtype and ``grad_weight [D]`` fp32. Math in fp32::

    rstd = 1 / sqrt(mean(x^2) + eps)            y = x * rstd * w
    xhat = x * rstd,  g = grad_y * w            grad_x = rstd * (g - xhat * mean(g * xhat))
    grad_w = sum over rows of grad_y * xhat

Kernels (one row of ``D`` per step, ``BLOCK_D`` columns at a time; when ``D <= BLOCK_D`` the
row stays in registers, ``ONE_PASS``, else the row is read twice)::

    _rms_norm_fwd_kernel   grid R
    _rms_norm_bwd_kernel   grid P (persistent): program p takes rows [p*rpp, (p+1)*rpp) and
                           sums its grad_w contributions into its own row of gw_part [P, D];
                           grad_w = gw_part.sum(0) (no atomics: deterministic)

Row offsets are int64 (``R * D`` may exceed 2^31).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastrm.ops.triton_support import jit, num_warps, persistent_programs, pow2, tl, triton

#: widest row block kept in registers; wider rows are processed in blocks of MAX_BLOCK_D
MAX_BLOCK_D = 8192


@jit
def _rms_norm_fwd_kernel(x_ptr, stride_x, w_ptr, y_ptr, stride_y, rstd_ptr, D, eps,
                         BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr):
    """Row ``program_id``: rstd = rsqrt(mean(x^2) + eps), y = x * rstd * w."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    offs = tl.arange(0, BLOCK_D)
    if ONE_PASS:
        mask = offs < D
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = d0 + offs < D
            x = tl.load(x_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
        for d0 in range(0, D, BLOCK_D):
            mask = d0 + offs < D
            x = tl.load(x_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + d0 + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + d0 + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _rms_norm_bwd_kernel(gy_ptr, stride_gy, x_ptr, stride_x, w_ptr, rstd_ptr, gx_ptr, stride_gx,
                         gw_part_ptr, R, D, rows_per_program,
                         BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr):
    """Rows ``[p * rows_per_program, ...)`` of program ``p``: grad_x per row, and
    ``gw_part[p] = sum over its rows of grad_y * xhat``."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    n_rows = tl.minimum(rows_per_program, R - row_start)
    x_row = x_ptr + row_start * stride_x
    gy_row = gy_ptr + row_start * stride_gy
    gx_row = gx_ptr + row_start * stride_gx
    gw_row = gw_part_ptr + pid * D
    offs = tl.arange(0, BLOCK_D)
    if ONE_PASS:
        mask = offs < D
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_rows):
            rstd = tl.load(rstd_ptr + row_start + i)
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            gy = tl.load(gy_row + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd
            g = gy * w
            c = tl.sum(g * xhat, axis=0) / D
            tl.store(gx_row + offs, (rstd * (g - xhat * c)).to(gx_ptr.dtype.element_ty), mask=mask)
            gw_acc += gy * xhat
            x_row += stride_x
            gy_row += stride_gy
            gx_row += stride_gx
        tl.store(gw_row + offs, gw_acc, mask=mask)
    else:  # gw_part starts at zero (the launcher allocates it so)
        for i in range(0, n_rows):
            rstd = tl.load(rstd_ptr + row_start + i)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                mask = d0 + offs < D
                x = tl.load(x_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                gy = tl.load(gy_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                acc += gy * w * (x * rstd)
            c = tl.sum(acc, axis=0) / D
            for d0 in range(0, D, BLOCK_D):
                mask = d0 + offs < D
                x = tl.load(x_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                gy = tl.load(gy_row + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + d0 + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                tl.store(gx_row + d0 + offs,
                         (rstd * (gy * w - xhat * c)).to(gx_ptr.dtype.element_ty), mask=mask)
                part = tl.load(gw_row + d0 + offs, mask=mask, other=0.0)
                tl.store(gw_row + d0 + offs, part + gy * xhat, mask=mask)
            x_row += stride_x
            gy_row += stride_gy
            gx_row += stride_gx


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [R, D]`` with a unit column stride (the kernels index rows by stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _block(d: int, block_d: Optional[int]) -> tuple[int, bool]:
    block = block_d if block_d is not None else pow2(d, MAX_BLOCK_D, 16)
    return block, block >= d


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                            block_d: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, D]`` -> ``(y [R, D] x.dtype, rstd [R] fp32)``. ``block_d`` (a power of two)
    overrides the column block (tests use it to reach the two-pass path)."""
    x = _rows(x)
    r, d = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = torch.empty(r, dtype=torch.float32, device=x.device)
    if r:
        block, one_pass = _block(d, block_d)
        _rms_norm_fwd_kernel[(r,)](x, x.stride(0), weight.contiguous(), y, y.stride(0), rstd, d,
                                   float(eps), BLOCK_D=block, ONE_PASS=one_pass,
                                   num_warps=num_warps(block))
    return y, rstd


def rms_norm_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             rstd: torch.Tensor, block_d: Optional[int] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x [R, D] x.dtype, grad_weight [D] fp32)`` from the saved ``x`` and ``rstd``."""
    x, grad_y = _rows(x), _rows(grad_y)
    r, d = x.shape
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if r == 0:
        return gx, torch.zeros(d, dtype=torch.float32, device=x.device)
    block, one_pass = _block(d, block_d)
    programs = persistent_programs(x.device, r)
    rows_per_program = triton.cdiv(r, programs)
    programs = triton.cdiv(r, rows_per_program)
    gw_part = (torch.empty if one_pass else torch.zeros)(programs, d, dtype=torch.float32,
                                                         device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        grad_y, grad_y.stride(0), x, x.stride(0), weight.contiguous(), rstd.contiguous(), gx,
        gx.stride(0), gw_part, r, d, rows_per_program, BLOCK_D=block, ONE_PASS=one_pass,
        num_warps=num_warps(block))
    return gx, gw_part.sum(0)
