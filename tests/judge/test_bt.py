"""Bradley-Terry margin formula and the maximum-likelihood beta fit."""

from __future__ import annotations

import math

import pytest
import torch

from fastrm.judge.bt import fit_beta, margin_from_prob, prob_from_margin


def test_margin_formula_hand_values():
    # logit(0.8) = log 4; beta = 2 -> log(4) / 2 = log 2
    assert margin_from_prob(0.8, beta=2.0) == pytest.approx(math.log(2.0), abs=1e-12)
    assert margin_from_prob(0.5, beta=0.3) == 0.0
    assert margin_from_prob(0.2, beta=1.0) == pytest.approx(-math.log(4.0), abs=1e-12)
    # clamped at eps: finite for p in {0, 1}
    assert margin_from_prob(1.0, beta=1.0, eps=1e-6) == pytest.approx(math.log((1 - 1e-6) / 1e-6))
    with pytest.raises(ValueError, match="beta"):
        margin_from_prob(0.7, beta=0.0)


def test_margin_roundtrip_random():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(1000, generator=g, dtype=torch.float64) * 0.98 + 0.01
    for beta in (0.25, 1.0, 3.7):
        m = margin_from_prob(p, beta)
        assert torch.allclose(prob_from_margin(m, beta), p, atol=1e-12)
        # BT: P(a > b) = sigmoid(beta * (s_a - s_b)) with s_a - s_b = margin
        assert torch.allclose(torch.sigmoid(beta * m), p, atol=1e-12)


def _golden_section(f, lo, hi, tol=1e-9):
    """Derivative-free minimiser of a unimodal function: the independent reference for Newton."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    x = (a + b) / 2
    return x, f(x)


@pytest.mark.parametrize("beta_true", [0.4, 1.0, 2.5])
def test_fit_beta_recovers_known_beta(beta_true):
    g = torch.Generator().manual_seed(int(beta_true * 100))
    n = 20000
    d = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    y = torch.bernoulli(torch.sigmoid(beta_true * d), generator=g)
    fit = fit_beta(d, y)
    assert abs(fit.beta - beta_true) < 4 * fit.stderr
    assert fit.stderr < 0.05 * beta_true + 0.02

    # independent optimiser on the same likelihood
    def nll(b):
        z = b * d
        return float((y * torch.nn.functional.softplus(-z) + (1 - y) * torch.nn.functional.softplus(z)).mean())

    x, fx = _golden_section(nll, -10.0, 10.0)
    assert fit.beta == pytest.approx(x, abs=1e-5)
    assert fit.nll == pytest.approx(fx, abs=1e-9)


def test_fit_beta_from_simulated_judgements_with_soft_labels():
    # judges report probabilities: labels may be soft (expected log-likelihood)
    g = torch.Generator().manual_seed(11)
    d = torch.randn(5000, generator=g, dtype=torch.float64)
    p = torch.sigmoid(1.8 * d)
    fit = fit_beta(d, p)  # soft labels equal to the model probability: the MLE is exactly 1.8
    assert fit.beta == pytest.approx(1.8, abs=1e-6)


def test_fit_beta_rejects_bad_input():
    with pytest.raises(ValueError, match="separable"):
        fit_beta([1.0, 2.0, -1.0], [1, 1, 0])
    with pytest.raises(ValueError, match="empty"):
        fit_beta([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_beta([1.0, -1.0], [2, 0])
    with pytest.raises(ValueError, match="identifiable"):
        fit_beta([0.0, 0.0], [1, 0])
