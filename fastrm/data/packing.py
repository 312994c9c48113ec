"""Packing preference groups into rows, collating them into a :class:`PackedBatch`, and the padded
baseline.

Planner
    :func:`plan_rows` assigns items (token counts) to rows of at most ``max_seq_len`` tokens with
    **best-fit decreasing** (BFD): items by size, largest first (ties by index); each goes to the
    open row with the least remaining room that still fits it (ties: the row that reached that
    room first); a new row opens when none fits. BFD uses at most ``11/9 OPT + 6/9`` rows and on
    long-tailed length mixes fills > 99 % of each row. The native op
    ``torch.ops.fastrm.plan_rows_bfd`` (``kernels/packing.cpp``, per item, ordered map of
    remaining room) runs when the extension is built; the numpy fallback applies the same rule in
    batches (all items of one size at once) and returns identical rows.

Layout (see :mod:`fastrm.data.batch`)
    A group is packed as ``[prompt][r_1]...[r_K]`` when prefix sharing is on and it has a prompt
    and at least two responses: the prompt is a segment with positions ``0..P-1``; each response
    segment has ``segment_prefix`` = the prompt's ``[start, end)`` and positions ``P..P+L-1``.
    Otherwise every response is a stand-alone segment ``prompt + r_k`` with positions from 0.
    The reward of response ``k`` is read at its segment's last token.

Padded baseline
    :func:`collate_padded` pads every full sequence to the longest in the batch (right padding):
    what a TRL / torchtune reward recipe without packing does.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastrm import _native
from fastrm.data.batch import PackedBatch
from fastrm.data.group import GroupingStats, PreferenceGroup, split_group

log = logging.getLogger(__name__)

__all__ = [
    "plan_rows", "plan_rows_arrays", "pack_groups", "collate_packed", "collate_padded",
    "PaddedBatch", "PackedPreferenceDataset", "PackingStats", "fill_rate",
]


# --------------------------------------------------------------------------------------------
# planner
# --------------------------------------------------------------------------------------------

def _check_sizes(sizes: np.ndarray, max_seq_len: int) -> None:
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if sizes.ndim != 1:
        raise ValueError(f"sizes must be 1-D, got shape {sizes.shape}")
    if sizes.size:
        bad = np.flatnonzero((sizes < 1) | (sizes > max_seq_len))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"item {i} has size {int(sizes[i])}, outside [1, max_seq_len={max_seq_len}] "
                f"({bad.size} such items); split, truncate or drop them before planning")


def _bins_numpy(sizes: np.ndarray, cap: int, order: np.ndarray) -> tuple[np.ndarray, int]:
    """BFD with FIFO ties, batched per size class. Returns the row of every item in processing
    order (``order``) and the number of rows.

    Why batching is exact: for an item of size ``s`` the best-fit row has the smallest room
    ``r >= s``; after taking it the row has room ``r - s``, and no row had room in ``[s, r)``,
    so the next item of size ``s`` goes to the same row until its room drops below ``s``. Hence
    every row of room ``r`` takes ``q = r // s`` items in FIFO order, and only the last row
    visited may take fewer.
    """
    n = sizes.size
    ss = sizes[order]
    bin_sorted = np.empty(n, dtype=np.int64)
    buckets: dict[int, list] = {}  # room -> [list of rows (FIFO), head]
    keys: list[int] = []  # rooms with a non-empty FIFO, ascending
    num_rows = 0

    def push(room: int, rows) -> None:
        if room <= 0 or len(rows) == 0:
            return
        b = buckets.get(room)
        if b is None:
            buckets[room] = [list(rows), 0]
            bisect.insort(keys, room)
        else:
            b[0].extend(rows)

    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n]
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        s = int(ss[lo])
        pos = lo
        while pos < hi:
            c = hi - pos
            ki = bisect.bisect_left(keys, s)
            if ki == len(keys):  # no open row fits: open new ones (room = cap)
                q = cap // s
                nfull, rem = divmod(c, q)
                ids = np.arange(num_rows, num_rows + nfull + (rem > 0), dtype=np.int64)
                bin_sorted[pos:pos + nfull * q] = np.repeat(ids[:nfull], q)
                if rem:
                    bin_sorted[pos + nfull * q:hi] = ids[-1]
                num_rows += ids.size
                push(cap - q * s, ids[:nfull].tolist())
                if rem:
                    push(cap - rem * s, [int(ids[-1])])
                pos = hi
                continue
            r = keys[ki]
            b = buckets[r]
            lst, head = b
            avail = len(lst) - head
            q = r // s
            nfull = min(avail, c // q)
            full = lst[head:head + nfull]
            if nfull:
                bin_sorted[pos:pos + nfull * q] = np.repeat(np.asarray(full, np.int64), q)
            pos += nfull * q
            head += nfull
            partial = None
            if pos < hi and head < len(lst):  # the last row visited takes the rest (< q items)
                partial = lst[head]
                rem = hi - pos
                bin_sorted[pos:hi] = partial
                head += 1
                pos = hi
            b[1] = head
            if head == len(lst):
                del buckets[r]
                keys.pop(ki)
            push(r - q * s, full)
            if partial is not None:
                push(r - rem * s, [partial])
    return bin_sorted, num_rows


def plan_rows_arrays(
    sizes: Sequence[int] | np.ndarray | torch.Tensor,
    max_seq_len: int,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing row plan as flat arrays.

    Args:
        sizes: ``[n]`` positive token counts, each ``<= max_seq_len``.
        max_seq_len: row capacity in tokens.
        backend: ``"native"`` (the C++ op; error if not built), ``"numpy"``, or ``"auto"``
            (native when available).

    Returns:
        ``items [n]`` int64 item indices row by row (within a row in placement order: largest
        first) and ``row_offsets [R + 1]`` int64: row ``r`` holds
        ``items[row_offsets[r]:row_offsets[r + 1]]``.
    """
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.cpu().numpy()
    sizes = np.asarray(sizes, dtype=np.int64)
    _check_sizes(sizes, max_seq_len)
    if backend not in ("auto", "native", "numpy"):
        raise ValueError(f"backend={backend!r}; choose 'auto', 'native' or 'numpy'")
    use_native = backend == "native" or (backend == "auto" and _native.has_op("plan_rows_bfd"))
    if backend == "native" and not _native.has_op("plan_rows_bfd"):
        raise ValueError("backend='native' but the extension is not available: "
                         f"{_native.unavailable_reason() or 'op plan_rows_bfd missing; rebuild'}")
    if sizes.size == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    if use_native:
        items, offsets = torch.ops.fastrm.plan_rows_bfd(torch.from_numpy(sizes), int(max_seq_len))
        return items.numpy(), offsets.numpy()
    order = np.argsort(-sizes, kind="stable")
    bin_sorted, num_rows = _bins_numpy(sizes, int(max_seq_len), order)
    perm = np.argsort(bin_sorted, kind="stable")
    items = order[perm]
    counts = np.bincount(bin_sorted, minlength=num_rows)
    offsets = np.zeros(num_rows + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return items, offsets


def plan_rows(
    sizes: Sequence[int] | np.ndarray | torch.Tensor,
    max_seq_len: int,
    backend: str = "auto",
) -> list[list[int]]:
    """Rows of item indices (see :func:`plan_rows_arrays`): every item in exactly one row and
    ``sum(sizes[row]) <= max_seq_len`` for every row."""
    items, offsets = plan_rows_arrays(sizes, max_seq_len, backend)
    return [r.tolist() for r in np.split(items, offsets[1:-1])] if items.size else []


def fill_rate(sizes: Sequence[int] | np.ndarray, num_rows: int, max_seq_len: int) -> float:
    """``sum(sizes) / (num_rows * max_seq_len)``: fraction of row capacity holding tokens."""
    return float(np.sum(np.asarray(sizes, dtype=np.int64))) / max(1, num_rows * max_seq_len)


# --------------------------------------------------------------------------------------------
# groups -> rows -> PackedBatch
# --------------------------------------------------------------------------------------------

def _shares_prefix(g: PreferenceGroup, prefix_sharing: bool) -> bool:
    # a single response gains nothing from a separate prompt segment
    return prefix_sharing and len(g.prompt_tokens) > 0 and len(g.responses) >= 2


def group_tokens(g: PreferenceGroup, prefix_sharing: bool) -> int:
    """Tokens the group takes in a row under the layout :func:`collate_packed` uses."""
    return g.num_tokens(_shares_prefix(g, prefix_sharing))


@dataclass
class PackingStats:
    """Rows, fill and what prefix sharing / splitting did, for the log and the benchmarks."""

    groups: int = 0
    rows: int = 0
    tokens: int = 0
    capacity: int = 0
    prompt_tokens_saved: int = 0
    split_groups: int = 0
    cross_subgroup_dropped: int = 0
    repeated_responses: int = 0

    @property
    def fill_rate(self) -> float:
        return self.tokens / max(1, self.capacity)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["fill_rate"] = self.fill_rate
        return d


def pack_groups(
    groups: Sequence[PreferenceGroup],
    max_seq_len: int,
    prefix_sharing: bool = True,
    backend: str = "auto",
    stats: Optional[PackingStats] = None,
) -> list[list[int]]:
    """Rows of group indices: whole groups, each row ``<= max_seq_len`` tokens under the layout
    chosen by ``prefix_sharing`` (the prompt of a shared group counted once). Groups that do not
    fit must be split first (:func:`fastrm.data.group.split_group`); a ValueError names them."""
    sizes = np.fromiter((group_tokens(g, prefix_sharing) for g in groups), np.int64, len(groups))
    too_big = np.flatnonzero(sizes > max_seq_len)
    if too_big.size:
        g = groups[int(too_big[0])]
        raise ValueError(
            f"group {int(too_big[0])} (row {g.source_index!r}) needs {int(sizes[too_big[0]])} "
            f"tokens > max_seq_len={max_seq_len} ({too_big.size} such groups); split them with "
            "split_group or use PackedPreferenceDataset, which does")
    rows = plan_rows(sizes, max_seq_len, backend)
    if stats is not None:
        stats.groups += len(groups)
        stats.rows += len(rows)
        stats.tokens += int(sizes.sum())
        stats.capacity += len(rows) * max_seq_len
        stats.prompt_tokens_saved += sum(
            (len(g.responses) - 1) * len(g.prompt_tokens) for g in groups
            if _shares_prefix(g, prefix_sharing))
    return rows


def collate_packed(groups: Sequence[PreferenceGroup], prefix_sharing: bool = True) -> PackedBatch:
    """Lays ``groups`` end to end in one flat ``[1, T]`` row (see the module docstring).

    ``margin`` is ``None`` when no comparison has one; a mix of margins and ``None`` is a
    ValueError. ``group_index [P]`` numbers the groups of this batch; ``prompt_ids [N]`` carries
    each response's dataset prompt id. With unpaired data (groups with ``labels``),
    ``extras["labels"]`` is ``[N]`` int64 (+1 / -1, 0 for paired responses). When groups have a
    ``category`` (RewardBench subsets, synthetic categories), ``extras["category"]`` lists it per
    comparison (for :func:`fastrm.data.group.accuracy_by_category`).
    """
    tokens: list[int] = []
    positions: list[int] = []
    cu = [0]
    prefix: list[tuple[int, int]] = []
    reward_pos: list[int] = []
    chosen: list[int] = []
    rejected: list[int] = []
    margins: list[Optional[float]] = []
    group_idx: list[int] = []
    prompt_ids: list[int] = []
    labels: list[int] = []
    any_labels = False
    saved = 0
    for gi, g in enumerate(groups):
        if not g.responses:
            raise ValueError(f"group {gi} (row {g.source_index!r}) has no responses")
        base = len(reward_pos)
        p = g.prompt_tokens
        if _shares_prefix(g, prefix_sharing):
            start = len(tokens)
            tokens.extend(p)
            positions.extend(range(len(p)))
            cu.append(len(tokens))
            prefix.append((0, 0))
            for r in g.responses:
                if not r:
                    raise ValueError(f"group {gi} (row {g.source_index!r}) has an empty response")
                tokens.extend(r)
                positions.extend(range(len(p), len(p) + len(r)))
                cu.append(len(tokens))
                prefix.append((start, start + len(p)))
                reward_pos.append(len(tokens) - 1)
            saved += (len(g.responses) - 1) * len(p)
        else:
            for r in g.responses:
                if not r:
                    raise ValueError(f"group {gi} (row {g.source_index!r}) has an empty response")
                tokens.extend(p)
                tokens.extend(r)
                positions.extend(range(len(p) + len(r)))
                cu.append(len(tokens))
                prefix.append((0, 0))
                reward_pos.append(len(tokens) - 1)
        for i, j, m in g.comparisons:
            chosen.append(base + i)
            rejected.append(base + j)
            margins.append(m)
            group_idx.append(gi)
        prompt_ids.extend([g.prompt_id] * len(g.responses))
        if g.labels is not None:
            any_labels = True
            labels.extend(int(x) for x in g.labels)
        else:
            labels.extend([0] * len(g.responses))
    has_m = [m is not None for m in margins]
    if any(has_m) and not all(has_m):
        first = has_m.index(False) if has_m[0] else has_m.index(True)
        raise ValueError(
            f"margin is set for some comparisons but not others (comparison {first} of group "
            f"{group_idx[first]}); give every pair a margin or none (e.g. column_map the margin "
            "column for all sources, or fill missing margins with 0.0)")
    batch = PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64).view(1, -1),
        position_ids=torch.tensor(positions, dtype=torch.int64).view(1, -1),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        segment_prefix=torch.tensor(prefix, dtype=torch.int32).view(-1, 2),
        reward_positions=torch.tensor(reward_pos, dtype=torch.int64),
        chosen_index=torch.tensor(chosen, dtype=torch.int64),
        rejected_index=torch.tensor(rejected, dtype=torch.int64),
        margin=torch.tensor(margins, dtype=torch.float32) if margins and all(has_m) else None,
        group_index=torch.tensor(group_idx, dtype=torch.int64),
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        num_padding_tokens=0,
        prompt_tokens_saved=saved,
    )
    if any_labels:
        batch.extras["labels"] = torch.tensor(labels, dtype=torch.int64)
    if any(g.category for g in groups):  # evaluation sets: per-comparison category names
        batch.extras["category"] = [groups[gi].category for gi in group_idx]
    return batch


