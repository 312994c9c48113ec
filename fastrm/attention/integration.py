"""Plugging packed varlen attention into torchtune decoders without touching torchtune's source.

torchtune's :class:`~torchtune.modules.MultiHeadAttention` (0.6.x) projects, applies RoPE with
``input_pos``, expands k/v to all query heads (GQA) and then calls
``self._attention_call(q, k, v, mask=mask, dropout_p=..., is_causal=...)`` with
``q, k, v`` of shape ``[b, n_h, s, h_d]``; ``TransformerDecoder`` / ``TransformerSelfAttentionLayer``
hand ``mask`` down to every layer untouched. fastrm therefore:

1. replaces each attention module's ``_attention_call`` (an instance attribute set in
   ``MultiHeadAttention.__init__``) with :class:`VarlenAttentionCall`,
2. gives each self-attention module a :class:`PackedSelfAttention` ``forward``: for packed
   inputs it runs the same projections, RoPE and q / k norms straight in the flat ``[T, H, D]``
   layout the varlen kernels take, without torchtune's transposes and without expanding k / v
   to every query head (GQA kernels read the ``H_kv`` heads), and hands anything else to
   torchtune's own ``forward``; and
3. passes a :class:`~fastrm.attention.metadata.VarlenMetadata` as ``mask`` and the packed
   ``position_ids`` as ``input_pos``.

:class:`VarlenAttentionCall` routes a ``VarlenMetadata`` mask to
:func:`fastrm.attention.varlen_attention` and anything else (``None``, a boolean tensor, a
flex ``BlockMask``) to torchtune's original call, so the same model still runs padded batches,
generation with KV caches, and torchtune's own packed datasets.

Gemma 2's ``Gemma2Attention`` computes attention inline (logit soft-capping, sliding windows)
with no ``_attention_call`` hook; it is rejected with a clear error.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from fastrm.attention.metadata import VarlenMetadata
from fastrm.attention.varlen import check_backend, varlen_attention


class VarlenAttentionCall:
    """Drop-in for ``MultiHeadAttention._attention_call`` that understands packed metadata.

    Args:
        fallback: torchtune's original ``_attention_call`` (SDPA / flex), used for any mask that
            is not a :class:`VarlenMetadata`.
        num_heads: query heads of the attention module.
        num_kv_heads: key/value heads (``< num_heads`` for GQA).
    """

    def __init__(self, fallback: Callable, num_heads: int, num_kv_heads: int) -> None:
        self.fallback = fallback
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask=None,
        dropout_p: float = 0.0,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """``q [1, H, T, D]``, ``k, v [1, H or H_kv, T, D]`` -> ``[1, H, T, D]``."""
        if not isinstance(mask, VarlenMetadata):
            return self.fallback(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        if q.shape[0] != 1:
            raise ValueError(
                f"packed attention takes one flat row [1, T]; got a batch of {q.shape[0]} rows "
                "(concatenate packed rows: attention never crosses segments)"
            )
        return _packed_attention(q, k, v, mask, dropout_p, self.num_heads // self.num_kv_heads,
                                 self.num_heads)


# Under torch.compile (torchtune's compile_model compiles each layer) the packed attention runs
# eagerly: its per-step plan (segment groups, Python ints) would otherwise force a recompile for
# every new batch layout. The projections, RoPE and MLP around it still compile.
@torch.compiler.disable
def _packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: VarlenMetadata,
    dropout_p: float,
    group: int,
    num_heads: int,
) -> torch.Tensor:
    """``q [1, H, T, D]``, ``k, v [1, H or H_kv, T, D]`` -> ``[1, H, T, D]`` via
    :func:`varlen_attention` in flash layout ``[T, H, D]``."""
    if group > 1 and k.shape[1] == num_heads:
        # torchtune expanded k/v to every query head (heads ordered kv0 x group, kv1 x group,
        # ...); one head per group is the original: kernels with native GQA read H_kv heads.
        k = k[:, ::group]
        v = v[:, ::group]
    out = varlen_attention(
        q[0].transpose(0, 1),
        k[0].transpose(0, 1),
        v[0].transpose(0, 1),
        metadata=mask,
        dropout_p=dropout_p,
    )
    return out.transpose(0, 1).unsqueeze(0)


class PackedSelfAttention:
    """``forward`` of a torchtune ``MultiHeadAttention`` that computes packed batches in the
    flat layout (see the module docstring) and defers everything else (padded batches,
    generation with a KV cache, cross-attention) to ``MultiHeadAttention.forward``.

    ``x [1, T, D]`` with ``mask`` a :class:`VarlenMetadata` and ``input_pos [1, T]`` ->
    ``[1, T, D]``. Same parameters, same math, same order of ops as torchtune's forward
    (projections, RoPE, then q / k norms, attention, output projection).
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, mask=None,
                 input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.attn
        if (not isinstance(mask, VarlenMetadata) or y is not x or x.shape[0] != 1
                or (m.kv_cache is not None and m.cache_enabled)):
            return type(m).forward(m, x, y, mask=mask, input_pos=input_pos)
        t = x.shape[1]
        q = m.q_proj(x).view(1, t, m.num_heads, m.head_dim)
        k = m.k_proj(x).view(1, t, m.num_kv_heads, m.head_dim)
        v = m.v_proj(x).view(t, m.num_kv_heads, m.head_dim)
        if m.pos_embeddings is not None:
            q = m.pos_embeddings(q, input_pos=input_pos)
            k = m.pos_embeddings(k, input_pos=input_pos)
        q, k = q[0], k[0]
        if m.q_norm is not None:  # per (token, head) over head_dim: layout-independent
            q = m.q_norm(q)
            k = m.k_norm(k)
        out = _packed_flat_attention(q, k, v, mask, m.attn_dropout if m.training else 0.0)
        return m.output_proj(out.reshape(1, t, m.num_heads * m.head_dim))


