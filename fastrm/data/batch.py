"""The typed batches that flow from the collators to the model and the fused head + loss, and
the collators that build them from :class:`~fastrm.data.group.PreferenceGroup` s.

One packed layout serves every mode:

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

:func:`collate_packed` lays groups out that way (a group shares its prompt when prefix sharing is
on and it has a prompt and at least two responses); :func:`collate_padded` is the unpacked
baseline (every full sequence padded right to the longest: what a TRL / torchtune reward recipe
without packing does). Both number the scored responses group after group, responses in order,
and take the comparisons, margins, labels, categories and prompt embeddings from one shared pass
(:func:`_scored_fields`), so the two layouts describe the same comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch

from fastrm.data.group import PreferenceGroup

__all__ = [
    "ScoredBatch", "PackedBatch", "PaddedBatch", "collate_packed", "collate_padded",
    "group_tokens", "plain_segment_layout", "shares_prefix",
]


@dataclass(kw_only=True)
class ScoredBatch:
    """What every batch layout carries about its ``N`` scored responses and ``P`` comparisons.

    Attributes:
        reward_positions: ``[N]`` int64 where each scored token is (layout specific).
        chosen_index: ``[P]`` int64 index into the ``N`` rewards of each preferred response.
        rejected_index: ``[P]`` int64 index into the ``N`` rewards of each dispreferred one.
        margin: ``[P]`` float32 per-comparison margins, or ``None`` when the data has none.
        group_index: ``[P]`` int64 id (within the batch) of the prompt group of each comparison,
            for per-group weighting; pairs are groups of one comparison.
        prompt_ids: ``[N]`` int64 dataset-wide prompt id of each scored response (cross-prompt
            contrast, grouping by prompt); ``-1`` when unknown.
        labels: ``[N]`` int64 unpaired-data labels (``+1`` desirable, ``-1`` undesirable, ``0``
            for paired responses), or ``None`` when no group has labels.
        categories: ``P`` category names (RewardBench subset, synthetic category; ``None`` where
            a group has none) for per-category evaluation, or ``None`` when no group has one.
        prompt_embeddings: ``[N, E]`` prompt embedding of each scored response (cross-prompt
            training), or ``None``.
        num_padding_tokens: tokens of ``tokens`` that are padding (0 when packed).
    """

    reward_positions: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    categories: Optional[list[Optional[str]]] = None
    prompt_embeddings: Optional[torch.Tensor] = None
    num_padding_tokens: int = 0

    @property
    def num_comparisons(self) -> int:
        return int(self.chosen_index.shape[0])

    @property
    def num_responses(self) -> int:
        return int(self.reward_positions.shape[0])

    def to(self, device: torch.device | str):
        """Moves every tensor to ``device``; non-blocking, so a copy from pinned memory
        (:meth:`pin_memory`) overlaps with the GPU's work."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        """The batch with every tensor in page-locked memory (what a DataLoader with
        ``pin_memory=True`` calls on each batch)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def _map_tensors(self, fn):
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                moved[f.name] = fn(v)
        return replace(self, **moved)


