"""Variable-length (packed) causal attention with optional shared prefixes.

Public entry point: :func:`varlen_attention`. Shapes follow flash-attn's varlen API:
``q [T, H, D]``, ``k, v [T, H_kv, D]`` (``H % H_kv == 0``: grouped-query attention), output
``[T, H, D]``. The attention rule (exact in every backend) is documented in
:mod:`fastrm.attention.metadata`.

Backends:

``"flash_attn"``
    ``flash_attn.flash_attn_varlen_func`` (CUDA sm80+, fp16/bf16, head dim <= 256). Prefixes:
    keys gathered as ``[prefix keys, own keys]`` per segment with separate ``cu_seqlens_k``;
    flash-attn's causal mask is bottom-right aligned when ``seqlen_k > seqlen_q``, which is
    the rule exactly. Its backward runs with ``deterministic=True`` under
    ``torch.use_deterministic_algorithms(True)``.
``"torch_varlen"``
    ``torch.nn.attention.varlen.varlen_attn`` (CUDA sm80+, fp16/bf16, head dim a multiple of 8
    up to 256, no dropout; PyTorch's bundled flash kernel), same key gather for prefixes,
    causal via ``window_size=(-1, 0)`` (also bottom-right aligned). PyTorch runs its backward
    deterministically by itself under ``torch.use_deterministic_algorithms(True)``.
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
environment variable ``FASTRM_ATTENTION_BACKEND``, else automatic. An explicit choice that
cannot run these tensors (:func:`backend_unavailable_reason`: wrong device or dtype, dropout
it lacks, a missing or broken install) raises ``ValueError`` naming the backend, the reason
and the fix. The automatic choice takes the first that can run of: ``flash_attn``,
``torch_varlen`` (CUDA), ``cpu_flash`` (CPU), ``sdpa_segments``; when CUDA tensors end up on
``sdpa_segments`` (automatically, or chosen explicitly, as is ``reference``) it logs a warning
once per reason, saying why and how to get the fast path (bf16 with flash-attn or torch_varlen). A flash-attn that is installed but fails to
import (a CUDA build that does not match, raising ``OSError`` / ``RuntimeError`` /
``ImportError``) is logged once with the error and treated as absent.

Shared prefix keys are gathered by :func:`fastrm.attention.gather.gather_rows`, whose backward
sums a prompt token's repeats in fp32, in a fixed order under deterministic algorithms.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastrm.attention.gather import gather_rows
from fastrm.attention.metadata import VarlenMetadata

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch_varlen", "flex", "cpu_flash", "sdpa_segments", "reference")
ENV_VAR = "FASTRM_ATTENTION_BACKEND"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation; CUDA only"
_LOGGED: set[str] = set()
#: what the warnings about a slow backend on CUDA tell the user to do
SLOW_CUDA_BACKEND_FIX = (
    "For the fast path train in bf16 (recipe `dtype: auto` or `bf16`) with flash-attn "
    f"({_FLASH_ATTN_INSTALL}) or torch_varlen (PyTorch >= 2.9, sm80+) and leave "
    "attention_backend on auto")


def _log_once(message: str) -> None:
    """Logs ``message`` as a warning the first time it comes up in this process."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


@functools.lru_cache(maxsize=1)
def _flash_attn_import() -> tuple[Optional[Callable], str]:
    """``(flash_attn_varlen_func, "")`` or ``(None, why not)``. Not installed is silent; an
    install that fails to import is logged once with the error."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ModuleNotFoundError as err:
        if err.name == "flash_attn":
            return None, f"flash-attn is not installed ({_FLASH_ATTN_INSTALL})"
        reason = f"flash-attn is installed but does not import ({type(err).__name__}: {err})"
    except Exception as err:  # a broken CUDA build: OSError / RuntimeError / undefined symbol
        reason = f"flash-attn is installed but does not import ({type(err).__name__}: {err})"
    else:
        return flash_attn_varlen_func, ""
    _log_once(f"{reason}; fastrm treats it as absent (reinstall it to match this torch and CUDA)")
    return None, reason


def _flash_attn_varlen_func() -> Optional[Callable]:
    return _flash_attn_import()[0]


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports (it says nothing about the device)."""
    return _flash_attn_varlen_func() is not None


