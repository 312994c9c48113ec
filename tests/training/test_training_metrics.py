"""Reward statistics as additive sums: equal to the direct float64 formulas on fresh random
rewards, and summing parts (micro-batches, ranks, categories) gives the whole."""

import pytest
import torch

from fastrm.training.metrics import ComparisonSums, LossSums, all_reduce


def _direct(r, ci, ri):
    r = r.double()
    d = r[ci] - r[ri]
    return {"accuracy": (d > 0).double().mean().item(), "margin": d.mean().item(),
            "chosen_reward": r[ci].mean().item(), "rejected_reward": r[ri].mean().item(),
            "reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "comparisons": float(ci.numel())}


@pytest.mark.parametrize("seed", range(3))
def test_sums_match_direct_formulas_and_add_up(seed):
    g = torch.Generator().manual_seed(seed)
    n, p = 37, 53  # more comparisons than rewards: responses in several comparisons
    r = torch.randn(n, generator=g) * 3 + 1
    ci, ri = torch.randint(0, n, (p,), generator=g), torch.randint(0, n, (p,), generator=g)
    got = ComparisonSums.of(r, ci, ri).metrics()
    for k, v in _direct(r, ci, ri).items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # two micro-batches (rewards split, comparisons re-indexed) add up to the whole
    cut = 20
    first = (ci < cut) & (ri < cut)
    second = (ci >= cut) & (ri >= cut)
    a = ComparisonSums.of(r[:cut], ci[first], ri[first])
    b = ComparisonSums.of(r[cut:], ci[second] - cut, ri[second] - cut)
    both = torch.cat([r[:cut], r[cut:]])
    keep = first | second
    whole = ComparisonSums.of(both, ci[keep], ri[keep]).metrics()
    for k, v in (a + b).metrics().items():
        assert v == pytest.approx(whole[k], rel=1e-9, abs=1e-12), k


def test_all_reduce_is_identity_in_one_process():
    s, l = ComparisonSums(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0), LossSums(1.5, 2.0, 3.0, 4.0)
    assert all_reduce([s, l], torch.device("cpu")) == [s, l]
    assert ComparisonSums.from_tensor(s.to_tensor()) == s
