"""Variable-length (packed) causal attention with optional shared prefixes.

Public entry point: :func:`varlen_attention`. Shapes follow flash-attn's varlen API:
``q [T, H, D]``, ``k, v [T, H_kv, D]`` (``H % H_kv == 0``: grouped-query attention), output
``[T, H, D]``. The attention rule (exact in every backend) is documented in
:mod:`fastrm.attention.metadata`.

Backends:

``"flash_attn"``
    ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16). Prefixes: keys gathered as
    ``[prefix keys, own keys]`` per segment with separate ``cu_seqlens_k``; flash-attn's causal
    mask is bottom-right aligned when ``seqlen_k > seqlen_q``, which is the rule exactly.
``"torch_varlen"``
    ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; PyTorch's bundled flash kernel),
    same key gather for prefixes, causal via ``window_size=(-1, 0)`` (also bottom-right aligned).
``"flex"``
    ``torch.nn.attention.flex_attention`` with a block mask built from the segment metadata
    (block-sparse: blocks with no allowed pair are skipped). Compiled on CUDA; on CPU PyTorch
    runs it eagerly and forward-only (no backward), so it is never chosen automatically.
``"cpu_flash"``
    fastrm's native CPU kernels (``kernels/varlen_attention*.cpp``): FlashAttention-2's
    algorithm in bf16 with AVX-512 BF16 dot products (fp32 scores and softmax, nothing of size
    ``[L, L]`` stored), straight on the packed layout (prefixes included, GQA native). CPUs with
    AVX512_BF16, bf16 inputs, head dims that are multiples of 16 up to 128 (or 256). The CPU
    default where it runs.
``"sdpa_segments"``
    Exact per-segment SDPA on any device and dtype: segments with equal (query length, prefix
    length) are gathered into one batched SDPA call; no work is spent on pairs of tokens from
    different segments. The CPU default otherwise.
``"reference"``
    Dense ``[T, T]`` boolean mask from the metadata and explicit softmax; float64-friendly.
    ``O(T^2)``: a second implementation for tests, never chosen automatically.

Choice: the ``backend`` argument, else the metadata's backend (model config), else the
environment variable ``FASTRM_ATTENTION_BACKEND``, else automatic: ``flash_attn`` when
importable, on CUDA and in fp16/bf16; ``torch_varlen`` on CUDA in fp16/bf16; ``cpu_flash`` on
CPU for bf16 when the native kernels run on this CPU (:func:`cpu_flash_unavailable_reason`);
``sdpa_segments`` otherwise.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastrm.attention.metadata import VarlenMetadata

BACKENDS = ("auto", "flash_attn", "torch_varlen", "flex", "cpu_flash", "sdpa_segments", "reference")
ENV_VAR = "FASTRM_ATTENTION_BACKEND"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen_func() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports (it says nothing about the device)."""
    return _flash_attn_varlen_func() is not None


def _torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _cpu_flash_kernel_reason() -> str:
    """Why the native kernels cannot run on this machine at all (cached: it cannot change)."""
    from fastrm import _native

    if not _native.has_op("varlen_attention_forward"):
        return _native.unavailable_reason() or "fastrm._C lacks varlen_attention_forward: rebuild it"
    if not torch.ops.fastrm.varlen_attention_supported():
        return "this CPU lacks AVX-512 BF16 (or fastrm._C was built without it)"
    return ""


