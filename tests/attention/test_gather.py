"""The prefix-key gather: fp32 accumulation of repeated rows, and its deterministic order.

References: a float64 one-hot matrix product (``grad_x = E^T grad_y`` with ``E[n, index[n]] = 1``)
and, for the precision claim, a bf16 accumulation written out step by step (what autograd's
``index_select`` backward does in the input's dtype).
"""

from __future__ import annotations

import random

import pytest
import torch
from varlen_layouts import random_layout

from fastrm.attention import RowGather, VarlenMetadata, gather_rows, varlen_attention
from fastrm.attention.gather import scatter_add_rows


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for one test, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _one_hot_reference(index: torch.Tensor, num_rows: int, grad: torch.Tensor) -> torch.Tensor:
    e = torch.zeros(index.numel(), num_rows, dtype=torch.float64)
    e[torch.arange(index.numel()), index] = 1.0
    return (e.t() @ grad.double().reshape(index.numel(), -1)).reshape(num_rows, *grad.shape[1:])


@pytest.mark.parametrize("det", [False, True], ids=["index_add", "rank_passes"])
@pytest.mark.parametrize("seed", range(3))
def test_backward_matches_float64_one_hot(det, seed, request):
    if det:
        request.getfixturevalue("deterministic")
    g = torch.Generator().manual_seed(seed)
    t = 13
    # repeats of every multiplicity from 0 to 6, in shuffled order
    index = torch.cat([torch.full((m,), r) for r, m in enumerate([0, 1, 6, 2, 1, 3, 1, 0, 1, 5, 1, 1, 4])])
    index = index[torch.randperm(index.numel(), generator=g)]
    x = torch.randn(t, 3, 5, generator=g).requires_grad_()
    y = gather_rows(x, RowGather(index, t))
    torch.testing.assert_close(y, x.detach()[index], rtol=0, atol=0)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    torch.testing.assert_close(x.grad.double(), _one_hot_reference(index, t, gy), rtol=1e-6, atol=1e-6)


def test_rank_passes_name_each_row_once_per_pass():
    index = torch.tensor([4, 1, 4, 0, 4, 1, 2])
    passes = RowGather(index, 6).rank_passes()
    assert len(passes) == 3  # row 4 occurs 3 times
    seen = []
    for rows, sources in passes:
        assert rows.unique().numel() == rows.numel()
        assert torch.equal(index[sources], rows)
        seen += sources.tolist()
    assert sorted(seen) == list(range(index.numel()))
    # the r-th pass holds the r-th occurrence in index order
    assert passes[0][1].tolist() == [3, 1, 6, 0] and passes[1][1].tolist() == [5, 2]
    assert passes[2][1].tolist() == [4]


@pytest.mark.parametrize("det", [False, True], ids=["index_add", "rank_passes"])
def test_bf16_repeats_accumulate_in_fp32(det, request):
    """A prompt key shared by 64 responses: one large gradient, then 64 small ones of a quarter
    bf16 ulp each. Summed in bf16 every small one rounds away (1.0 stays 1.0); summed in fp32
    and rounded once, the result is the exact 1.125."""
    if det:
        request.getfixturevalue("deterministic")
    n_small = 64
    index = torch.zeros(1 + n_small, dtype=torch.int64)
    index = torch.cat([index, torch.tensor([1])])  # a second row, used once
    grad = torch.full((index.numel(), 2), 2.0 ** -9)
    grad[0] = 1.0
    grad[-1] = 0.5
    grad = grad.bfloat16()
    exact = _one_hot_reference(index, 2, grad)
    assert exact[0, 0] == 1.125

    # what a bf16 accumulation (autograd's index_select backward) computes, step by step
    acc = torch.zeros(2, 2, dtype=torch.bfloat16)
    for n, row in enumerate(index.tolist()):
        acc[row] = acc[row] + grad[n]
    assert (acc.double() - exact).abs().max() >= 0.1  # visibly lost

    x = torch.zeros(2, 2, dtype=torch.bfloat16, requires_grad=True)
    gather_rows(x, RowGather(index, 2)).backward(grad)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), exact, rtol=0, atol=0)


def test_deterministic_flag_selects_rank_passes(monkeypatch, deterministic):
    calls = []
    real = RowGather.rank_passes

    def spy(self):
        calls.append(self.index.numel())
        return real(self)

    monkeypatch.setattr(RowGather, "rank_passes", spy)
    cu, pre = random_layout(random.Random(5), with_prefix=True, groups=(3, 4), prefix_prob=1.0,
                            responses=(3, 4))
    t = int(cu[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, n, 8, generator=g, dtype=torch.float64).requires_grad_()
               for n in (4, 2, 2))
    go = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    grads = []
    for _ in range(2):
        out = varlen_attention(q, k, v, cu, pre, backend="sdpa_segments")
        grads.append(torch.autograd.grad(out, (q, k, v), go))
    assert calls, "the deterministic backward (rank passes) did not run"
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    ref = varlen_attention(q, k, v, cu, pre, backend="reference")
    for a, b in zip(grads[0], torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_without_the_flag_one_index_add(monkeypatch):
    monkeypatch.setattr(RowGather, "rank_passes", lambda self: pytest.fail("rank passes ran"))
    assert not torch.are_deterministic_algorithms_enabled()
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    out = scatter_add_rows(torch.ones(6, 3, dtype=torch.bfloat16), RowGather(index, 4), False)
    assert out.dtype == torch.float32
    assert out[:, 0].tolist() == [2.0, 1.0, 3.0, 0.0]


def test_prefix_key_grads_bf16_close_to_float64():
    """Many responses per prompt (each prompt key gathered ~8 times) in bf16: the k / v
    gradients stay within a bf16 rounding or two of the float64 reference."""
    cu, pre = random_layout(random.Random(11), with_prefix=True, groups=(2, 2), prefix_prob=1.0,
                            responses=(8, 8), max_len=6)
    meta = VarlenMetadata.build(cu, pre)
    assert int(torch.bincount(meta.key_gather().key_index).max()) >= 9
    t = int(cu[-1])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(t, n, 16, generator=g, dtype=torch.float64) for n in (2, 1, 1))
    go = torch.randn(t, 2, 16, generator=g, dtype=torch.float64)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*low, metadata=meta, backend="sdpa_segments")
    got = torch.autograd.grad(out, low, go.bfloat16())
    ref_in = [x.bfloat16().double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention(*ref_in, metadata=meta, backend="reference")
    want = torch.autograd.grad(ref, ref_in, go.bfloat16().double())
    for a, b, name in zip(got, want, "qkv"):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1.5e-2, f"grad {name}: relative error {err:.2e}"


def test_gather_rows_checks_row_count():
    with pytest.raises(ValueError, match="x has 3 rows"):
        gather_rows(torch.zeros(3, 2), RowGather(torch.tensor([0, 1]), 4))
