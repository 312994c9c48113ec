"""Packing preference groups into rows and rows into training steps.

:func:`pack_groups` plans whole groups into rows of at most ``max_seq_len`` tokens (the planner
of :mod:`fastrm.data.planner`, sizes under the layout of :func:`fastrm.data.batch.collate_packed`);
:class:`PackedPreferenceDataset` does that per epoch, cuts the rows into steps for each rank and
collates each step into a :class:`~fastrm.data.batch.PackedBatch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastrm.data.batch import PackedBatch, collate_packed, group_tokens, shares_prefix
from fastrm.data.group import GroupingStats, PreferenceGroup, split_group
from fastrm.data.planner import plan_rows, plan_rows_arrays

log = logging.getLogger(__name__)

__all__ = ["pack_groups", "PackedPreferenceDataset", "PackingStats"]


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
            if shares_prefix(g, prefix_sharing))
    return rows


def _identity(x):
    return x


class _EpochSteps:
    """Sampler of ``(epoch, step)`` keys: the steps ``[start_step, len)`` of the dataset's
    epoch at the time of ``iter()`` (it runs in the main process; the keys carry the epoch to
    the workers)."""

    def __init__(self, dataset: "PackedPreferenceDataset") -> None:
        self.dataset = dataset

    def __iter__(self):
        ds = self.dataset
        return iter([(ds.epoch, i) for i in range(ds.start_step, len(ds.steps))])

    def __len__(self) -> int:
        return len(self.dataset.steps) - self.dataset.start_step


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
        backend: planner backend, see :func:`fastrm.data.planner.plan_rows_arrays`.
        prompt_embeddings: ``[num_groups, E]`` prompt embedding of each group of ``groups``
            (cross-prompt training); each step's batch then carries
            ``prompt_embeddings [N, E]``, one row per scored response.
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
        prompt_embeddings: Optional[torch.Tensor] = None,
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
        if prompt_embeddings is not None and (prompt_embeddings.dim() != 2
                                              or prompt_embeddings.shape[0] != len(all_groups)):
            raise ValueError(f"prompt_embeddings must be [num_groups={len(all_groups)}, E], got "
                             f"{tuple(prompt_embeddings.shape)}")
        self.prompt_embeddings = prompt_embeddings
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
            parts = split_group(g, self.max_seq_len, shares_prefix(g, self.prefix_sharing), gstats)
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
                                    if shares_prefix(g, self.prefix_sharing)))
        self.start_step = 0
        self._plans: dict[int, tuple[list[list[np.ndarray]], int]] = {}  # epoch -> plan_epoch()
        self.set_epoch(epoch)

    def plan_epoch(self, epoch: int) -> tuple[list[list[np.ndarray]], int]:
        """``(steps, num_rows)`` of ``epoch`` for all ranks: each step a list of rows (arrays of
        indices into :attr:`units`), in the epoch's order, before they are dealt to ranks;
        ``num_rows`` counts the rows before ``drop_last``. Deterministic in ``seed`` and
        ``epoch``; independent of ``rank`` and ``world_size``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        n = len(self.units)
        if self.order_key is None:
            order = rng.permutation(n)
        else:
            key = self.order_key(epoch) if callable(self.order_key) else self.order_key
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
        num_rows = len(rows)
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
        return steps, num_rows

    def use_plans(self, plans: dict[int, tuple[list[list[np.ndarray]], int]]) -> None:
        """Plans of some epochs computed before (:meth:`plan_epoch`'s results, e.g. read from
        :class:`fastrm.data.cache.DataCache`): :meth:`set_epoch` takes them instead of
        planning again."""
        self._plans = dict(plans)
        self.set_epoch(self.epoch, self.start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Plans the steps of ``epoch``; ``start_step`` is where :meth:`dataloader` starts."""
        self.epoch = int(epoch)
        if self.epoch in self._plans:
            steps, self.num_rows = self._plans[self.epoch]
        else:
            steps, self.num_rows = self.plan_epoch(self.epoch)
        tokens = int(self.sizes.sum())
        self.epoch_fill_rate = tokens / max(1, self.num_rows * self.max_seq_len)
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

    def step_units(self, i: int) -> np.ndarray:
        """Indices into :attr:`units` of the groups (row by row) of step ``i``."""
        rows = self.steps[i]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def step_groups(self, i: int) -> list[PreferenceGroup]:
        """The groups (row by row) of step ``i``."""
        return [self.units[u] for u in self.step_units(i).tolist()]

    def __getitem__(self, i: int | tuple[int, int]) -> PackedBatch:
        """Step ``i`` of the current epoch, or step ``i`` of epoch ``e`` for a key ``(e, i)``
        (what :meth:`dataloader`'s sampler yields: a worker's copy of the dataset follows the
        epoch from the key, so persistent workers stay right across epochs)."""
        if isinstance(i, tuple):
            epoch, i = i
            if epoch != self.epoch:
                self.set_epoch(epoch)
        units = self.step_units(i)
        emb = None
        if self.prompt_embeddings is not None:  # a split group keeps its source's prompt
            emb = self.prompt_embeddings[torch.from_numpy(self.unit_source[units])]
        return collate_packed([self.units[u] for u in units.tolist()], self.prefix_sharing, emb)

    def dataloader(self, num_workers: int = 0, pin_memory: bool = False,
                   persistent_workers: bool = False, keys: Optional[Sequence[tuple[int, int]]] = None,
                   **kwargs) -> DataLoader:
        """A DataLoader over the steps ``[start_step, len)`` of the epoch current at each
        ``iter()`` (or over fixed ``(epoch, step)`` ``keys``). One loader serves every epoch,
        so ``persistent_workers`` keep their processes; ``num_workers > 0`` collates steps in
        worker processes while the model runs, ``pin_memory`` puts them in page-locked memory
        for non-blocking copies to the GPU."""
        sampler = _EpochSteps(self) if keys is None else list(keys)
        return DataLoader(self, batch_size=None, sampler=sampler, collate_fn=_identity,
                          num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers and num_workers > 0, **kwargs)

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
