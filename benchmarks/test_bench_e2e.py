"""pytest-benchmark: one end-to-end training step (fwd + bwd + AdamW) per layout on a tiny model.

Run with ``pytest benchmarks/test_bench_e2e.py --benchmark-enable`` (without it each case runs
once, as a smoke test). The side-by-side table with memory and FLOP/s is
``python benchmarks/bench_e2e.py --quick``.

Every case first checks that its layout's loss equals a float64 reference on the same
comparisons from the same weights (each sequence alone, no padding, no packing), so a timing never
belongs to a layout that does other work.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_e2e import LAYOUTS, collate, loss_of, make_optimizer, random_groups  # noqa: E402

from fastrm import RewardLoss  # noqa: E402

TINY = common.ModelSpec("tiny", "llama3", 512, 2, 4, 2, 64, 128, "2 layers, D=64")
# (name, responses per prompt, prompt length spec, response length spec)
DATA = [
    ("pairs-longtail", 2, ("lognormal", 24, 0.8), ("lognormal", 48, 0.9)),
    ("k4-long-prompt", 4, ("lognormal", 96, 0.3), ("lognormal", 24, 0.5)),
]


def reference_loss(model, groups) -> torch.Tensor:
    """Bradley-Terry mean over every comparison, in float64: each full sequence (prompt +
    response) alone through a float64 copy of the model, the reward at its last token."""
    ref = copy.deepcopy(model).double()
    terms = []
    with torch.no_grad():
        for g in groups:
            r = [ref.head(ref.forward_padded(torch.tensor([g.prompt_tokens + resp]))[0, -1])[0]
                 for resp in g.responses]
            terms += [F.softplus(-(r[i] - r[j])) for i, j, _ in g.comparisons]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("data", DATA, ids=[d[0] for d in DATA])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_e2e_step(benchmark, layout, data):
    name, k, plen, rlen = data
    groups = random_groups(4, k, plen, rlen, seed=7, vocab=TINY.vocab_size, cap=256)
    model = common.build_model(TINY, 512, seed=3)
    loss_fn = RewardLoss()
    batch = collate(layout, groups)
    # same comparisons, same weights: the layout's loss must be the reference's
    loss = loss_of(layout, model, loss_fn, batch).detach()
    torch.testing.assert_close(loss.double(), reference_loss(model, groups), rtol=1e-5, atol=1e-5)
    opt = make_optimizer(model)

    def step():
        out = loss_of(layout, model, loss_fn, batch)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    result = benchmark(step)
    assert torch.isfinite(result)
