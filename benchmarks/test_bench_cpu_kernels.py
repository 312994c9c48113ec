"""pytest-benchmark: fastrm's CPU kernels vs the torch paths they replace.

* packed attention fwd+bwd, bf16: ``cpu_flash`` vs ``sdpa_segments`` (skipped, with the reason,
  on CPUs without AVX-512 BF16);
* two SmolLM2-shaped decoder layers fwd+bwd: fused layer ops vs torchtune's modules.

Run with ``FASTRM_BENCH_THREADS=1 pytest benchmarks/test_bench_cpu_kernels.py --benchmark-enable``
(without the flag each case runs once, as a smoke test). The tables with memory are
``python benchmarks/bench_cpu_kernels.py``.

Each timed path is checked against a reference that is not itself: attention (either backend)
against a float64 per-segment softmax attention written here with plain torch, forward and
gradients; the fused decoder layers against torchtune's modules in float32 with the same
weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_kernels import HD, attention_inputs, layouts  # noqa: E402

from fastrm.attention import varlen_attention  # noqa: E402
from fastrm.attention.varlen import cpu_flash_unavailable_reason  # noqa: E402

_REASON = cpu_flash_unavailable_reason(torch.zeros(1, 1, HD, dtype=torch.bfloat16))
LAYOUTS = layouts(quick=True)


def segment_attention_float64(q, k, v, cu, pre):
    """Causal attention per segment in float64, a segment's queries also attending to every key
    of its prefix ``pre[s] = (start, end)`` (empty when ``start == end``); GQA by repeating kv
    heads. ``q [T, H, D]``, ``k, v [T, H_kv, D]`` -> ``[T, H, D]``."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    for s, (a, b) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        p0, p1 = pre[s].tolist()
        keys = torch.cat([k[p0:p1], k[a:b]]).double().repeat_interleave(rep, 1)
        vals = torch.cat([v[p0:p1], v[a:b]]).double().repeat_interleave(rep, 1)
        n, p = b - a, p1 - p0
        allowed = torch.ones(n, p + n, dtype=torch.bool)
        allowed[:, p:] = torch.ones(n, n, dtype=torch.bool).tril()
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), keys) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vals))
    return torch.cat(outs)


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.skipif(bool(_REASON), reason=f"cpu_flash cannot run here: {_REASON}")
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[n.split(" (")[0].replace(" ", "_") for n in LAYOUTS])
@pytest.mark.parametrize("backend", ["sdpa_segments", "cpu_flash"])
def test_packed_attention_fwd_bwd(benchmark, backend, layout):
    q, k, v, go, meta = attention_inputs(*LAYOUTS[layout])

    def run():
        out = varlen_attention(q, k, v, metadata=meta, backend=backend)
        return out, torch.autograd.grad(out, (q, k, v), go)

    out, grads = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    cu, pre = LAYOUTS[layout]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = segment_attention_float64(q64, k64, v64, cu, pre)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    assert _rel(out, ref) < 1e-2  # bf16 inputs and output
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert _rel(g, r) < 2e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["torchtune_modules", "fused_ops"])
def test_decoder_layers_fwd_bwd(benchmark, fused, dtype):
    from fastrm.data import collate_packed
    from fastrm.data.group import PreferenceGroup
    from fastrm.models import reward_model

    torch.manual_seed(0)
    model = reward_model("fastrm.models.smollm2.smollm2_135m", fused_ops=fused)
    model.decoder.layers = model.decoder.layers[:2]
    model.to(dtype)
    g = torch.Generator().manual_seed(1)
    groups = [PreferenceGroup(prompt_tokens=torch.randint(100, 40000, (600,), generator=g).tolist(),
                              responses=[torch.randint(100, 40000, (n,), generator=g).tolist()
                                         for n in (90, 120)],
                              comparisons=[(0, 1, None)], prompt_id=i, source_index=i)
              for i in range(4)]
    batch = collate_packed(groups, prefix_sharing=False)

    def run():
        model.zero_grad(set_to_none=True)
        h = model(batch)
        h.float().square().mean().backward()
        return h.detach()

    h = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert torch.isfinite(h).all() and all(  # the head is not in this loss
        p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    if fused:  # the same weights through torchtune's modules in float32 (its RMSNorm computes
        # in float32 whatever the dtype, so float64 would buy nothing)
        ref_model = reward_model("fastrm.models.smollm2.smollm2_135m", fused_ops=False)
        ref_model.decoder.layers = ref_model.decoder.layers[:2]
        ref_model.load_state_dict(model.state_dict())
        with torch.no_grad():
            ref = ref_model(batch)
        assert _rel(h, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
