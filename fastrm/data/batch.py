"""The typed batch that flows from the packer to the model and the fused head + loss.

One layout serves every mode:

* **plain packed pairs**: each sequence (prompt + response, or a prompt-free response) is one
  *segment*; chosen and rejected of a pair are two segments in the same row.
* **prefix sharing** (a pair that shares a prompt): segments ``[prompt][chosen][rejected]``; the
  chosen and rejected segments also attend to the prompt segment (their *prefix*).
* **grouped responses**: ``[prompt][r1]...[rK]``, each response segment with the prompt as prefix.

Attention rule, exact for all three: a token of segment ``s`` attends causally to the earlier
tokens of ``s`` and to every token of ``[segment_prefix[s, 0], segment_prefix[s, 1])``.
Positions restart at 0 in every prompt or stand-alone sequence; a response that has a prefix
continues from the prefix's length, so RoPE sees the same positions as in the unshared layout.
Several packed rows of one step are concatenated into a single flat row (``[1, T]``):
attention never crosses segments, so row boundaries need no marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass
class PackedBatch:
    """A packed step: ``T`` real tokens, ``S`` segments, ``N`` rewards, ``P`` comparisons.

    Attributes:
        tokens: ``[1, T]`` token ids, no padding.
        position_ids: ``[1, T]`` RoPE positions (restart per prompt / sequence).
        cu_seqlens: ``[S + 1]`` int32 segment boundaries (flash-attn's ``cu_seqlens``).
        segment_prefix: ``[S, 2]`` int32 ``[start, end)`` token range that segment ``s`` also
            attends to (its shared prompt); ``start == end`` when it has none.
        reward_positions: ``[N]`` int64 index into ``T`` of each scored token (a response's
            last token).
        chosen_index: ``[P]`` int64 index into ``reward_positions`` of each preferred response.
        rejected_index: ``[P]`` int64 index into ``reward_positions`` of each dispreferred one.
        margin: ``[P]`` float32 per-comparison margins, or ``None`` when the data has none.
        group_index: ``[P]`` int64 id (within the batch) of the prompt group of each comparison,
            for per-group weighting; pairs are groups of one comparison.
        prompt_ids: ``[N]`` int64 dataset-wide prompt id of each scored response (cross-prompt
            contrast weights, grouping by prompt); ``-1`` when unknown.
        num_padding_tokens: tokens of ``tokens`` that are padding (0 when packed).
        prompt_tokens_saved: tokens not computed thanks to prefix sharing / grouping, relative
            to the plain packed layout of the same comparisons.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    segment_prefix: torch.Tensor
    reward_positions: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None
    num_padding_tokens: int = 0
    prompt_tokens_saved: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[-1])

    @property
    def num_real_tokens(self) -> int:
        return self.num_tokens - self.num_padding_tokens

    @property
    def num_comparisons(self) -> int:
        return int(self.chosen_index.shape[0])

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def has_prefix(self) -> bool:
        """True when some segment attends to a shared prefix (prefix sharing / grouping)."""
        p = self.segment_prefix
        return bool((p[:, 1] > p[:, 0]).any())

    def to(self, device: torch.device | str) -> "PackedBatch":
        """Moves every tensor to ``device`` (non-blocking where possible)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                moved[f.name] = v.to(device, non_blocking=True)
        return replace(self, **moved)

    def validate(self) -> None:
        """Checks shapes and index ranges; raises ``ValueError`` naming the field at fault."""
        t = self.num_tokens
        if self.tokens.dim() != 2 or self.tokens.shape[0] != 1:
            raise ValueError(f"tokens must be [1, T], got {tuple(self.tokens.shape)}")
        if self.position_ids.shape != self.tokens.shape:
            raise ValueError(
                f"position_ids {tuple(self.position_ids.shape)} must match tokens "
                f"{tuple(self.tokens.shape)}"
            )
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != t:
            raise ValueError(f"cu_seqlens must run from 0 to T={t}, got {cu.tolist()[:8]}...")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError("cu_seqlens must be strictly increasing (no empty segments)")
        if self.segment_prefix.shape != (self.num_segments, 2):
            raise ValueError(
                f"segment_prefix must be [S, 2] = [{self.num_segments}, 2], got "
                f"{tuple(self.segment_prefix.shape)}"
            )
        n = int(self.reward_positions.shape[0])
        if n and (int(self.reward_positions.min()) < 0 or int(self.reward_positions.max()) >= t):
            raise ValueError(f"reward_positions must lie in [0, {t})")
        for name in ("chosen_index", "rejected_index"):
            idx = getattr(self, name)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{name} must index reward_positions, i.e. lie in [0, {n})")
        p = self.num_comparisons
        if self.rejected_index.shape[0] != p:
            raise ValueError("chosen_index and rejected_index must have the same length")
        for name in ("margin", "group_index"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != p:
                raise ValueError(f"{name} must have one entry per comparison ({p})")
        if self.margin is not None and not bool(torch.isfinite(self.margin).all()):
            bad = int((~torch.isfinite(self.margin)).nonzero()[0])
            raise ValueError(f"margin of comparison {bad} is not finite")


def plain_segment_layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cu_seqlens [S+1]``, ``segment_prefix [S, 2]`` (none) and ``position_ids [T]`` for
    stand-alone sequences of the given lengths laid end to end."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    prefix = torch.zeros(len(lengths), 2, dtype=torch.int32)
    pos = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]) if lengths else (
        torch.zeros(0, dtype=torch.int64))
    return cu, prefix, pos
