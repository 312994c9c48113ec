"""Triton backend of the fused reward head + loss: the kernels, their launcher, its autograd Function.

Shapes: ``hidden [T, D]``, ``weight [D]``, ``bias []``, ``reward_positions [N]``; ``U`` unique
positions; pair mode ``chosen_index/rejected_index [P]``; contrast mode ``[Bc]``/``[Br]`` with
``contrast_weights [Bc, Br]``.

Forward (four small launches, nothing of size ``T`` is touched)::

    _gather_dot_kernel    r_u = hidden[upos_u] . weight + bias            grid cdiv(U, BLOCK_U)
    _pair_loss_kernel     per comparison: s_p * (l(delta_p) + cc*(r_c + r_r)^2), and the two
                          reward gradients g_c, g_r (closed form)            grid cdiv(P, BLOCK_P)
    _contrast_loss_kernel the same over the Bc x Br grid: row sums (chosen gradients, loss),
                          column partial sums per row block (rejected)       grid cdiv(Bc, BLOCK_I)
    _segment_sum_kernel   coef_u = sum of the gradients of every comparison entry whose response
                          sits at unique position u                          grid U

A response used by several comparisons, or a position listed twice in ``reward_positions``,
gets its gradient from the segmented reduction: entries are sorted (stably) by target position
and each program sums its own segment in a fixed order, so the result is deterministic (no
atomics). The loss is a sum of per-block partials, reduced by torch afterwards.

Block sizes: :data:`BLOCKS` holds, per kernel, the ``(floor, cap)`` of each ``BLOCK_*``; the
launcher picks the next power of two of the size a block tiles, clamped to that range
(:func:`block_size`). ``tests/ops`` compile every value to PTX and run each in the interpreter.

Backward (one launch, Liger style: the forward already holds ``dL/dr``)::

    _head_backward_kernel grid (cdiv(U, BLOCK_U), cdiv(D, BLOCK_D)):
        grad_hidden[upos_u, d] = g * coef_u * weight[d]        (rows are unique: plain stores)
        grad_w_partial[block, d] = sum_{u in block} g * coef_u * hidden[upos_u, d]
    grad_weight = grad_w_partial.sum(0);  grad_bias = g * sum_u coef_u

``g`` (``grad_output``) is read from device memory inside the kernel, so no host sync.

This module imports on machines without a GPU. On CPU tensors the kernels run only in Triton's
interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before triton is first
imported* (``triton.language`` itself is built differently in interpreter mode; torchtune and
torchao import triton, so set it before importing them too). ``bf16`` loads are upcast to fp32
before any arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch

from fastrm.ops.head_loss_contract import OBJECTIVE_CODES, HeadLossFunction, HeadLossInputs

try:  # importable without triton (e.g. macOS); the backend then reports itself unavailable
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = ""
except ImportError as err:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    tl = types.SimpleNamespace(constexpr=object)
    _TRITON_IMPORT_ERROR = f"triton is not importable ({err})"


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# --------------------------------------------------------------------------------- kernels
@_jit
def _gather_dot_kernel(
    hidden_ptr, stride_t, pos_ptr, w_ptr, bias_ptr, out_ptr, U, D,
    HAS_BIAS: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[u] = sum_d hidden[pos[u], d] * w[d] (+ bias), fp32, for a block of BLOCK_U rows."""
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    mask_u = offs_u < U
    rows = tl.load(pos_ptr + offs_u, mask=mask_u, other=0)  # int64: no T*D overflow
    acc = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        h = tl.load(hidden_ptr + rows[:, None] * stride_t + offs_d[None, :],
                    mask=mask_u[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += h * w[None, :]
    r = tl.sum(acc, axis=1)
    if HAS_BIAS:
        r += tl.load(bias_ptr).to(tl.float32)
    tl.store(out_ptr + offs_u, r, mask=mask_u)


@_jit
def _pair_loss_kernel(
    r_ptr, c_ptr, j_ptr, m_ptr, cw_ptr, inv_norm_ptr, loss_part_ptr, gc_ptr, gr_ptr, P,
    eps, hinge, centering,
    OBJECTIVE: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per comparison p: delta = r[c_p] - r[j_p] - m_p, s_p = w_p / sum(w) (or 1/P);
    loss_part[block] = sum_p s_p (l(delta) + cc (r_c + r_r)^2);
    gc[p] = s_p (l'(delta) + 2 cc (r_c + r_r)), gr[p] = s_p (-l'(delta) + 2 cc (r_c + r_r))."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    ci = tl.load(c_ptr + offs, mask=mask, other=0)
    ji = tl.load(j_ptr + offs, mask=mask, other=0)
    rc = tl.load(r_ptr + ci, mask=mask, other=0.0)
    rr = tl.load(r_ptr + ji, mask=mask, other=0.0)
    delta = rc - rr
    if HAS_MARGIN:
        delta -= tl.load(m_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(inv_norm_ptr) + tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(cw_ptr + offs, mask=mask, other=0.0)
    # objective value l(delta) and slope l'(delta), overflow-free
    if OBJECTIVE == 0:  # bradley_terry with label smoothing eps
        z = tl.exp(-tl.abs(delta))
        log1pz = tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))
        sig_neg = tl.where(delta >= 0, z / (1.0 + z), 1.0 / (1.0 + z))  # sigmoid(-delta)
        value = (1.0 - eps) * (tl.maximum(-delta, 0.0) + log1pz) + eps * (tl.maximum(delta, 0.0) + log1pz)
        slope = -(1.0 - eps) * sig_neg + eps * (1.0 - sig_neg)
    else:  # hinge
        value = tl.maximum(hinge - delta, 0.0)
        slope = tl.where(delta < hinge, -1.0, 0.0)
    s = rc + rr
    value += centering * s * s
    tl.store(gc_ptr + offs, scale * (slope + 2.0 * centering * s), mask=mask)
    tl.store(gr_ptr + offs, scale * (2.0 * centering * s - slope), mask=mask)
    tl.store(loss_part_ptr + pid, tl.sum(tl.where(mask, scale * value, 0.0), axis=0))


@_jit
def _contrast_loss_kernel(
    r_ptr, c_ptr, j_ptr, m_ptr, w_ptr, stride_w0, stride_w1, loss_part_ptr, row_g_ptr,
    col_part_ptr, Bc, Br, inv_bc, eps, hinge, centering,
    OBJECTIVE: tl.constexpr, HAS_MARGIN: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Cross-prompt mode for a block of chosen rows i: over all rejected j,
    delta_ij = r_c[i] - r_r[j] - [i == j] m_i, a_ij = W_ij / Bc;
    row_g[i] = sum_j a_ij (l' + 2 cc s_ij), col_part[block, j] = sum_{i in block} a_ij (-l' + 2 cc s_ij),
    loss_part[block] = sum_{i in block, j} a_ij (l + cc s_ij^2), with s_ij = r_c[i] + r_r[j]."""
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < Bc
    rc = tl.load(r_ptr + tl.load(c_ptr + offs_i, mask=mask_i, other=0), mask=mask_i, other=0.0)
    if HAS_MARGIN:
        mi = tl.load(m_ptr + offs_i, mask=mask_i, other=0.0)
    row_acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, Br, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < Br
        rr = tl.load(r_ptr + tl.load(j_ptr + offs_j, mask=mask_j, other=0), mask=mask_j, other=0.0)
        delta = rc[:, None] - rr[None, :]
        if HAS_MARGIN:
            delta -= tl.where(offs_i[:, None] == offs_j[None, :], mi[:, None], 0.0)
        mask2 = mask_i[:, None] & mask_j[None, :]
        a = tl.load(w_ptr + offs_i[:, None] * stride_w0 + offs_j[None, :] * stride_w1,
                    mask=mask2, other=0.0).to(tl.float32) * inv_bc
        if OBJECTIVE == 0:
            z = tl.exp(-tl.abs(delta))
            log1pz = tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))
            sig_neg = tl.where(delta >= 0, z / (1.0 + z), 1.0 / (1.0 + z))
            value = (1.0 - eps) * (tl.maximum(-delta, 0.0) + log1pz) + eps * (tl.maximum(delta, 0.0) + log1pz)
            slope = -(1.0 - eps) * sig_neg + eps * (1.0 - sig_neg)
        else:
            value = tl.maximum(hinge - delta, 0.0)
            slope = tl.where(delta < hinge, -1.0, 0.0)
        s = rc[:, None] + rr[None, :]
        value += centering * s * s
        loss_acc += tl.sum(a * value, axis=1)
        row_acc += tl.sum(a * (slope + 2.0 * centering * s), axis=1)
        tl.store(col_part_ptr + pid * Br + offs_j,
                 tl.sum(a * (2.0 * centering * s - slope), axis=0), mask=mask_j)
    tl.store(row_g_ptr + offs_i, row_acc, mask=mask_i)
    tl.store(loss_part_ptr + pid, tl.sum(loss_acc, axis=0))


@_jit
def _segment_sum_kernel(val_ptr, order_ptr, offsets_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[u] = sum_{k in [offsets[u], offsets[u+1])} val[order[k]] in a fixed order."""
    u = tl.program_id(0)
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < end
        idx = tl.load(order_ptr + offs, mask=mask, other=0)
        acc += tl.load(val_ptr + idx, mask=mask, other=0.0)
    tl.store(out_ptr + u, tl.sum(acc, axis=0))


@_jit
def _head_backward_kernel(
    hidden_ptr, stride_t, gh_ptr, stride_gt, upos_ptr, coef_ptr, w_ptr, gout_ptr, gw_part_ptr,
    U, D, WRITE_HIDDEN: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tile (block of unique rows) x (block of D): writes g*coef_u*w into grad_hidden's rows
    and the block's partial sum of g*coef_u*hidden[row] into gw_part[pid_u]."""
    pid_u = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_u = offs_u < U
    mask_d = offs_d < D
    mask2 = mask_u[:, None] & mask_d[None, :]
    rows = tl.load(upos_ptr + offs_u, mask=mask_u, other=0)
    coef = tl.load(coef_ptr + offs_u, mask=mask_u, other=0.0) * tl.load(gout_ptr).to(tl.float32)
    if WRITE_HIDDEN:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        gh = coef[:, None] * w[None, :]
        tl.store(gh_ptr + rows[:, None] * stride_gt + offs_d[None, :],
                 gh.to(gh_ptr.dtype.element_ty), mask=mask2)
    h = tl.load(hidden_ptr + rows[:, None] * stride_t + offs_d[None, :], mask=mask2,
                other=0.0).to(tl.float32)
    tl.store(gw_part_ptr + pid_u * D + offs_d, tl.sum(coef[:, None] * h, axis=0), mask=mask_d)


# -------------------------------------------------------------------------------- launchers
#: True when the kernels above were built by Triton's interpreter (TRITON_INTERPRET=1 before
#: triton's first import); read once, so wrapping a kernel (tests spy on launches) changes nothing
_INTERPRETED = triton is not None and type(_gather_dot_kernel).__name__ == "InterpretedFunction"


def _interpreted() -> bool:
    return _INTERPRETED


def triton_unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on ``device`` (empty when it can)."""
    if triton is None:
        return _TRITON_IMPORT_ERROR
    if device.type == "cuda" or _interpreted():
        return ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 was set after triton had been imported (torchtune and torchao "
                "import it), so the kernels were compiled for a GPU; set it before any import")
    return (f"the Triton kernels need CUDA tensors (hidden is on {device}); on CPU set "
            f"TRITON_INTERPRET=1 before triton is first imported, or use backend='native'/'torch'")


#: kernel -> BLOCK_* constexpr -> (floor, cap): each block size is the next power of two of the
#: size it tiles (rows, D, comparisons, chosen / rejected responses), clamped to that range
BLOCKS = {
    "_gather_dot_kernel": {"BLOCK_U": (1, 16), "BLOCK_D": (16, 512)},
    "_pair_loss_kernel": {"BLOCK_P": (16, 1024)},
    "_contrast_loss_kernel": {"BLOCK_I": (1, 32), "BLOCK_J": (16, 64)},
    "_segment_sum_kernel": {"BLOCK": (16, 16)},  # segments are short: a response's comparisons
    "_head_backward_kernel": {"BLOCK_U": (1, 16), "BLOCK_D": (16, 256)},
}


def block_size(kernel: str, name: str, size: int) -> int:
    """The ``name`` block of ``kernel`` for ``size`` elements along the dimension it tiles."""
    floor, cap = BLOCKS[kernel][name]
    return max(floor, min(cap, triton.next_power_of_2(max(int(size), 1))))


def _segment_sum(values: torch.Tensor, targets: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[u] = sum(values[targets == u])`` deterministically (stable sort + one program per u)."""
    order = torch.argsort(targets, stable=True)
    counts = torch.bincount(targets, minlength=num_segments)
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    out = torch.empty(num_segments, dtype=torch.float32, device=values.device)
    block = block_size("_segment_sum_kernel", "BLOCK", values.shape[0])  # one size (floor = cap)
    _segment_sum_kernel[(num_segments,)](values, order, offsets, out, BLOCK=block)
    return out


def _launch_forward(inp: HeadLossInputs):
    """Returns ``(loss [], rewards [N], upos [U], coef [U])`` with ``coef = dL/dr`` summed per
    unique position."""
    hidden, weight, bias = inp.hidden, inp.weight, inp.bias
    dev = hidden.device
    t, d = hidden.shape
    upos, inverse = torch.unique(inp.reward_positions, return_inverse=True)
    u = upos.shape[0]
    r_u = torch.empty(u, dtype=torch.float32, device=dev)
    block_u = block_size("_gather_dot_kernel", "BLOCK_U", u)
    block_d = block_size("_gather_dot_kernel", "BLOCK_D", d)
    _gather_dot_kernel[(triton.cdiv(u, block_u),)](
        hidden, hidden.stride(0), upos, weight, bias if bias is not None else r_u, r_u, u, d,
        HAS_BIAS=bias is not None, BLOCK_U=block_u, BLOCK_D=block_d)
    rewards = r_u[inverse]  # [N]: duplicated positions share one dot product

    o = inp.options
    code, eps, hm, cc = (OBJECTIVE_CODES[o.objective], o.label_smoothing, o.hinge_margin,
                         o.centering_coefficient)
    m = inp.margin
    targets = torch.cat([inverse[inp.chosen_index], inverse[inp.rejected_index]])
    if inp.contrast:
        bc, br = inp.chosen_index.shape[0], inp.rejected_index.shape[0]
        w = inp.contrast_weights
        block_i = block_size("_contrast_loss_kernel", "BLOCK_I", bc)
        block_j = block_size("_contrast_loss_kernel", "BLOCK_J", br)
        nblk = triton.cdiv(bc, block_i)
        loss_part = torch.empty(nblk, dtype=torch.float32, device=dev)
        col_part = torch.empty(nblk, br, dtype=torch.float32, device=dev)
        contrib = torch.empty(bc + br, dtype=torch.float32, device=dev)
        _contrast_loss_kernel[(nblk,)](
            rewards, inp.chosen_index, inp.rejected_index, m if m is not None else rewards, w,
            w.stride(0), w.stride(1), loss_part, contrib, col_part, bc, br, 1.0 / bc, eps, hm, cc,
            OBJECTIVE=code, HAS_MARGIN=m is not None, BLOCK_I=block_i, BLOCK_J=block_j)
        contrib[bc:] = col_part.sum(0)  # reduce the per-row-block column partials
    else:
        p = inp.chosen_index.shape[0]
        cw = inp.comparison_weight
        inv_norm = (1.0 / cw.sum()) if cw is not None else torch.full((), 1.0 / p, device=dev)
        block_p = block_size("_pair_loss_kernel", "BLOCK_P", p)
        nblk = triton.cdiv(p, block_p)
        loss_part = torch.empty(nblk, dtype=torch.float32, device=dev)
        contrib = torch.empty(2 * p, dtype=torch.float32, device=dev)
        _pair_loss_kernel[(nblk,)](
            rewards, inp.chosen_index, inp.rejected_index, m if m is not None else rewards,
            cw if cw is not None else rewards, inv_norm.to(torch.float32), loss_part,
            contrib[:p], contrib[p:], p, eps, hm, cc, OBJECTIVE=code, HAS_MARGIN=m is not None,
            HAS_WEIGHT=cw is not None, BLOCK_P=block_p)
    coef = _segment_sum(contrib, targets, u)
    return loss_part.sum(), rewards, upos, coef


def _launch_backward(hidden, weight, upos, coef, grad_loss, need_hidden: bool):
    """``(grad_hidden | None, grad_weight [D] fp32, grad_bias [] fp32)``; ``grad_output`` is read
    on the device."""
    t, d = hidden.shape
    u = upos.shape[0]
    block_u = block_size("_head_backward_kernel", "BLOCK_U", u)
    block_d = block_size("_head_backward_kernel", "BLOCK_D", d)
    grid = (triton.cdiv(u, block_u), triton.cdiv(d, block_d))
    # zeros: rows outside reward_positions get exactly 0; the kernel writes the U others.
    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden
    gw_part = torch.empty(grid[0], d, dtype=torch.float32, device=hidden.device)
    g = grad_loss.detach().to(torch.float32).reshape(())
    _head_backward_kernel[grid](
        hidden, hidden.stride(0), grad_hidden, grad_hidden.stride(0), upos, coef, weight, g,
        gw_part, u, d, WRITE_HIDDEN=need_hidden, BLOCK_U=block_u, BLOCK_D=block_d)
    return (grad_hidden if need_hidden else None), gw_part.sum(0), g * coef.sum()


def _on_device(t: torch.Tensor):
    """Launches go to ``t``'s GPU (not the current one); nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonHeadLossFunction(HeadLossFunction):
    """``(loss, rewards) = f(hidden [T, D], weight [D], bias [] | None)`` with the Triton kernels.

    The forward computes rewards, loss and ``dL/dr`` (summed per unique position) and saves
    only ``hidden`` (a reference), ``weight``, the ``U`` unique positions and ``U`` coefficients;
    the backward reads ``grad_output`` on the device (no host sync).
    """

    @staticmethod
    def _forward(inp: HeadLossInputs):
        with _on_device(inp.hidden):
            loss, rewards, upos, coef = _launch_forward(inp)
        return loss, rewards, (upos, coef)

    @staticmethod
    def _backward(hidden, weight, saved, grad_loss, needs):
        upos, coef = saved
        with _on_device(hidden):
            return _launch_backward(hidden, weight, upos, coef, grad_loss, needs[0])