def cpu_flash_unavailable_reason(q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """Why the ``cpu_flash`` backend cannot run queries ``q`` (empty string when it can)."""
    if q.device.type != "cpu":
        return f"cpu_flash runs on CPU tensors (q is on {q.device})"
    if q.dtype != torch.bfloat16:
        return f"cpu_flash takes bf16 (q is {q.dtype}); use sdpa_segments for other dtypes"
    reason = _cpu_flash_kernel_reason()
    if reason:
        return reason
    d = q.shape[-1]
    if d % 16 or not (d <= 128 or d == 256):
        return f"cpu_flash needs a head dim that is a multiple of 16 up to 128 (or 256), got {d}"
    if dropout_p:
        return "cpu_flash has no attention dropout; set attn_dropout=0"
    return ""


def check_backend(name: Optional[str]) -> Optional[str]:
    """Normalises a backend name (``None`` / ``"auto"`` -> ``None``); raises on unknown names."""
    if name is None:
        return None
    name = str(name).strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(
            f"attention backend {name!r} is not known; choose one of {', '.join(BACKENDS)} "
            f"(argument, model config attention_backend, or env {ENV_VAR})"
        )
    return name


def select_backend(
    q: torch.Tensor, backend: Optional[str] = None, has_prefix: bool = False,
    dropout_p: float = 0.0,
) -> str:
    """Resolves the backend for ``q``'s device and dtype (see module docstring for the order).

    ``has_prefix`` is accepted for symmetry with the dispatch; every backend handles prefixes.
    The automatic choice skips ``cpu_flash`` when ``dropout_p > 0`` (it has no dropout).
    """
    name = check_backend(backend)
    if name is None:
        name = check_backend(os.environ.get(ENV_VAR))
    if name is not None:
        return name
    if q.is_cuda and q.dtype in _FLASH_DTYPES:
        if flash_attn_available():
            return "flash_attn"
        if _torch_varlen_available():
            return "torch_varlen"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not cpu_flash_unavailable_reason(q, dropout_p):
        return "cpu_flash"
    return "sdpa_segments"


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
def _sdpa_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """Exact per-segment attention: one batched SDPA call per distinct ``(L, P)``."""
    plan = meta.segment_plan()
    h, hk, d = q.shape[1], k.shape[1], q.shape[2]
    gqa = hk != h
    # one gather per tensor for all groups, then a split (see SegmentPlan): the backward is one
    # scatter, not one full-size zero-fill + accumulate per group
    if plan.query_index is not None:
        q_all = q.index_select(0, plan.query_index)
        k_all = k.index_select(0, plan.query_index if plan.key_index is None else plan.key_index)
        v_all = v.index_select(0, plan.query_index if plan.key_index is None else plan.key_index)
    elif plan.key_index is not None:
        q_all = q
        k_all = k.index_select(0, plan.key_index)
        v_all = v.index_select(0, plan.key_index)
    else:
        q_all, k_all, v_all = q, k, v
    if len(plan.groups) == 1:
        q_parts, k_parts, v_parts = (q_all,), (k_all,), (v_all,)
    else:
        q_parts = q_all.split(plan.query_sizes)
        k_parts = k_all.split(plan.key_sizes)
        v_parts = v_all.split(plan.key_sizes)
    outs = []
    for g, qg, kg, vg in zip(plan.groups, q_parts, k_parts, v_parts):
        n, L, P = g.num_segments, g.query_len, g.prefix_len
        og = F.scaled_dot_product_attention(
            qg.reshape(n, L, h, d).transpose(1, 2),
            kg.reshape(n, L + P, hk, d).transpose(1, 2),
            vg.reshape(n, L + P, hk, d).transpose(1, 2),
            attn_mask=g.mask,
            dropout_p=dropout_p,
            is_causal=g.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        outs.append(og.transpose(1, 2).reshape(n * L, h, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    if plan.inverse_index is not None:
        out = out.index_select(0, plan.inverse_index)
    return out


class CpuFlashAttentionFunction(torch.autograd.Function):
    """``out = attention(q [T, H, D], k, v [T, H_kv, D])`` over the packed layout by the native
    CPU kernels; saves q, k, v, out and the per-row log-sum-exp ``[T, H]`` (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, plan) -> torch.Tensor:
        out, lse = torch.ops.fastrm.varlen_attention_forward(q, k, v, *plan.as_args(), scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.plan = scale, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastrm.varlen_attention_backward(
            grad_out.to(q.dtype), q, k, v, out, lse, *ctx.plan.as_args(), ctx.scale)
        return dq, dk, dv, None, None


def _cpu_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """The native CPU kernels on the packed layout (see the module docstring)."""
    reason = cpu_flash_unavailable_reason(q, dropout_p)
    if reason:
        raise RuntimeError(f"attention backend 'cpu_flash' cannot run: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # k / v may be views into torchtune's GQA-expanded copies: keep only the H_kv heads alive
    # for the backward
    k = k if k.is_contiguous() else k.contiguous()
    v = v if v.is_contiguous() else v.contiguous()
    return CpuFlashAttentionFunction.apply(q, k, v, scale, meta.cpu_flash_plan())


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with the dense ``[T, T]`` rule mask, in ``q``'s dtype."""
    if dropout_p:
        raise ValueError("the reference attention backend has no dropout; set dropout_p=0")
    h, hk = q.shape[1], k.shape[1]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~meta.dense_mask()[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, v)


def flash_layout(
    k: torch.Tensor, v: torch.Tensor, meta: VarlenMetadata
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Arguments for a kernel with separate query / key ``cu_seqlens`` (flash-attn's varlen API).

    Without prefixes the keys are the queries' tokens. With prefixes, segment ``s`` gets the
    keys ``[prefix tokens, own tokens]`` (gathered, ``T_k = T + sum_s P_s``); a causal mask
    aligned to the bottom-right corner (flash-attn >= 2.1 when ``seqlen_k > seqlen_q``) then
    lets query ``i`` of the segment see all ``P_s`` prefix keys and its own keys ``0..i``.

    Returns:
        ``(k [T_k, H_kv, D], v [T_k, H_kv, D], cu_seqlens_q [S + 1], cu_seqlens_k [S + 1],
        max_seqlen_q, max_seqlen_k)``.
    """
    cu = meta.cu_seqlens
    if not meta.has_prefix:
        return k, v, cu, cu, meta.max_seqlen, meta.max_seqlen
    kg = meta.key_gather()
    return (
        k.index_select(0, kg.key_index),
        v.index_select(0, kg.key_index),
        cu,
        kg.cu_seqlens_k,
        meta.max_seqlen,
        kg.max_seqlen_k,
    )


def _flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p, softmax_scale, causal=True)``; GQA is native (``H_kv | H``)."""
    fn = _flash_attn_varlen_func()
    if fn is None:
        raise RuntimeError(
            "attention backend 'flash_attn' was selected but flash-attn is not installed "
            "(pip install flash-attn --no-build-isolation, CUDA only); choose 'torch_varlen' "
            f"or 'sdpa_segments' instead, or unset {ENV_VAR}"
        )
    if not q.is_cuda:
        raise RuntimeError("attention backend 'flash_attn' needs CUDA tensors; use 'sdpa_segments'")
    k, v, cu_q, cu_k, max_q, max_k = flash_layout(k, v, meta)
    return fn(
        q, k, v, cu_q, cu_k, max_q, max_k,
        dropout_p=dropout_p, softmax_scale=scale, causal=True,
    )


def _torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (PyTorch's flash kernel) with causal
    ``window_size=(-1, 0)``, whose window is bottom-right aligned like flash-attn's."""
    if not _torch_varlen_available():
        raise RuntimeError(
            "attention backend 'torch_varlen' needs torch.nn.attention.varlen (PyTorch >= 2.9)"
        )
    if not q.is_cuda:
        raise RuntimeError("attention backend 'torch_varlen' needs CUDA tensors; use 'sdpa_segments'")
    if dropout_p:
        raise ValueError(
            "attention backend 'torch_varlen' has no dropout; set attn_dropout=0 or use 'flash_attn'"
        )
    from torch.nn.attention.varlen import varlen_attn

    k, v, cu_q, cu_k, max_q, max_k = flash_layout(k, v, meta)
    return varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k,
        scale=scale, window_size=(-1, 0), enable_gqa=k.shape[1] != q.shape[1],
    )


_FLEX_COMPILED: dict = {}


def _flex_attention_fn(device: torch.device) -> Callable:
    """flex_attention, compiled once per process on CUDA (flex is only fast when compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    fn = _FLEX_COMPILED.get("cuda")
    if fn is None:
        fn = torch.compiler.disable(torch.compile(flex_attention, dynamic=False), recursive=False)
        _FLEX_COMPILED["cuda"] = fn
    return fn


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMetadata,
    dropout_p: float,
    scale: Optional[float],
) -> torch.Tensor:
    """FlexAttention over the whole row with ``meta.flex_block_mask()`` (the rule as a
    ``mask_mod``); GQA native."""
    if dropout_p:
        raise ValueError("attention backend 'flex' has no dropout; set attn_dropout=0")
    if not q.is_cuda and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
    ):
        raise RuntimeError(
            "attention backend 'flex' has no backward on CPU in PyTorch; use 'sdpa_segments' "
            "(the CPU default) for training on CPU"
        )
    out = _flex_attention_fn(q.device)(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=meta.flex_block_mask(),
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out[0].transpose(0, 1)


_IMPLS = {
    "flex": _flex,
    "cpu_flash": _cpu_flash,
    "sdpa_segments": _sdpa_segments,
    "reference": _reference,
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    segment_prefix: Optional[torch.Tensor] = None,
    *,
    metadata: Optional[VarlenMetadata] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Packed causal attention within segments, plus each segment's shared prefix.

    ``out[i] = sum_j softmax_j(scale * q[i] . k[j]) v[j]`` over the keys ``j`` that token ``i``
    may see: the earlier tokens of its own segment and every token of its segment's prefix.

    Args:
        q: ``[T, H, D]`` queries.
        k: ``[T, H_kv, D]`` keys, ``H % H_kv == 0`` (GQA).
        v: ``[T, H_kv, D]`` values.
        cu_seqlens: ``[S + 1]`` int segment boundaries (ignored when ``metadata`` is given).
        segment_prefix: ``[S, 2]`` int ``[start, end)`` prefix of each segment, or ``None``.
        metadata: a prebuilt :class:`VarlenMetadata` (reuse it across layers: plans are cached).
        dropout_p: attention dropout probability (training only).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` / ``None``, ``"flash_attn"``, ``"torch_varlen"``,
            ``"flex"``, ``"cpu_flash"``, ``"sdpa_segments"`` or ``"reference"``.

    Returns:
        ``[T, H, D]`` attention output, ``q``'s dtype.
    """
    if metadata is None:
        if cu_seqlens is None:
            raise ValueError("varlen_attention needs cu_seqlens or metadata")
        metadata = VarlenMetadata.build(cu_seqlens.to(q.device), segment_prefix)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D] / [T, H_kv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    t = q.shape[0]
    if t != metadata.total_tokens or k.shape[0] != t or v.shape[0] != t:
        raise ValueError(
            f"q/k/v hold {q.shape[0]}/{k.shape[0]}/{v.shape[0]} tokens but cu_seqlens ends at "
            f"{metadata.total_tokens}"
        )
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"heads: q has {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}; need H % H_kv == 0 and "
            "k, v with the same heads"
        )
    name = select_backend(q, backend if backend is not None else metadata.backend,
                          metadata.has_prefix, dropout_p)
    return _IMPLS[name](q, k, v, metadata, dropout_p, scale)
