"""Packed varlen attention: every backend against independent references.

* ``reference`` (dense [T, T] mask from the metadata) is checked against the attention rule
  written out token by token in Python.
* ``sdpa_segments`` (the CPU default) is checked against ``reference`` in float64 (forward and
  gradients of q, k, v), and in fp32 / bf16 against the float64 result.
* The key layout handed to flash-attn / torch varlen (``flash_layout``) is checked by running it
  through an emulation of flash-attn's documented varlen semantics (bottom-right causal).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from varlen_layouts import random_layout

from fastrm.attention import (
    ENV_VAR,
    VarlenMetadata,
    flash_attn_available,
    flash_layout,
    select_backend,
    varlen_attention,
)


def rule_mask(cu: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The attention rule, token by token (independent of the library's vectorised mask)."""
    cu_l, pre = cu.tolist(), prefix.tolist()
    t = cu_l[-1]
    m = torch.zeros(t, t, dtype=torch.bool)
    for s in range(len(cu_l) - 1):
        a, b = pre[s]
        for i in range(cu_l[s], cu_l[s + 1]):
            for j in range(t):
                m[i, j] = (cu_l[s] <= j <= i) or (a <= j < b)
    return m


def emulate_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
    """flash-attn's documented varlen semantics: batch ``b`` uses ``q[cu_q[b]:cu_q[b+1]]`` and
    ``k[cu_k[b]:cu_k[b+1]]``; with ``causal`` the mask is aligned to the bottom-right corner:
    query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``. GQA: query head h reads kv head
    ``h // (H / H_kv)``."""
    assert causal
    h, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert max(b - a for a, b in zip(cq, cq[1:])) == max_q
    assert max(b - a for a, b in zip(ck, ck[1:])) == max_k
    for b in range(len(cq) - 1):
        qb = q[cq[b]: cq[b + 1]]
        kb = k[ck[b]: ck[b + 1]].repeat_interleave(h // hk, dim=1)
        vb = v[ck[b]: ck[b + 1]].repeat_interleave(h // hk, dim=1)
        lq, lk = qb.shape[0], kb.shape[0]
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), vb))
    return torch.cat(outs)


def qkv(t, h, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(t, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(h), mk(hk), mk(hk)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_prefix", [False, True])
def test_dense_mask_matches_rule(seed, with_prefix):
    cu, pre = random_layout(random.Random(seed), with_prefix)
    meta = VarlenMetadata.build(cu, pre)
    assert torch.equal(meta.dense_mask(), rule_mask(cu, pre))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_segments_matches_reference_float64(seed, with_prefix, heads):
    h, hk = heads
    cu, pre = random_layout(random.Random(100 + seed), with_prefix)
    t = int(cu[-1])
    q, k, v = qkv(t, h, hk, 8, torch.float64, seed)
    go = torch.randn(t, h, 8, dtype=torch.float64)
    outs, grads = [], []
    for backend in ("sdpa_segments", "reference"):
        out = varlen_attention(q, k, v, cu, pre, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), go))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("with_prefix", [False, True])
def test_sdpa_segments_low_precision(dtype, tol, with_prefix):
    cu, pre = random_layout(random.Random(7), with_prefix, max_len=17)
    t = int(cu[-1])
    q, k, v = qkv(t, 4, 2, 16, dtype, 3)
    out = varlen_attention(q, k, v, cu, pre, backend="sdpa_segments")
    assert out.dtype == dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = varlen_attention(q64, k64, v64, cu, pre, backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    go = torch.randn(t, 4, 16, dtype=torch.float64)
    g = torch.autograd.grad(out, (q, k, v), go.to(dtype))
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), go)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=tol * 4, atol=tol * 4)


