"""Row planning: which items (token counts) share a packed row of at most ``max_seq_len`` tokens.

:func:`plan_rows` assigns items to rows with **best-fit decreasing** (BFD): items by size,
largest first (ties by index); each goes to the open row with the least remaining room that
still fits it (ties: the row that reached that room first); a new row opens when none fits. BFD
uses at most ``11/9 OPT + 6/9`` rows and on long-tailed length mixes fills > 99 % of each row.
The native op ``torch.ops.fastrm.plan_rows_bfd`` (``kernels/packing.cpp``, per item, ordered map
of remaining room) runs when the extension is built; the numpy fallback applies the same rule in
batches (all items of one size at once) and returns identical rows.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from fastrm import _native

__all__ = ["plan_rows", "plan_rows_arrays", "fill_rate"]


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
