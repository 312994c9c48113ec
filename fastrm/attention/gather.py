"""Row gather with repeated indices whose backward accumulates in fp32, deterministically on demand.

The flash backends and the per-segment path read a prompt's keys and values once per response
that uses it as prefix: ``k.index_select(0, key_index)`` with ``key_index [N]`` naming some of
the ``T`` rows several times. Autograd's backward of ``index_select`` is an ``index_add_`` into
zeros of the input's dtype: in bf16 every repeat is one more bf16 rounding (a prompt token shared
by 16 responses loses its small contributions next to a large one), and on CUDA it is an
atomic add whose order changes from run to run. :func:`gather_rows` keeps the forward (one
``index_select``) and replaces the backward:

* accumulation in an fp32 buffer ``[T, ...]``, one rounding to the input's dtype at the end;
* under ``torch.use_deterministic_algorithms(True)`` a fixed order: the ``r``-th occurrence of
  every row is added in pass ``r`` (:meth:`RowGather.rank_passes`), and no pass names a row
  twice, so no two additions ever race and the sum is the same bits on every run and device.
  Otherwise one fp32 ``index_add_`` (atomic on CUDA: fast, order not fixed).

Shapes: ``x [T, ...]``, ``index [N]`` int64 with values in ``[0, T)`` -> ``[N, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RowGather:
    """A gather ``x[index]`` over ``num_rows`` rows and, built lazily, its deterministic plan.

    Attributes:
        index: ``[N]`` int64 rows to read, values in ``[0, num_rows)``.
        num_rows: ``T``.
    """

    index: torch.Tensor
    num_rows: int
    _passes: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = field(
        default=None, repr=False, compare=False)

    def rank_passes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(rows_r, sources_r)]`` for ``r = 0 .. max multiplicity - 1``: ``sources_r`` are the
        positions in ``index`` of the ``r``-th occurrence (in index order) of each row that
        occurs more than ``r`` times, ``rows_r`` those rows (each at most once per pass).
        Built once (one host sync), then reused by every layer of the step."""
        if self._passes is not None:
            return self._passes
        index = self.index
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.num_rows)
        starts = torch.cumsum(counts, 0) - counts
        sorted_rows = index[order]
        rank = torch.arange(index.numel(), device=index.device) - starts[sorted_rows]
        # group the occurrences by rank (stable: rows stay in ascending order within a pass)
        by_rank = torch.argsort(rank, stable=True)
        sizes = torch.bincount(rank).tolist() if index.numel() else []
        rows = sorted_rows[by_rank].split(sizes)
        sources = order[by_rank].split(sizes)
        self._passes = list(zip(rows, sources))
        return self._passes


def scatter_add_rows(grad: torch.Tensor, gather: RowGather, deterministic: bool) -> torch.Tensor:
    """``out[t] = sum_{n: index[n] = t} grad[n]`` as fp32 ``[T, ...]`` (fp64 for fp64 ``grad``).

    ``deterministic``: add the occurrences rank by rank (:meth:`RowGather.rank_passes`): a
    fixed order with no row named twice in one call; else one ``index_add_``."""
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = grad.new_zeros((gather.num_rows, *grad.shape[1:]), dtype=acc_dtype)
    if not deterministic:
        return out.index_add_(0, gather.index, grad.to(acc_dtype))
    for rows, sources in gather.rank_passes():
        out.index_add_(0, rows, grad.index_select(0, sources).to(acc_dtype))
    return out


class GatherRowsFunction(torch.autograd.Function):
    """``y = x.index_select(0, gather.index)``; the backward is :func:`scatter_add_rows`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gather: RowGather) -> torch.Tensor:
        ctx.gather = gather
        ctx.x_dtype = x.dtype
        return x.index_select(0, gather.index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        det = torch.are_deterministic_algorithms_enabled()
        return scatter_add_rows(grad, ctx.gather, det).to(ctx.x_dtype), None


def gather_rows(x: torch.Tensor, gather: RowGather) -> torch.Tensor:
    """``x [T, ...]`` -> ``x[gather.index]`` ``[N, ...]`` with the fp32 (and, under
    ``torch.use_deterministic_algorithms``, order-fixed) backward of the module docstring."""
    if x.shape[0] != gather.num_rows:
        raise ValueError(f"gather_rows: x has {x.shape[0]} rows, the gather was built for "
                         f"{gather.num_rows}")
    return GatherRowsFunction.apply(x, gather)
