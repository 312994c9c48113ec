"""The native CPU attention kernels (backend ``cpu_flash``, bf16, AVX-512 BF16) against the
float64 reference (dense rule mask), forward and the gradients of q, k and v.

Layouts are random (plain sequences, prompts shared by several responses, prefixes that span
several segments), lengths cross the kernels' 64-token blocks, head dims and GQA groupings vary.
The bar for bf16: relative (Frobenius) error at most 1.5x that of torch's own SDPA kernel on
the same bf16 inputs (``sdpa_segments``), plus a small floor, so a wrong mask, scale or
accumulation shows up as an order-of-magnitude miss.
"""

from __future__ import annotations

import random

import pytest
import torch
from varlen_layouts import random_layout

from fastrm.attention import VarlenMetadata, select_backend, varlen_attention
from fastrm.attention.varlen import cpu_flash_unavailable_reason

_REASON = cpu_flash_unavailable_reason(torch.zeros(1, 1, 64, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(bool(_REASON), reason=f"cpu_flash cannot run here: {_REASON}")


def _layout(rng: random.Random, with_prefix: bool, max_len: int):
    return random_layout(rng, with_prefix, max_len, groups=(1, 4), prefix_prob=0.7,
                         responses=(1, 4), response_max=max_len // 2 + 1)


def _qkv(t, h, hk, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(t, h, d, generator=g) * scale).bfloat16().requires_grad_()
    k = torch.randn(t, hk, d, generator=g).bfloat16().requires_grad_()
    v = torch.randn(t, hk, d, generator=g).bfloat16().requires_grad_()
    go = torch.randn(t, h, d, generator=g).bfloat16()
    return q, k, v, go


def _run(backend, q, k, v, go, meta):
    out = varlen_attention(q, k, v, metadata=meta, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), go)
    return [out.detach()] + list(grads)


def _rel(a, b):
    # relative error; a reference that is (near) zero, e.g. dq of length-1 segments, is
    # measured in absolute terms instead
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0))


def _check(cu, pre, h, hk, d, seed, scale=1.0):
    t = int(cu[-1])
    q, k, v, go = _qkv(t, h, hk, d, seed, scale)
    meta = VarlenMetadata.build(cu, pre)
    got = _run("cpu_flash", q, k, v, go, meta)
    sdpa = _run("sdpa_segments", q, k, v, go, meta)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _run("reference", q64, k64, v64, go.double(), meta)
    assert got[0].dtype == torch.bfloat16 and got[0].shape == (t, h, d)
    for name, a, s_, r in zip(("out", "dq", "dk", "dv"), got, sdpa, ref):
        err, bar = _rel(a, r), 1.5 * _rel(s_, r) + 2e-3
        assert err <= bar, f"{name}: cpu_flash error {err:.2e} > {bar:.2e} (sdpa {_rel(s_, r):.2e})"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 2), (6, 1)])
def test_matches_reference_random_layouts(seed, with_prefix, heads):
    cu, pre = _layout(random.Random(seed * 31 + heads[0]), with_prefix, max_len=150)
    _check(cu, pre, *heads, 64, seed)


@pytest.mark.parametrize("d", [16, 32, 48, 128])
def test_head_dims(d):
    cu, pre = _layout(random.Random(d), True, max_len=90)
    _check(cu, pre, 4, 2, d, d)


def test_block_edges_and_long_segments():
    # lengths at and around the 64-token blocks, a long prompt shared by several responses
    lens = [63, 64, 65, 1, 300, 129, 2, 70]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    start = int(cu[4])
    pre = torch.zeros(len(lens), 2, dtype=torch.int32)
    for s in (5, 6, 7):
        pre[s] = torch.tensor([start, start + 300])
    _check(cu, pre, 9, 3, 64, 5)


def test_prefix_spanning_several_segments():
    # segment 3's prefix covers the end of segment 0, all of 1 and the start of 2: the three
    # share keys, so they form one key group with 3
    cu = torch.tensor([0, 40, 50, 120, 160, 170], dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, 0], [0, 0], [30, 90], [0, 0]], dtype=torch.int32)
    meta = VarlenMetadata.build(cu, pre)
    plan = meta.cpu_flash_plan()
    groups = [plan.group_segments[a:b].tolist()
              for a, b in zip(plan.group_offsets[:-1].tolist(), plan.group_offsets[1:].tolist())]
    assert groups == [[0, 1, 2, 3], [4]]
    assert plan.group_rows.tolist() == [160, 10]
    assert plan.token_local[165].item() == 5 and plan.token_local[100].item() == 100
    _check(cu, pre, 4, 2, 64, 11)


def test_large_scores_stay_stable():
    """Scores in the hundreds (online softmax rescaling across blocks, exp saturation)."""
    cu = torch.tensor([0, 200, 330], dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, 200]], dtype=torch.int32)
    _check(cu, pre, 4, 2, 64, 3, scale=12.0)


def test_results_do_not_depend_on_thread_count():
    cu, pre = _layout(random.Random(9), True, max_len=120)
    t = int(cu[-1])
    q, k, v, go = _qkv(t, 9, 3, 64, 9)
    meta = VarlenMetadata.build(cu, pre)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append(_run("cpu_flash", q, k, v, go, meta))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_gqa_expanded_views_are_accepted():
    """torchtune expands k / v to every query head before attention; the packed path hands the
    kernel strided views of one head per group."""
    cu = torch.tensor([0, 33, 90], dtype=torch.int32)
    q, k, v, go = _qkv(90, 6, 2, 32, 4)
    k_exp = k.detach().repeat_interleave(3, dim=1)[:, ::3].requires_grad_()
    v_exp = v.detach().repeat_interleave(3, dim=1)[:, ::3].requires_grad_()
    assert not k_exp.is_contiguous()
    meta = VarlenMetadata.build(cu)
    a = _run("cpu_flash", q, k, v, go, meta)
    b = _run("cpu_flash", q, k_exp, v_exp, go, meta)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_auto_selection_and_clear_refusals():
    q = torch.zeros(5, 4, 64, dtype=torch.bfloat16)
    assert select_backend(q) == "cpu_flash"
    assert select_backend(q.float()) == "sdpa_segments"
    assert select_backend(q, dropout_p=0.1) == "sdpa_segments"  # automatic choice only
    assert "bf16" in cpu_flash_unavailable_reason(q.float())
    assert "multiple of 16" in cpu_flash_unavailable_reason(torch.zeros(5, 4, 24, dtype=torch.bfloat16))
    assert "dropout" in cpu_flash_unavailable_reason(q, dropout_p=0.1)
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="'cpu_flash'.*sdpa_segments"):
        varlen_attention(q.float(), q.float()[:, :2], q.float()[:, :2], cu, backend="cpu_flash")
    with pytest.raises(ValueError, match="dropout"):
        varlen_attention(q, q[:, :2], q[:, :2], cu, backend="cpu_flash", dropout_p=0.1)