def flash_attn_unavailable_reason() -> str:
    """Why ``flash_attn`` does not import (empty string when it does)."""
    return _flash_attn_import()[1]


@functools.lru_cache(maxsize=1)
def _flash_attn_takes_deterministic() -> bool:
    """flash-attn >= 2.4 has ``deterministic`` (for its backward); older ones do not."""
    fn = _flash_attn_varlen_func()
    try:
        return fn is not None and "deterministic" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C function without a signature
        return False


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


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (asked once per device: every layer of every
    step goes through the backend choice)."""
    return torch.cuda.get_device_capability(index)


def _cuda_flash_reason(name: str, q: torch.Tensor) -> str:
    """Device, dtype and GPU generation checks shared by the two flash kernels."""
    if not q.is_cuda:
        return f"{name} runs on CUDA tensors (q is on {q.device}); use sdpa_segments"
    if q.dtype not in _FLASH_DTYPES:
        return (f"{name} takes fp16/bf16 tensors (q is {q.dtype}); train in bf16 (recipe "
                "`dtype: bf16` or `auto`) or choose sdpa_segments / flex for fp32")
    major, minor = _capability(q.device.index)
    if major < 8:
        return f"{name} needs an Ampere or newer GPU (sm80+), this one is sm{major}{minor}"
    return ""


def backend_unavailable_reason(name: str, q: torch.Tensor, dropout_p: float = 0.0,
                               needs_grad: bool = False) -> str:
    """Why backend ``name`` cannot run queries ``q`` (empty string when it can).

    ``needs_grad``: a backward will follow (``flex`` has none on CPU)."""
    d = q.shape[-1]
    if name == "flash_attn":
        reason = flash_attn_unavailable_reason() or _cuda_flash_reason(name, q)
        if not reason and d > 256:
            reason = f"flash_attn supports head dims up to 256, got {d}"
        return reason
    if name == "torch_varlen":
        if not _torch_varlen_available():
            return "torch_varlen needs torch.nn.attention.varlen (PyTorch >= 2.9)"
        reason = _cuda_flash_reason(name, q)
        if not reason and (d % 8 or d > 256):
            reason = f"torch_varlen needs a head dim that is a multiple of 8 up to 256, got {d}"
        if not reason and dropout_p:
            reason = ("torch_varlen has no attention dropout (torch.nn.attention.varlen runs "
                      "its kernel with dropout 0); set attn_dropout=0 or choose flash_attn / "
                      "sdpa_segments")
        return reason
    if name == "cpu_flash":
        return cpu_flash_unavailable_reason(q, dropout_p)
    if name == "flex":
        if dropout_p:
            return "flex has no attention dropout; set attn_dropout=0 or choose sdpa_segments"
        if not q.is_cuda and needs_grad:
            return ("flex has no backward on CPU in PyTorch; use sdpa_segments (the CPU default) "
                    "for training on CPU")
        return ""
    if name == "reference":
        return "reference has no attention dropout; set dropout_p=0" if dropout_p else ""
    if name == "sdpa_segments":
        return ""
    raise ValueError(f"attention backend {name!r} is not known; choose one of {', '.join(BACKENDS)}")


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
    dropout_p: float = 0.0, needs_grad: Optional[bool] = None,
) -> str:
    """Resolves the backend for ``q``'s device and dtype (see the module docstring).

    Args:
        q: ``[T, H, D]`` queries (device, dtype and head dim decide).
        backend: explicit choice, else ``$FASTRM_ATTENTION_BACKEND``, else automatic.
        has_prefix: accepted for symmetry with the dispatch; every backend handles prefixes.
        dropout_p: attention dropout of the call (some backends have none).
        needs_grad: a backward follows; default ``torch.is_grad_enabled() and q.requires_grad``.

    Raises:
        ValueError: an unknown name, or an explicit choice that cannot run ``q`` (the message
            names the backend, why, and what to do).
    """
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and q.requires_grad
    name, source = check_backend(backend), "backend"
    if name is None:
        name, source = check_backend(os.environ.get(ENV_VAR)), f"${ENV_VAR}"
    if name is not None:
        reason = backend_unavailable_reason(name, q, dropout_p, needs_grad)
        if reason:
            raise ValueError(f"attention backend {name!r} (from {source}) cannot run here: {reason}")
        if q.is_cuda and name in ("sdpa_segments", "reference"):
            chosen_by = "attention_backend" if source == "backend" else source
            _log_once(f"packed attention on CUDA runs the slow {name} backend (chosen by "
                      f"{chosen_by}). " + SLOW_CUDA_BACKEND_FIX)
        return name
    if q.is_cuda:
        skipped = []
        for candidate in ("flash_attn", "torch_varlen"):
            reason = backend_unavailable_reason(candidate, q, dropout_p, needs_grad)
            if not reason:
                return candidate
            skipped.append(reason)
        _log_once("packed attention on CUDA falls back to sdpa_segments (one SDPA call per "
                  "distinct segment length, slower): " + "; ".join(skipped) + ". "
                  + SLOW_CUDA_BACKEND_FIX)
        return "sdpa_segments"
    if q.dtype == torch.bfloat16 and not cpu_flash_unavailable_reason(q, dropout_p):
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
    # (query_index is a permutation: its plain backward adds nothing twice; key_index repeats
    # prefix keys: gather_rows sums their gradients in fp32)
    if plan.key_rows is not None:
        q_all = q if plan.query_index is None else q.index_select(0, plan.query_index)
        k_all = gather_rows(k, plan.key_rows)
        v_all = gather_rows(v, plan.key_rows)
    elif plan.query_index is not None:
        q_all = q.index_select(0, plan.query_index)
        k_all = k.index_select(0, plan.query_index)
        v_all = v.index_select(0, plan.query_index)
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
        gather_rows(k, kg.rows),
        gather_rows(v, kg.rows),
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
    max_seqlen_k, dropout_p, softmax_scale, causal=True, deterministic=...)``; GQA is native
    (``H_kv | H``). ``deterministic`` (its backward) follows
    ``torch.are_deterministic_algorithms_enabled()``."""
    fn = _flash_attn_varlen_func()
    k, v, cu_q, cu_k, max_q, max_k = flash_layout(k, v, meta)
    extra = {}
    if _flash_attn_takes_deterministic():
        extra["deterministic"] = torch.are_deterministic_algorithms_enabled()
    elif torch.are_deterministic_algorithms_enabled():
        _log_once("this flash-attn has no `deterministic` argument (flash-attn < 2.4): its "
                  "backward is not deterministic; upgrade it or choose torch_varlen")
    return fn(
        q, k, v, cu_q, cu_k, max_q, max_k,
        dropout_p=dropout_p, softmax_scale=scale, causal=True, **extra,
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
    ``window_size=(-1, 0)``, whose window is bottom-right aligned like flash-attn's. No
    dropout (:func:`select_backend` refuses ``dropout_p > 0``); PyTorch makes its backward
    deterministic itself under ``torch.use_deterministic_algorithms(True)``."""
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
    ``mask_mod``); GQA native. No dropout, no backward on CPU (:func:`select_backend`
    refuses both)."""
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

    Raises:
        ValueError: malformed shapes or layout, or an explicit backend that cannot run these
            tensors (see :func:`select_backend`).
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
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = select_backend(q, backend if backend is not None else metadata.backend,
                          metadata.has_prefix, dropout_p, needs_grad)
    return _IMPLS[name](q, k, v, metadata, dropout_p, scale)
