"""Bradley-Terry margins and the maximum-likelihood fit of the BT scale ``beta``.

Model: responses have latent scores ``s``; ``P(a > b) = sigmoid(beta * (s_a - s_b))``.
A judge gives ``p = P(a > b)``; the implied score difference, used as the pair's ``margin``, is

    margin = s_a - s_b = logit(p) / beta,      logit(p) = log(p / (1 - p)).

``beta`` is set in the config, or fitted on a labelled calibration set of ``(d_i, y_i)``
(``d`` a score difference, ``y`` in [0, 1] the label / probability that the first wins) by
maximising the log-likelihood

    L(beta) = sum_i w_i [ y_i log sigmoid(beta d_i) + (1 - y_i) log sigmoid(-beta d_i) ],

which is concave in ``beta``, so a 1-D Newton iteration from ``beta = 0`` with step halving
converges to the unique maximum whenever it is finite. It is infinite exactly when the data
are separable (every label agrees with the sign of its ``d``), which raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

ArrayLike = Union[Sequence[float], torch.Tensor]


def margin_from_prob(p: Union[float, torch.Tensor], beta: float = 1.0, eps: float = 1e-6):
    """``logit(clamp(p, eps, 1 - eps)) / beta`` (clamping keeps margins finite for p in {0, 1})."""
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if isinstance(p, torch.Tensor):
        q = p.clamp(eps, 1 - eps)
        return torch.log(q / (1 - q)) / beta
    q = min(max(float(p), eps), 1 - eps)
    return math.log(q / (1 - q)) / beta


def prob_from_margin(margin: Union[float, torch.Tensor], beta: float = 1.0):
    """Inverse of :func:`margin_from_prob`: ``sigmoid(beta * margin)``."""
    if isinstance(margin, torch.Tensor):
        return torch.sigmoid(beta * margin)
    return 1.0 / (1.0 + math.exp(-beta * float(margin)))


@dataclass
class BetaFit:
    """Result of :func:`fit_beta`: the estimate, its standard error ``1/sqrt(-L''(beta))``,
    the mean negative log-likelihood at the estimate, the sample size and the iterations."""

    beta: float
    stderr: float
    nll: float
    n: int
    iterations: int

    def as_dict(self):
        return dict(self.__dict__)


def fit_beta(
    diffs: ArrayLike,
    labels: ArrayLike,
    weights: Optional[ArrayLike] = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> BetaFit:
    """Maximum-likelihood ``beta`` of ``P(y = 1 | d) = sigmoid(beta * d)``.

    Args:
        diffs: ``[N]`` score differences ``d_i`` (any real numbers).
        labels: ``[N]`` labels ``y_i`` in ``[0, 1]`` (1: the first item won; soft labels allowed).
        weights: optional ``[N]`` non-negative weights.
        max_iter: Newton iterations.
        tol: stop when ``|step| < tol * max(1, |beta|)``.

    Returns:
        :class:`BetaFit` (``beta`` may be negative if the labels disagree with ``d`` on average).

    Raises:
        ValueError: empty or mismatched inputs, labels outside ``[0, 1]``, all ``d == 0``,
            or separable data (``beta`` would be infinite).
    """
    d = torch.as_tensor(diffs, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    w = torch.ones_like(d) if weights is None else torch.as_tensor(weights, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ValueError("fit_beta: calibration set is empty")
    if not (d.shape == y.shape == w.shape):
        raise ValueError(f"fit_beta: diffs {tuple(d.shape)}, labels {tuple(y.shape)}, weights {tuple(w.shape)} must have one length")
    if not torch.isfinite(d).all():
        raise ValueError("fit_beta: diffs contain NaN or inf")
    if ((y < 0) | (y > 1)).any() or not torch.isfinite(y).all():
        raise ValueError("fit_beta: labels must lie in [0, 1]")
    if (w < 0).any():
        raise ValueError("fit_beta: weights must be >= 0")
    if not (d != 0).any():
        raise ValueError("fit_beta: every score difference is 0; beta is not identifiable")
    # separable in either direction <=> the likelihood keeps increasing as beta -> +-inf
    active = (w > 0) & (d != 0)
    agree = ((y > 0) & (d > 0)) | ((y < 1) & (d < 0))  # some evidence for beta > 0
    disagree = ((y < 1) & (d > 0)) | ((y > 0) & (d < 0))
    if not (active & disagree).any() or not (active & agree).any():
        raise ValueError(
            "fit_beta: the calibration labels are separable by the sign of the score difference "
            "(they never disagree with it, or always do), so the maximum-likelihood beta is infinite; "
            "add more calibration pairs or set beta in the config"
        )

    def nll_grad_hess(b: float):
        z = b * d
        # -log sigmoid(z) = softplus(-z), -log sigmoid(-z) = softplus(z)
        nll = (w * (y * torch.nn.functional.softplus(-z) + (1 - y) * torch.nn.functional.softplus(z))).sum()
        s = torch.sigmoid(z)
        g = (w * (s - y) * d).sum()
        h = (w * s * (1 - s) * d * d).sum()
        return float(nll), float(g), float(h)

    beta, it = 0.0, 0
    nll, g, h = nll_grad_hess(beta)
    for it in range(1, max_iter + 1):
        step = -g / max(h, 1e-300)
        # step halving keeps every iterate a descent step (Newton overshoots far from the optimum)
        for _ in range(60):
            new = nll_grad_hess(beta + step)
            if new[0] <= nll + 1e-12 * abs(nll):
                break
            step *= 0.5
        beta += step
        nll, g, h = new
        if abs(step) < tol * max(1.0, abs(beta)):
            break
    wsum = float(w.sum())
    return BetaFit(beta=beta, stderr=1.0 / math.sqrt(h) if h > 0 else float("inf"), nll=nll / wsum, n=int(d.numel()), iterations=it)