@torch.compiler.disable
def _packed_flat_attention(q, k, v, mask: VarlenMetadata, dropout_p: float) -> torch.Tensor:
    return varlen_attention(q, k, v, metadata=mask, dropout_p=dropout_p)


def enable_varlen_attention(module: nn.Module) -> int:
    """Installs :class:`VarlenAttentionCall` and the :class:`PackedSelfAttention` forward in
    every torchtune attention module under ``module``.

    Idempotent. Returns the number of attention modules handled.

    Raises:
        NotImplementedError: for Gemma 2 attention (no ``_attention_call`` hook).
        ValueError: when ``module`` holds no torchtune attention module.
    """
    from torchtune.modules import MultiHeadAttention

    try:
        from torchtune.models.gemma2._attention import Gemma2Attention
    except ImportError:  # pragma: no cover - other torchtune versions
        Gemma2Attention = ()  # type: ignore[assignment]

    count = 0
    for name, m in module.named_modules():
        if Gemma2Attention and isinstance(m, Gemma2Attention):
            raise NotImplementedError(
                f"{name}: Gemma 2 attention (soft-capping, sliding window) computes attention "
                "inline without torchtune's _attention_call hook; packed varlen attention "
                "supports MultiHeadAttention models (llama2/3/3.1/3.2, qwen2/2.5, mistral, gemma, "
                "phi3). Train Gemma 2 with padded batches (RewardModel.forward_padded)."
            )
        if isinstance(m, MultiHeadAttention):
            call = m._attention_call
            if not isinstance(call, VarlenAttentionCall):
                m._attention_call = VarlenAttentionCall(call, m.num_heads, m.num_kv_heads)
            if not isinstance(m.__dict__.get("forward"), PackedSelfAttention):
                m.forward = PackedSelfAttention(m)
            count += 1
    if count == 0:
        raise ValueError(
            f"{type(module).__name__} holds no torchtune MultiHeadAttention module: cannot enable "
            "packed varlen attention"
        )
    return count


def packed_metadata(
    cu_seqlens: torch.Tensor,
    segment_prefix: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    device: Optional[torch.device] = None,
) -> VarlenMetadata:
    """Builds the ``mask`` object a patched decoder expects, on ``device``."""
    if device is not None:
        cu_seqlens = cu_seqlens.to(device)
        if segment_prefix is not None:
            segment_prefix = segment_prefix.to(device)
    return VarlenMetadata.build(cu_seqlens, segment_prefix, backend=check_backend(backend))