def test_single_full_segment_and_all_length_one():
    # one segment filling the row (fast path: no gather) and a row of length-1 segments
    for lens in ([23], [1] * 9):
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        t = int(cu[-1])
        q, k, v = qkv(t, 4, 2, 8, torch.float64, 1)
        a = varlen_attention(q, k, v, cu, backend="sdpa_segments")
        b = varlen_attention(q, k, v, cu, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a row of length-1 segments: each token only sees itself -> output is v (GQA-expanded)
    torch.testing.assert_close(a, v.repeat_interleave(2, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_flash_layout_with_emulated_flash_attn(seed, heads):
    """The gathered key layout + bottom-right causal flash semantics == the rule."""
    h, hk = heads
    cu, pre = random_layout(random.Random(200 + seed), with_prefix=True)
    t = int(cu[-1])
    q, k, v = qkv(t, h, hk, 8, torch.float64, seed)
    meta = VarlenMetadata.build(cu, pre)
    k2, v2, cu_q, cu_k, max_q, max_k = flash_layout(k, v, meta)
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert k2.shape[0] == t + int((pre[:, 1] - pre[:, 0]).sum())
    out = emulate_flash_varlen(q, k2, v2, cu_q, cu_k, max_q, max_k, causal=True)
    ref = varlen_attention(q, k, v, metadata=meta, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    g1 = torch.autograd.grad(out, (q, k, v), go)
    g2 = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_segment_plan_groups_equal_lengths():
    # 6 segments with 3 distinct (L, P): 3 SDPA calls, not 6
    cu = torch.tensor([0, 2, 4, 5, 6, 9, 11], dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [6, 9]], dtype=torch.int32)
    plan = VarlenMetadata.build(cu, pre).segment_plan()
    got = sorted((g.num_segments, g.query_len, g.prefix_len) for g in plan.groups)
    assert got == [(1, 2, 3), (1, 3, 0), (2, 1, 0), (2, 2, 0)]
    assert plan.query_index is not None and plan.key_index is not None
    assert plan.query_sizes == [g.num_segments * g.query_len for g in plan.groups]
    # plain equal-length row keeps token order (no permutation)
    cu2 = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    assert VarlenMetadata.build(cu2).segment_plan().inverse_index is None
    # all lengths distinct: token order, no query gather, no inverse
    cu3 = torch.tensor([0, 5, 6, 9, 16], dtype=torch.int32)
    plan3 = VarlenMetadata.build(cu3).segment_plan()
    assert plan3.query_index is None and plan3.inverse_index is None and plan3.key_index is None
    assert [g.query_len for g in plan3.groups] == [5, 1, 3, 7]


def test_backend_selection(monkeypatch):
    q = torch.randn(4, 2, 8)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend(q) == "sdpa_segments"
    # CPU bf16: fastrm's native kernels where this CPU runs them, never a CUDA kernel
    from fastrm.attention.varlen import cpu_flash_unavailable_reason

    expect = "sdpa_segments" if cpu_flash_unavailable_reason(q.bfloat16()) else "cpu_flash"
    assert select_backend(q.bfloat16()) == expect
    assert select_backend(q, "reference") == "reference"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend(q) == "reference"
    assert select_backend(q, "sdpa_segments") == "sdpa_segments"  # argument beats env
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FASTRM_ATTENTION_BACKEND"):
        select_backend(q)
    with pytest.raises(ValueError, match="not known"):
        select_backend(q, "flash")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attn_missing_gives_clear_error():
    q, k, v = qkv(5, 2, 2, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="'flash_attn'.*flash-attn is not installed"):
        varlen_attention(q, k, v, torch.tensor([0, 2, 5]), backend="flash_attn")


def test_cuda_backends_refuse_cpu_tensors():
    q, k, v = qkv(5, 2, 2, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="'torch_varlen'.*CUDA tensors"):
        varlen_attention(q, k, v, torch.tensor([0, 2, 5]), backend="torch_varlen")


def test_bad_layouts_raise_value_error():
    with pytest.raises(ValueError, match="start at 0"):
        VarlenMetadata.build(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="strictly increasing"):
        VarlenMetadata.build(torch.tensor([0, 3, 3, 5]))
    with pytest.raises(ValueError, match="segment_prefix must be"):
        VarlenMetadata.build(torch.tensor([0, 3, 5]), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="overlap"):
        VarlenMetadata.build(torch.tensor([0, 3, 5]), torch.tensor([[0, 0], [2, 4]]))
    with pytest.raises(ValueError, match=r"segment_prefix\[1\]"):
        VarlenMetadata.build(torch.tensor([0, 3, 5]), torch.tensor([[0, 0], [0, 9]]))
    q, k, v = qkv(5, 2, 2, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="cu_seqlens ends at"):
        varlen_attention(q, k, v, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="H % H_kv"):
        varlen_attention(q, k[:, :1].expand(5, 1, 8), v, torch.tensor([0, 2, 5]))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_flex_backend_forward_matches_reference(heads):
    """FlexAttention with the metadata's block mask (CPU: eager, forward only)."""
    h, hk = heads
    cu, pre = random_layout(random.Random(300), with_prefix=True, max_len=70)
    t = int(cu[-1])
    q, k, v = (x.detach() for x in qkv(t, h, hk, 16, torch.float32, 5))
    with torch.no_grad():
        out = varlen_attention(q, k, v, cu, pre, backend="flex")
        ref = varlen_attention(q.double(), k.double(), v.double(), cu, pre, backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="no backward on CPU"):
        varlen_attention(q.requires_grad_(), k, v, cu, pre, backend="flex")