@dataclass
class PackedBatch(ScoredBatch):
    """A packed step: ``T`` real tokens, ``S`` segments, ``N`` rewards, ``P`` comparisons (the
    comparison fields are those of :class:`ScoredBatch`).

    Attributes:
        tokens: ``[1, T]`` token ids, no padding.
        position_ids: ``[1, T]`` RoPE positions (restart per prompt / sequence).
        cu_seqlens: ``[S + 1]`` int32 segment boundaries (flash-attn's ``cu_seqlens``).
        segment_prefix: ``[S, 2]`` int32 ``[start, end)`` token range that segment ``s`` also
            attends to (its shared prompt); ``start == end`` when it has none.
        reward_positions: ``[N]`` int64 index into ``T`` of each scored token (a response's
            last token).
        prompt_tokens_saved: tokens not computed thanks to prefix sharing / grouping, relative
            to the plain packed layout of the same comparisons.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    segment_prefix: torch.Tensor
    prompt_tokens_saved: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[-1])

    @property
    def num_real_tokens(self) -> int:
        return self.num_tokens - self.num_padding_tokens

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def has_prefix(self) -> bool:
        """True when some segment attends to a shared prefix (prefix sharing / grouping)."""
        p = self.segment_prefix
        return bool((p[:, 1] > p[:, 0]).any())

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
        n = self.num_responses
        if n and (int(self.reward_positions.min()) < 0 or int(self.reward_positions.max()) >= t):
            raise ValueError(f"reward_positions must lie in [0, {t})")
        for name in ("chosen_index", "rejected_index"):
            idx = getattr(self, name)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{name} must index reward_positions, i.e. lie in [0, {n})")
        p = self.num_comparisons
        if self.rejected_index.shape[0] != p:
            raise ValueError("chosen_index and rejected_index must have the same length")
        for name in ("margin", "group_index", "categories"):
            v = getattr(self, name)
            if v is not None and len(v) != p:
                raise ValueError(f"{name} must have one entry per comparison ({p})")
        for name in ("prompt_ids", "labels", "prompt_embeddings"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != n:
                raise ValueError(f"{name} must have one entry per scored response ({n})")
        if self.margin is not None and not bool(torch.isfinite(self.margin).all()):
            bad = int((~torch.isfinite(self.margin)).nonzero()[0])
            raise ValueError(f"margin of comparison {bad} is not finite")


@dataclass
class PaddedBatch(ScoredBatch):
    """The unpacked baseline: ``N`` full sequences padded right to the longest, ``L`` (the
    comparison fields are those of :class:`ScoredBatch`).

    Attributes:
        tokens: ``[N, L]`` token ids (``pad_id`` after each sequence).
        attention_mask: ``[N, L]`` bool, True on real tokens.
        lengths: ``[N]`` int64 real lengths.
        reward_positions: ``[N]`` int64 ``lengths - 1`` (column of each sequence's reward token).
        num_padding_tokens: ``N * L - sum(lengths)``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        n, L = self.tokens.shape
        return torch.arange(L).expand(n, L)


# --------------------------------------------------------------------------------------------
# collators
# --------------------------------------------------------------------------------------------

def shares_prefix(g: PreferenceGroup, prefix_sharing: bool) -> bool:
    """Whether :func:`collate_packed` lays ``g`` out as ``[prompt][r_1]...[r_K]``: prefix
    sharing is on, ``g`` has a prompt and at least two responses (a single response gains
    nothing from a separate prompt segment)."""
    return prefix_sharing and len(g.prompt_tokens) > 0 and len(g.responses) >= 2


def group_tokens(g: PreferenceGroup, prefix_sharing: bool) -> int:
    """Tokens the group takes in a row under the layout :func:`collate_packed` uses."""
    return g.num_tokens(shares_prefix(g, prefix_sharing))


def _scored_fields(groups: Sequence[PreferenceGroup],
                   prompt_embeddings: Optional[torch.Tensor]) -> dict[str, Any]:
    """The :class:`ScoredBatch` fields (all but ``reward_positions``) of ``groups`` scored
    group after group, responses in order: the one pass both collators share.

    Raises ``ValueError`` naming the group and its source row for a group without responses,
    an empty response, or margins on some comparisons but not others.
    """
    chosen: list[int] = []
    rejected: list[int] = []
    margins: list[Optional[float]] = []
    group_idx: list[int] = []
    prompt_ids: list[int] = []
    labels: list[int] = []
    base = 0
    for gi, g in enumerate(groups):
        if not g.responses:
            raise ValueError(f"group {gi} (row {g.source_index!r}) has no responses")
        if any(not r for r in g.responses):
            raise ValueError(f"group {gi} (row {g.source_index!r}) has an empty response")
        for i, j, m in g.comparisons:
            chosen.append(base + i)
            rejected.append(base + j)
            margins.append(m)
            group_idx.append(gi)
        k = len(g.responses)
        prompt_ids.extend([g.prompt_id] * k)
        labels.extend([0] * k if g.labels is None else [int(x) for x in g.labels])
        base += k
    has_m = [m is not None for m in margins]
    if any(has_m) and not all(has_m):
        first = has_m.index(False) if has_m[0] else has_m.index(True)
        g = groups[group_idx[first]]
        raise ValueError(
            f"margin is set for some comparisons but not others (comparison {first} of group "
            f"{group_idx[first]}, row {g.source_index!r}); give every pair a margin or none "
            "(e.g. column_map the margin column for all sources, or fill missing margins with 0.0)")
    emb = None
    if prompt_embeddings is not None:
        if prompt_embeddings.dim() != 2 or prompt_embeddings.shape[0] != len(groups):
            raise ValueError(f"prompt_embeddings must be [G, E] with one row per group "
                             f"(G={len(groups)}), got {tuple(prompt_embeddings.shape)}")
        counts = torch.tensor([len(g.responses) for g in groups])
        emb = prompt_embeddings.repeat_interleave(counts, 0)
    return dict(
        chosen_index=torch.tensor(chosen, dtype=torch.int64),
        rejected_index=torch.tensor(rejected, dtype=torch.int64),
        margin=torch.tensor(margins, dtype=torch.float32) if margins and all(has_m) else None,
        group_index=torch.tensor(group_idx, dtype=torch.int64),
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        labels=(torch.tensor(labels, dtype=torch.int64)
                if any(g.labels is not None for g in groups) else None),
        categories=([groups[gi].category or None for gi in group_idx]
                    if any(g.category for g in groups) else None),
        prompt_embeddings=emb,
    )


def collate_packed(groups: Sequence[PreferenceGroup], prefix_sharing: bool = True,
                   prompt_embeddings: Optional[torch.Tensor] = None) -> PackedBatch:
    """Lays ``groups`` end to end in one flat ``[1, T]`` row (see the module docstring).

    ``margin`` is ``None`` when no comparison has one; a mix of margins and ``None`` is a
    ValueError. ``group_index [P]`` numbers the groups of this batch; ``prompt_ids [N]`` carries
    each response's dataset prompt id; ``labels`` and ``categories`` are set when some group
    has them. ``prompt_embeddings`` (``[G, E]``, one row per group) gives every scored response
    its group's row in ``batch.prompt_embeddings`` (cross-prompt training).
    """
    scored = _scored_fields(groups, prompt_embeddings)
    tokens: list[int] = []
    positions: list[int] = []
    cu = [0]
    prefix: list[tuple[int, int]] = []
    reward_pos: list[int] = []
    saved = 0
    for g in groups:
        p = g.prompt_tokens
        if shares_prefix(g, prefix_sharing):
            start = len(tokens)
            tokens.extend(p)
            positions.extend(range(len(p)))
            cu.append(len(tokens))
            prefix.append((0, 0))
            for r in g.responses:
                tokens.extend(r)
                positions.extend(range(len(p), len(p) + len(r)))
                cu.append(len(tokens))
                prefix.append((start, start + len(p)))
                reward_pos.append(len(tokens) - 1)
            saved += (len(g.responses) - 1) * len(p)
        else:
            for r in g.responses:
                tokens.extend(p)
                tokens.extend(r)
                positions.extend(range(len(p) + len(r)))
                cu.append(len(tokens))
                prefix.append((0, 0))
                reward_pos.append(len(tokens) - 1)
    return PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64).view(1, -1),
        position_ids=torch.tensor(positions, dtype=torch.int64).view(1, -1),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        segment_prefix=torch.tensor(prefix, dtype=torch.int32).view(-1, 2),
        reward_positions=torch.tensor(reward_pos, dtype=torch.int64),
        num_padding_tokens=0,
        prompt_tokens_saved=saved,
        **scored,
    )


