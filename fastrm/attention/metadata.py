"""Segment metadata for packed variable-length attention, built once per step.

A packed row ``[1, T]`` holds ``S`` segments; segment ``s`` owns tokens
``[cu_seqlens[s], cu_seqlens[s + 1])`` and may also attend to a shared prefix
``[segment_prefix[s, 0], segment_prefix[s, 1])`` (a prompt laid out once for several responses).
The attention rule every backend implements exactly:

    token i of segment s attends to token j  iff
        (j in segment s and j <= i)  or  (prefix_start[s] <= j < prefix_end[s])

:class:`VarlenMetadata` holds the boundaries plus plans derived from them (the per-segment
grouping of the exact CPU path, the key gather of the flash backends). The plans are computed
lazily on first use and cached on the object, so the host-device synchronisation and index
arithmetic happen once per step, not once per layer. The object is what fastrm passes as
``mask`` through a torchtune ``TransformerDecoder`` (see :mod:`fastrm.attention.integration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastrm.attention.gather import RowGather


@dataclass
class SegmentGroup:
    """Segments of equal query length ``L`` and prefix length ``P``, attended in one SDPA call.

    Attributes:
        num_segments: ``G``, segments in the group.
        query_len: ``L``.
        prefix_len: ``P``.
        query_index: ``[G * L]`` int64 token indices of the group's queries (segment-major).
        key_index: ``[G * (P + L)]`` int64 token indices of the keys (per segment: prefix keys,
            then own keys), or ``None`` when ``P == 0`` (keys are the queries' own tokens).
        mask: ``[L, P + L]`` bool bottom-right causal mask (``True`` = attend), or ``None`` when
            ``P == 0`` (plain causal, SDPA's ``is_causal``).
    """

    num_segments: int
    query_len: int
    prefix_len: int
    query_index: torch.Tensor
    key_index: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


@dataclass
class SegmentPlan:
    """Grouping of all segments by ``(L, P)`` plus the gathers that feed it.

    The per-segment path gathers queries and keys for *all* groups with one ``index_select``
    each and splits the result per group (``torch.split``): the backward of one gather is one
    scatter into ``[T, H, D]``, whereas a gather per group would zero-fill and accumulate a full
    ``[T, H, D]`` gradient per group (measured: half the attention time with 16 groups).

    Attributes:
        groups: the groups, in gather order.
        query_index: ``[T]`` token order of the groups' queries concatenated, or ``None`` when
            that is already token order.
        key_index: ``[T + sum_s P_s]`` token order of the groups' keys concatenated, or ``None``
            when the keys are the queries (no prefixes).
        query_sizes: ``G * L`` per group (split sizes of the gathered queries).
        key_sizes: ``G * (P + L)`` per group.
        inverse_index: ``[T]`` position of token ``t`` in the concatenation of the groups'
            outputs; ``None`` when that concatenation is already in token order.
        key_rows: the key gather as a :class:`~fastrm.attention.gather.RowGather` (prefix keys
            repeat: its backward accumulates in fp32), ``None`` with ``key_index``.
    """

    groups: list[SegmentGroup]
    query_index: Optional[torch.Tensor]
    key_index: Optional[torch.Tensor]
    query_sizes: list[int]
    key_sizes: list[int]
    inverse_index: Optional[torch.Tensor]
    key_rows: Optional[RowGather] = None


@dataclass
class KeyGather:
    """Key layout for kernels that take separate query / key ``cu_seqlens`` (flash-attn).

    Segment ``s`` gets the keys ``[prefix tokens, own tokens]``; with ``causal=True`` flash-attn
    aligns the causal mask to the bottom-right corner when ``seqlen_k > seqlen_q``, which is
    exactly "every prefix key plus the own earlier tokens".

    A prefix token is gathered once per segment that uses it; :attr:`rows` gathers with a
    backward that accumulates those repeats in fp32, in a fixed order under
    ``torch.use_deterministic_algorithms(True)`` (:mod:`fastrm.attention.gather`).

    Attributes:
        key_index: ``[T_k]`` int64 token index of each gathered key.
        cu_seqlens_k: ``[S + 1]`` int32 key boundaries.
        max_seqlen_k: longest key sequence.
        rows: ``key_index`` as a :class:`~fastrm.attention.gather.RowGather` over the ``T``
            tokens.
    """

    key_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int
    rows: RowGather


@dataclass
class CpuFlashPlan:
    """Segment table and key groups for the native CPU kernels (``cpu_flash`` backend).

    A key group is a set of segments that share key tokens (a prompt segment and the response
    segments that use it as prefix; a segment alone otherwise), so that the kernel's tasks
    (group, kv head) write disjoint rows of dK / dV.

    Attributes (CPU int64):
        segments: ``[S, 4]`` per segment ``(query start, query length, prefix start, prefix
            length)``.
        group_offsets: ``[G + 1]``; group ``g``'s segments are
            ``group_segments[group_offsets[g]:group_offsets[g + 1]]``.
        group_segments: ``[S]`` segment indices, group by group, in token order.
        group_rows: ``[G]`` tokens owned by each group.
        token_local: ``[T]`` row of each token within its group.
    """

    segments: torch.Tensor
    group_offsets: torch.Tensor
    group_segments: torch.Tensor
    group_rows: torch.Tensor
    token_local: torch.Tensor

    def as_args(self) -> tuple[torch.Tensor, ...]:
        return (self.segments, self.group_offsets, self.group_segments, self.group_rows,
                self.token_local)


@dataclass
class VarlenMetadata:
    """Boundaries of the segments of one packed row plus cached derived plans.

    Build it with :meth:`build` (validates) rather than the constructor.

    Attributes:
        cu_seqlens: ``[S + 1]`` int32 segment boundaries, ``cu_seqlens[-1] == T``.
        segment_prefix: ``[S, 2]`` int32 prefix ranges, or ``None`` when no segment has one.
        max_seqlen: longest segment (query) length.
        total_tokens: ``T``.
        backend: backend override carried to every layer (``None``: automatic choice).
    """

    cu_seqlens: torch.Tensor
    segment_prefix: Optional[torch.Tensor]
    max_seqlen: int
    total_tokens: int
    backend: Optional[str] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        cu_seqlens: torch.Tensor,
        segment_prefix: Optional[torch.Tensor] = None,
        *,
        backend: Optional[str] = None,
        validate: bool = True,
    ) -> "VarlenMetadata":
        """Checks the layout and returns the metadata.

        Args:
            cu_seqlens: ``[S + 1]`` integer boundaries from 0 to ``T``, strictly increasing.
            segment_prefix: ``[S, 2]`` ``[start, end)`` prefix per segment (``start == end``: none),
                or ``None``. A prefix must lie in ``[0, T]`` and must not overlap its own segment.
            backend: optional backend name (see :func:`fastrm.attention.varlen_attention`).
            validate: skip the checks (one host sync) when the caller already validated.

        Raises:
            ValueError: naming the field at fault.
        """
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D tensor [S + 1] with S >= 1, got shape "
                f"{tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        cu = cu_seqlens.to(torch.int32)
        lens = (cu[1:] - cu[:-1]).to(torch.int64)
        # one host sync for everything we need on the host
        total, max_len, min_len, first = (
            int(x) for x in torch.stack([cu[-1].long(), lens.max(), lens.min(), cu[0].long()]).tolist()
        )
        if validate:
            if first != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {first}")
            if min_len <= 0:
                raise ValueError(
                    "cu_seqlens must be strictly increasing: every segment needs >= 1 token "
                    "(drop empty sequences before packing)"
                )
        prefix = None
        if segment_prefix is not None:
            s = cu.numel() - 1
            if segment_prefix.shape != (s, 2):
                raise ValueError(
                    f"segment_prefix must be [S, 2] = [{s}, 2], got {tuple(segment_prefix.shape)}"
                )
            sp = segment_prefix.to(device=cu.device, dtype=torch.int32)
            has = sp[:, 1] > sp[:, 0]
            if validate:
                start, end = sp[:, 0], sp[:, 1]
                overlap = has & (start < cu[1:]) & (end > cu[:-1])
                bad = (start < 0) | (end < start) | (end > total) | overlap
                if bool(bad.any()):
                    i = int(bad.nonzero()[0])
                    raise ValueError(
                        f"segment_prefix[{i}] = {sp[i].tolist()} is invalid for segment "
                        f"[{int(cu[i])}, {int(cu[i + 1])}) of a row of T={total} tokens: a prefix "
                        "must satisfy 0 <= start <= end <= T and must not overlap its own segment"
                    )
            if bool(has.any()):
                prefix = sp
        return cls(
            cu_seqlens=cu,
            segment_prefix=prefix,
            max_seqlen=max_len,
            total_tokens=total,
            backend=backend,
        )

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def has_prefix(self) -> bool:
        return self.segment_prefix is not None

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    # ----------------------------------------------------------------------------------------
    # derived plans (cached: computed once per step, reused by every layer)
    # ----------------------------------------------------------------------------------------
    def _lengths(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cu = self.cu_seqlens.to(torch.int64)
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
        if self.segment_prefix is None:
            zeros = torch.zeros_like(starts)
            return starts, lens, zeros, zeros
        sp = self.segment_prefix.to(torch.int64)
        return starts, lens, sp[:, 0], sp[:, 1] - sp[:, 0]

    def segment_plan(self) -> SegmentPlan:
        """Groups segments by ``(L, P)`` for the exact per-segment SDPA path.

        Segments of equal query and prefix length share one batched SDPA call, so a row of
        thousands of short sequences costs one call per distinct length, not one per segment.
        """
        plan = self._cache.get("segment_plan")
        if plan is not None:
            return plan
        starts, lens, pstart, plen = self._lengths()
        device = self.cu_seqlens.device
        key = lens * (self.total_tokens + 1) + plen
        order = torch.argsort(key, stable=True)
        _, counts = torch.unique_consecutive(key[order], return_counts=True)
        order_l = order.tolist()
        lens_l, plen_l = lens.tolist(), plen.tolist()
        groups: list[SegmentGroup] = []
        offset = 0
        for cnt in counts.tolist():
            segs = order[offset: offset + cnt]
            first = order_l[offset]
            offset += cnt
            L, P = lens_l[first], plen_l[first]
            ar_l = torch.arange(L, device=device)
            q_idx = (starts[segs, None] + ar_l).reshape(-1)
            if P == 0:
                k_idx, mask = None, None
            else:
                ar_p = torch.arange(P, device=device)
                k_idx = torch.cat([pstart[segs, None] + ar_p, starts[segs, None] + ar_l], 1).reshape(-1)
                # bottom-right causal: query i sees all P prefix keys and own keys 0..i
                mask = torch.arange(P + L, device=device)[None, :] <= (ar_l[:, None] + P)
            groups.append(SegmentGroup(cnt, L, P, q_idx, k_idx, mask))
        if len(groups) == len(order_l):
            # every (L, P) is unique: one SDPA call per segment either way, so keep token order
            # and the queries need no gather (and the output no inverse permutation)
            starts_l = starts.tolist()
            groups = [g for _, g in sorted(zip(order_l, groups), key=lambda x: starts_l[x[0]])]
        perm = torch.cat([g.query_index for g in groups])
        if bool((perm == torch.arange(self.total_tokens, device=device)).all()):
            query_index, inverse = None, None
        else:
            query_index = perm
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=device)
        if self.segment_prefix is None:
            key_index = None
        else:
            key_index = torch.cat(
                [g.query_index if g.key_index is None else g.key_index for g in groups]
            )
        plan = SegmentPlan(
            groups,
            query_index,
            key_index,
            [g.num_segments * g.query_len for g in groups],
            [g.num_segments * (g.query_len + g.prefix_len) for g in groups],
            inverse,
            None if key_index is None else RowGather(key_index, self.total_tokens),
        )
        self._cache["segment_plan"] = plan
        return plan

    def cpu_flash_plan(self) -> CpuFlashPlan:
        """The segment table and key groups of the native CPU kernels (built once per step)."""
        plan = self._cache.get("cpu_flash_plan")
        if plan is not None:
            return plan
        starts, lens, pstart, plen = (x.cpu() for x in self._lengths())
        n = int(lens.numel())
        parent = list(range(n))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        if self.segment_prefix is not None:
            cu = self.cu_seqlens.cpu().to(torch.int64)
            # the segments whose own tokens a prefix [ps, ps + pl) covers: first..last by
            # binary search over the boundaries
            first = torch.searchsorted(cu[1:], pstart.contiguous(), right=True).tolist()
            last = (torch.searchsorted(cu[:-1], (pstart + plen).contiguous(), right=False) - 1).tolist()
            for s_, (pl, a, b) in enumerate(zip(plen.tolist(), first, last)):
                if pl == 0:
                    continue
                for t in range(a, min(b, n - 1) + 1):
                    parent[find(s_)] = find(t)
        roots = [find(i) for i in range(n)]
        order: dict[int, list[int]] = {}
        for i, r in enumerate(roots):
            order.setdefault(r, []).append(i)
        groups = sorted(order.values(), key=lambda segs: segs[0])
        members = [s_ for segs in groups for s_ in segs]
        offsets, rows = [0], []
        lens_l = lens.tolist()
        # seg_base: the row where each segment's tokens start within its group (groups list
        # their segments in token order); a group's rows are its segments' lengths summed
        seg_base = [0] * n
        for segs in groups:
            offsets.append(offsets[-1] + len(segs))
            acc = 0
            for s_ in segs:
                seg_base[s_] = acc
                acc += lens_l[s_]
            rows.append(acc)
        seg_of_token = torch.repeat_interleave(torch.arange(n), lens)
        token_local = (torch.arange(int(lens.sum())) - starts[seg_of_token]
                       + torch.tensor(seg_base, dtype=torch.int64)[seg_of_token])
        plan = CpuFlashPlan(
            segments=torch.stack([starts, lens, pstart, plen], 1).contiguous(),
            group_offsets=torch.tensor(offsets, dtype=torch.int64),
            group_segments=torch.tensor(members, dtype=torch.int64),
            group_rows=torch.tensor(rows, dtype=torch.int64),
            token_local=token_local.contiguous(),
        )
        self._cache["cpu_flash_plan"] = plan
        return plan

    def key_gather(self) -> KeyGather:
        """Key index and key ``cu_seqlens`` for ``[prefix keys, own keys]`` per segment."""
        kg = self._cache.get("key_gather")
        if kg is not None:
            return kg
        starts, lens, pstart, plen = self._lengths()
        device = self.cu_seqlens.device
        klen = lens + plen
        cu_k = torch.zeros(klen.numel() + 1, dtype=torch.int64, device=device)
        cu_k[1:] = torch.cumsum(klen, 0)
        seg = torch.repeat_interleave(torch.arange(klen.numel(), device=device), klen)
        off = torch.arange(seg.numel(), device=device) - cu_k[:-1][seg]
        p = plen[seg]
        key_index = torch.where(off < p, pstart[seg] + off, starts[seg] + off - p)
        kg = KeyGather(key_index, cu_k.to(torch.int32), int(klen.max()),
                       RowGather(key_index, self.total_tokens))
        self._cache["key_gather"] = kg
        return kg

    def flex_block_mask(self):
        """FlexAttention ``BlockMask`` of the attention rule (``mask_mod`` over per-token
        segment id and prefix range), built once per step."""
        bm = self._cache.get("flex_block_mask")
        if bm is not None:
            return bm
        from torch.nn.attention.flex_attention import create_block_mask

        starts, lens, pstart, plen = self._lengths()
        device = self.cu_seqlens.device
        t = self.total_tokens
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
        ps, pe = pstart[seg], pstart[seg] + plen[seg]

        def mask_mod(b, h, q_idx, kv_idx):
            same = (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)
            return same | ((kv_idx >= ps[q_idx]) & (kv_idx < pe[q_idx]))

        bm = create_block_mask(mask_mod, None, None, t, t, device=device)
        self._cache["flex_block_mask"] = bm
        return bm

    def dense_mask(self) -> torch.Tensor:
        """``[T, T]`` bool mask of the attention rule (``True`` = attend). Tests only:
        ``O(T^2)`` memory, never used by a default backend."""
        m = self._cache.get("dense_mask")
        if m is not None:
            return m
        starts, lens, pstart, plen = self._lengths()
        device = self.cu_seqlens.device
        t = self.total_tokens
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
        idx = torch.arange(t, device=device)
        same = seg[:, None] == seg[None, :]
        causal = idx[None, :] <= idx[:, None]
        ps, pe = pstart[seg], pstart[seg] + plen[seg]
        in_prefix = (idx[None, :] >= ps[:, None]) & (idx[None, :] < pe[:, None])
        m = (same & causal) | in_prefix
        self._cache["dense_mask"] = m
        return m
