"""Embedding extraction: a backbone's hidden state at the reward position of every response.

``e(x, y) = hidden[reward_position]`` of the final-norm hidden states ``[T, D]`` that
:class:`fastrm.models.RewardModel` returns for a :class:`~fastrm.data.batch.PackedBatch` (the
state the reward head reads: the response's last token). Pairs are packed exactly as in
training (:func:`fastrm.data.batch.collate_packed`, with prefix sharing the prompt is
computed once for both responses), in the dataset's order, ``max_tokens`` tokens per forward;
each comparison ``(i, j)`` of a group yields one row ``(e_i, e_j)`` of the
:class:`~fastrm.decompose.store.EmbeddingStore`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fastrm.data.batch import PackedBatch
from fastrm.data.group import PreferenceGroup
from fastrm.data.batch import collate_packed, group_tokens
from fastrm.decompose.store import EmbeddingStore, PairEmbeddings

log = logging.getLogger(__name__)


def _batches(groups: Sequence[PreferenceGroup], max_tokens: int, prefix_sharing: bool,
             stats: dict) -> Iterator[tuple[list[PreferenceGroup], int]]:
    """Greedy, order-preserving packing: consecutive groups until ``max_tokens``; a group
    larger than ``max_tokens`` goes alone. Groups without comparisons are counted, skipped."""
    cur: list[PreferenceGroup] = []
    cur_tokens = 0
    for g in groups:
        if not g.comparisons:
            stats["groups_without_comparisons"] += 1
            continue
        n = group_tokens(g, prefix_sharing)
        if cur and cur_tokens + n > max_tokens:
            yield cur, cur_tokens
            cur, cur_tokens = [], 0
        cur.append(g)
        cur_tokens += n
    if cur:
        yield cur, cur_tokens


@torch.no_grad()
def embed_batch(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [P, D], rejected [P, D])`` float32 embeddings of a packed batch's comparisons."""
    hidden = model(batch)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.reward_positions).float()
    return h.index_select(0, batch.chosen_index), h.index_select(0, batch.rejected_index)


@torch.no_grad()
def embed_pairs(
    model: nn.Module,
    groups: Sequence[PreferenceGroup],
    store: Optional[EmbeddingStore] = None,
    max_tokens: int = 8192,
    prefix_sharing: bool = True,
    device: Optional[torch.device | str] = None,
    desc: str = "embed",
    progress: bool = True,
) -> EmbeddingStore | PairEmbeddings:
    """Embeds every comparison of ``groups`` with ``model`` (a :class:`~fastrm.models.RewardModel`
    or anything mapping a :class:`PackedBatch` to ``[T, D]`` hidden states).

    Args:
        model: the backbone, in eval mode on ``device``.
        groups: preference groups (pairs or grouped responses) in dataset order.
        store: where to write (an open :meth:`EmbeddingStore.create`); ``None`` returns the
            embeddings in memory as :class:`PairEmbeddings`. A store is closed on return.
        max_tokens: tokens per forward (one packed ``[1, T]`` batch).
        prefix_sharing: compute each prompt once for all its responses.
        device: where batches go (default: the model's device).

    Returns the store (closed) or the in-memory :class:`PairEmbeddings`. ``store.info`` records
    ``num_pairs``, ``num_tokens`` and the groups skipped for having no comparison.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    was_training = model.training
    model.eval()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    stats = {"groups_without_comparisons": 0, "num_tokens": 0, "num_forwards": 0}
    total_tokens = sum(group_tokens(g, prefix_sharing) for g in groups)
    cs: list[torch.Tensor] = []
    rs: list[torch.Tensor] = []
    bar = tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    try:
        for chunk, ntok in _batches(groups, max_tokens, prefix_sharing, stats):
            batch = collate_packed(chunk, prefix_sharing=prefix_sharing).to(device)
            c, r = embed_batch(model, batch)
            if store is not None:
                store.append(c, r)
            else:
                cs.append(c.cpu())
                rs.append(r.cpu())
            stats["num_tokens"] += batch.num_tokens
            stats["num_forwards"] += 1
            bar.update(ntok)
    finally:
        bar.close()
        model.train(was_training)
    if stats["groups_without_comparisons"]:
        log.warning("embed: %d groups have no comparison (unpaired rows) and were skipped",
                    stats["groups_without_comparisons"])
    if store is not None:
        store.meta["info"].update(stats)
        store.close()
        if store.num_pairs == 0:
            raise ValueError("no preference pair was embedded: the groups hold no comparison")
        return store
    if not cs:
        raise ValueError("no preference pair was embedded: the groups hold no comparison")
    return PairEmbeddings(torch.cat(cs), torch.cat(rs))


def jsonl_pairs(
    tokenizer: Any,
    path: str,
    split: Optional[str] = None,
    split_column: str = "split",
    max_seq_len: Optional[int] = None,
    truncation: str = "left_prompt",
    limit: Optional[int] = None,
    on_identical: str = "drop",
    group_by_prompt: bool = False,
    prompt_id_column: Optional[str] = None,
) -> Sequence[PreferenceGroup]:
    """Preference pairs from a JSONL file in TRL's explicit-prompt layout (``prompt``,
    ``chosen``, ``rejected``), rows with ``row[split_column] == split`` only (all rows when
    ``split`` is ``None``), the first ``limit`` of them when set; tokenized by
    :class:`fastrm.data.dataset.PreferenceDataset` with its length policy. ``path`` is
    relative to the working directory (configs use ``../shared/data/...`` from the repo root).

    ``group_by_prompt=True`` merges the rows of one prompt (same ``prompt_id_column`` value, or
    same prompt text when it is ``None``) into one group: the prompt is then embedded once for
    all its responses, and each labelled pair is still one comparison (one embedding row)."""
    import json

    from fastrm.data.dataset import PreferenceDataset

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"dataset path {str(p)!r} does not exist (path is relative to the "
                         f"working directory {Path.cwd()})")
    rows = []
    with p.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if split is not None and row.get(split_column) != split:
                continue
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{p} has no row with {split_column}={split!r}")
    column_map = {"prompt_id": prompt_id_column} if prompt_id_column else None
    return PreferenceDataset(tokenizer, data=rows, max_seq_len=max_seq_len,
                             truncation=truncation, on_identical=on_identical,
                             group_by_prompt=group_by_prompt, column_map=column_map)