def collate_padded(groups: Sequence[PreferenceGroup], pad_id: int = 0,
                   prompt_embeddings: Optional[torch.Tensor] = None) -> PaddedBatch:
    """Pads every full sequence (``prompt + response``) of ``groups`` to the longest.

    Sequences are laid group by group, responses in order; for ``B`` pairs that is
    ``[c_1, r_1, c_2, r_2, ...]`` with ``chosen_index = 0, 2, ...``. The comparison fields are
    those :func:`collate_packed` gives the same groups."""
    if not groups:
        raise ValueError("collate_padded got no sequences")
    scored = _scored_fields(groups, prompt_embeddings)
    seqs = [g.sequence(k) for g in groups for k in range(len(g.responses))]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    L = int(lengths.max())
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.int64)
    for k, s in enumerate(seqs):
        tokens[k, :len(s)] = torch.tensor(s, dtype=torch.int64)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return PaddedBatch(
        tokens=tokens, attention_mask=mask, lengths=lengths, reward_positions=lengths - 1,
        num_padding_tokens=int(len(seqs) * L - lengths.sum()), **scored,
    )


def plain_segment_layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cu_seqlens [S+1]``, ``segment_prefix [S, 2]`` (none) and ``position_ids [T]`` for
    stand-alone sequences of the given lengths laid end to end."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    prefix = torch.zeros(len(lengths), 2, dtype=torch.int32)
    pos = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]) if lengths else (
        torch.zeros(0, dtype=torch.int64))
    return cu, prefix, pos