# --------------------------------------------------------------------------------------------
# padded baseline
# --------------------------------------------------------------------------------------------

@dataclass
class PaddedBatch:
    """The unpacked baseline: ``N`` full sequences padded right to the longest, ``L``.

    Attributes:
        tokens: ``[N, L]`` token ids (``pad_id`` after each sequence).
        attention_mask: ``[N, L]`` bool, True on real tokens.
        lengths: ``[N]`` int64 real lengths.
        reward_positions: ``[N]`` int64 ``lengths - 1`` (column of each sequence's reward token).
        chosen_index, rejected_index: ``[P]`` int64 rows of the preferred / dispreferred one.
        margin: ``[P]`` float32 or ``None``.
        group_index: ``[P]`` int64 batch-local group of each comparison.
        prompt_ids: ``[N]`` int64.
        num_padding_tokens: ``N * L - sum(lengths)``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    reward_positions: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None
    num_padding_tokens: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def position_ids(self) -> torch.Tensor:
        n, L = self.tokens.shape
        return torch.arange(L).expand(n, L)

    def to(self, device) -> "PaddedBatch":
        from dataclasses import fields, replace
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def collate_padded(groups: Sequence[PreferenceGroup], pad_id: int = 0) -> PaddedBatch:
    """Pads every full sequence (``prompt + response``) of ``groups`` to the longest.

    Sequences are laid group by group, responses in order; for ``B`` pairs that is
    ``[c_1, r_1, c_2, r_2, ...]`` with ``chosen_index = 0, 2, ...``."""
    seqs: list[list[int]] = []
    chosen, rejected, margins, gidx, pids = [], [], [], [], []
    for gi, g in enumerate(groups):
        base = len(seqs)
        for k in range(len(g.responses)):
            seqs.append(g.sequence(k))
        for i, j, m in g.comparisons:
            chosen.append(base + i)
            rejected.append(base + j)
            margins.append(m)
            gidx.append(gi)
        pids.extend([g.prompt_id] * len(g.responses))
    if not seqs:
        raise ValueError("collate_padded got no sequences")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    L = int(lengths.max())
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.int64)
    for k, s in enumerate(seqs):
        tokens[k, :len(s)] = torch.tensor(s, dtype=torch.int64)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    has_m = [m is not None for m in margins]
    if any(has_m) and not all(has_m):
        raise ValueError("margin is set for some comparisons but not others; give every pair a "
                         "margin or none")
    return PaddedBatch(
        tokens=tokens, attention_mask=mask, lengths=lengths, reward_positions=lengths - 1,
        chosen_index=torch.tensor(chosen, dtype=torch.int64),
        rejected_index=torch.tensor(rejected, dtype=torch.int64),
        margin=torch.tensor(margins, dtype=torch.float32) if margins and all(has_m) else None,
        group_index=torch.tensor(gidx, dtype=torch.int64),
        prompt_ids=torch.tensor(pids, dtype=torch.int64),
        num_padding_tokens=int(len(seqs) * L - lengths.sum()),
    )


# --------------------------------------------------------------------------------------------
# a dataset of packed steps
# --------------------------------------------------------------------------------------------

def _identity(x):
    return x


class PackedPreferenceDataset(Dataset):
    """Map-style dataset of packed training *steps*: item ``i`` is the :class:`PackedBatch` of
    step ``i`` of the current epoch (for this rank).

    Per epoch (deterministic in ``seed`` and ``epoch``): the groups are permuted (or, with
    ``order_key``, sorted by it so that similar prompts are neighbours: see
    :func:`fastrm.data.cross_prompt.similarity_order`), cut into windows of ``window`` groups,
    each window is planned into rows with :func:`plan_rows`, the rows are shuffled (window by
    window when ``order_key`` is set, so similar prompts stay in one step) and chunked into steps
    of ``rows_per_step`` rows (``rows_per_step * max_seq_len`` tokens at most). Steps are dealt
    round-robin to ``world_size`` ranks (the tail that does not divide is dropped so every rank
    takes the same number of steps).

    Groups longer than ``max_seq_len`` are split once at construction
    (:func:`fastrm.data.group.split_group`: each subgroup keeps the prompt; a comparison that
    would cross subgroups is served by repeating one of its responses, counted in
    ``self.stats.repeated_responses``).

    Resume: ``state = ds.state_dict(steps_done)`` in the checkpoint;
    ``ds.load_state_dict(state)`` then ``ds.dataloader()`` continues at the next step.

    Args:
        groups: a dataset / sequence of :class:`PreferenceGroup`.
        max_seq_len: tokens per packed row.
        rows_per_step: rows per step; the step is one flat ``[1, T]`` batch, ``T <=
            rows_per_step * max_seq_len``.
        tokens_per_step: alternative token budget: ``rows_per_step = tokens_per_step //
            max_seq_len`` (overrides ``rows_per_step``).
        prefix_sharing: ``[prompt][r_1]..[r_K]`` layout for groups with a prompt. ``None``
            (default) turns it on when any group has a prompt.
        seed, epoch: shuffling.
        window: groups planned together (default: all). Smaller windows mix lengths less but
            plan faster and vary steps more between epochs.
        order_key: ``[num_groups]`` floats (e.g. a prompt embedding projection); when given, the
            epoch order sorts by it instead of a random permutation.
        drop_last: drop a last step with fewer than ``rows_per_step`` rows.
        rank, world_size: data parallel sharding.
        backend: planner backend, see :func:`plan_rows_arrays`.
    """

    def __init__(
        self,
        groups: Sequence[PreferenceGroup],
        max_seq_len: int,
        rows_per_step: int = 1,
        prefix_sharing: Optional[bool] = None,
        tokens_per_step: Optional[int] = None,
        seed: int = 0,
        epoch: int = 0,
        window: Optional[int] = None,
        order_key: Optional[Callable[[int], np.ndarray] | np.ndarray] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "auto",
    ) -> None:
        if tokens_per_step is not None:
            if tokens_per_step < max_seq_len:
                raise ValueError(f"tokens_per_step={tokens_per_step} must be >= max_seq_len="
                                 f"{max_seq_len} (one row)")
            rows_per_step = tokens_per_step // max_seq_len
        if rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        all_groups = [groups[i] for i in range(len(groups))]
        if prefix_sharing is None:
            prefix_sharing = any(len(g.prompt_tokens) > 0 for g in all_groups)
        self.prefix_sharing = bool(prefix_sharing)
        self.max_seq_len = int(max_seq_len)
        self.rows_per_step = int(rows_per_step)
        self.seed, self.window, self.drop_last = int(seed), window, drop_last
        self.rank, self.world_size, self.backend = rank, world_size, backend
        gstats = GroupingStats()
        units: list[PreferenceGroup] = []
        unit_source: list[int] = []
        split = 0
        for gi, g in enumerate(all_groups):
            parts = split_group(g, self.max_seq_len, _shares_prefix(g, self.prefix_sharing), gstats)
            split += len(parts) > 1
            units.extend(parts)
            unit_source.extend([gi] * len(parts))
        if split:
            log.warning("packing: %d groups were longer than max_seq_len=%d and were split into "
                        "subgroups that keep the prompt; %d responses were repeated so every "
                        "comparison stays in one subgroup; %d comparisons too long for a row "
                        "even alone were dropped", split, max_seq_len,
                        gstats.repeated_responses, gstats.cross_subgroup_dropped)
        self.units = units
        self.unit_source = np.asarray(unit_source, np.int64)
        self.sizes = np.fromiter((group_tokens(g, self.prefix_sharing) for g in units), np.int64,
                                 len(units))
        if order_key is not None and not callable(order_key):
            key = np.asarray(order_key, np.float64)
            if key.shape != (len(all_groups),):
                raise ValueError(f"order_key must have one value per group ({len(all_groups)}), "
                                 f"got shape {key.shape}")
            order_key = key[self.unit_source]
        self.order_key = order_key
        self.stats = PackingStats(
            groups=len(units), split_groups=split,
            cross_subgroup_dropped=gstats.cross_subgroup_dropped,
            repeated_responses=gstats.repeated_responses,
            prompt_tokens_saved=sum((len(g.responses) - 1) * len(g.prompt_tokens) for g in units
                                    if _shares_prefix(g, self.prefix_sharing)))
        self.start_step = 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Plans the steps of ``epoch``; ``start_step`` is where :meth:`dataloader` starts."""
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.units)
        if self.order_key is None:
            order = rng.permutation(n)
        else:
            key = self.order_key(self.epoch) if callable(self.order_key) else self.order_key
            key = np.asarray(key)[self.unit_source] if callable(self.order_key) else key
            order = np.argsort(key, kind="stable")
        window = self.window or max(1, n)
        rows: list[np.ndarray] = []
        chunks: list[list[np.ndarray]] = []
        for lo in range(0, n, window):
            idx = order[lo:lo + window]
            items, offsets = plan_rows_arrays(self.sizes[idx], self.max_seq_len, self.backend)
            wrows = [idx[items[a:b]] for a, b in zip(offsets[:-1], offsets[1:])]
            chunks.append(wrows)
            rows.extend(wrows)
        self.num_rows = len(rows)
        tokens = int(self.sizes.sum())
        self.epoch_fill_rate = tokens / max(1, len(rows) * self.max_seq_len)
        if self.order_key is None:
            perm = rng.permutation(len(rows))
            rows = [rows[i] for i in perm]
        else:  # keep similar prompts together: shuffle whole steps, not rows
            rows = [r for c in chunks for r in c]
        k = self.rows_per_step
        steps = [rows[i:i + k] for i in range(0, len(rows), k)]
        if self.drop_last and steps and len(steps[-1]) < k:
            steps.pop()
        if self.order_key is not None:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        usable = len(steps) - len(steps) % self.world_size if self.world_size > 1 else len(steps)
        self.steps = steps[self.rank:usable:self.world_size]
        self.stats.rows = self.num_rows
        self.stats.tokens = tokens
        self.stats.capacity = self.num_rows * self.max_seq_len
        if not 0 <= start_step <= len(self.steps):
            raise ValueError(f"start_step={start_step} outside [0, {len(self.steps)}]")
        self.start_step = int(start_step)

    def __len__(self) -> int:
        return len(self.steps)

    def step_groups(self, i: int) -> list[PreferenceGroup]:
        """The groups (row by row) of step ``i``."""
        return [self.units[u] for row in self.steps[i] for u in row.tolist()]

    def __getitem__(self, i: int) -> PackedBatch:
        batch = collate_packed(self.step_groups(i), self.prefix_sharing)
        batch.extras["num_rows"] = len(self.steps[i])
        batch.extras["row_capacity"] = self.max_seq_len
        return batch

    def dataloader(self, num_workers: int = 0, pin_memory: bool = False, **kwargs) -> DataLoader:
        """A DataLoader over the steps ``[start_step, len)`` of the current epoch."""
        return DataLoader(self, batch_size=None, sampler=range(self.start_step, len(self.steps)),
                          collate_fn=_identity, num_workers=num_workers, pin_memory=pin_memory,
                          **kwargs)

    def state_dict(self, steps_done: int) -> dict:
        """Position to checkpoint: ``steps_done`` steps of the current epoch were consumed."""
        return {"seed": self.seed, "epoch": self.epoch, "step": int(steps_done),
                "num_steps": len(self.steps), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state.get("world_size", 1) != self.world_size:
            raise ValueError(f"cannot resume: checkpoint has seed={state['seed']}, world_size="
                             f"{state.get('world_size')}; this run seed={self.seed}, "
                             f"world_size={self.world_size}")
        self.set_epoch(state["epoch"], start_step=0)
        if len(self.steps) != state["num_steps"]:
            raise ValueError(f"cannot resume: the epoch now has {len(self.steps)} steps, the "
                             f"checkpoint had {state['num_steps']} (data or max_seq_len changed)")
        self.start_step = int(state["step"])
