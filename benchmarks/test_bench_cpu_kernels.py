"""pytest-benchmark: fastrm's CPU kernels vs the torch paths they replace.

* packed attention fwd+bwd, bf16: ``cpu_flash`` vs ``sdpa_segments`` (skipped, with the reason,
  on CPUs without AVX-512 BF16);
* two SmolLM2-shaped decoder layers fwd+bwd: fused layer ops vs torchtune's modules.

Run with ``FASTRM_BENCH_THREADS=1 pytest benchmarks/test_bench_cpu_kernels.py --benchmark-enable``
(without the flag each case runs once, as a smoke test). The tables with memory are
``python benchmarks/bench_cpu_kernels.py``.
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




@pytest.mark.skipif(bool(_REASON), reason=f"cpu_flash cannot run here: {_REASON}")
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[n.split(" (")[0].replace(" ", "_") for n in LAYOUTS])
@pytest.mark.parametrize("backend", ["sdpa_segments", "cpu_flash"])
def test_packed_attention_fwd_bwd(benchmark, backend, layout):
    q, k, v, go, meta = attention_inputs(*LAYOUTS[layout])

    def run():
        out = varlen_attention(q, k, v, metadata=meta, backend=backend)
        return out, torch.autograd.grad(out, (q, k, v), go)

    out, _ = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    ref = varlen_attention(q, k, v, metadata=meta, backend="sdpa_segments")
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-2


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
