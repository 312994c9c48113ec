"""Few-shot adaptation: weights over the decomposed heads fitted on a user's labelled pairs.

Given ``n`` labelled pairs of a new user or task, each head ``i`` scores the chosen and rejected
responses: ``c [n, k]`` and ``r [n, k]``. Both methods first standardize each head over the
``2n`` scored responses, ``mu_i = mean(c_i, r_i)``, ``sigma_i = std(c_i, r_i)`` (``1`` when
zero), so that heads of different scale compete fairly, then fit coefficients ``beta`` on the
standardized scores. The result is always one linear reward on the raw head scores:

    r(x, y) = sum_i beta_i (s_i(x, y) - mu_i) / sigma_i = alpha . s(x, y) + b,
    alpha_i = beta_i / sigma_i,  b = -sum_i beta_i mu_i / sigma_i,

i.e. one ``D -> 1`` head ``w = W^T alpha`` (:meth:`fastrm.decompose.heads.DecomposedHeads.combine`).

* ``"softmax"`` (the DRM paper's test-time adaptation, as in the authors' released code): each
  candidate head gets the Bradley-Terry loss summed over the pairs,
  ``L_i = sum_p -log sigmoid((c_pi - r_pi) / sigma_i)``, and ``beta = softmax(-L / T)``. The
  candidates are the ``k`` heads and, with ``include_negated=True`` (the authors' setting), their
  ``k`` negations; the ``2k`` weights fold back to ``beta_i = w_i^+ - w_i^-``. No training,
  weights are non-negative over candidates and sum to one.
* ``"logistic"``: L2-regularized Bradley-Terry (logistic) regression on the standardized score
  differences, ``min_beta mean_p softplus(-beta . d_p) + (l2 / 2) |beta|^2`` with
  ``d_p = (c_p - r_p) / sigma``: strictly convex, solved to convergence with L-BFGS in float64.
  Any signed mix, so it can follow a user whose preference lies between heads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ADAPT_METHODS = ("softmax", "logistic")


@dataclass
class HeadWeights:
    """A linear reward over the ``k`` head scores: ``r = weights . s + bias``.

    Attributes:
        weights: ``[k]`` float32 ``alpha`` on the raw head scores.
        bias: ``b`` (cancels in every comparison; kept so absolute rewards match the
            standardized mix).
        beta: ``[k]`` coefficients on the standardized scores (the fitted quantity).
        method: ``"softmax"`` or ``"logistic"``.
        num_pairs: how many labelled pairs fitted them.
        fit_accuracy: accuracy of the mix on those pairs.
        temperature, l2, include_negated: the settings used.
    """

    weights: torch.Tensor
    bias: float
    beta: torch.Tensor
    method: str
    num_pairs: int
    fit_accuracy: float
    temperature: float = 1.0
    l2: float = 0.0
    include_negated: bool = False

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[0])

    def score(self, head_scores: torch.Tensor) -> torch.Tensor:
        """``head_scores [N, k] -> [N]`` mixed rewards."""
        return head_scores.to(torch.float32) @ self.weights.to(head_scores.device) + self.bias

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.tolist()
        d["beta"] = self.beta.tolist()
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadWeights":
        d = json.loads(Path(path).read_text())
        d["weights"] = torch.tensor(d["weights"], dtype=torch.float32)
        d["beta"] = torch.tensor(d["beta"], dtype=torch.float32)
        return cls(**d)


def _standardize(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.cat([chosen, rejected], 0)
    mu = both.mean(0)
    sigma = both.std(0, unbiased=True) if both.shape[0] > 1 else torch.ones_like(mu)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return mu, sigma


def fit_head_weights(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    method: str = "softmax",
    temperature: float = 1.0,
    include_negated: bool = True,
    l2: float = 0.1,
    max_iter: int = 200,
) -> HeadWeights:
    """Fits :class:`HeadWeights` on the head scores of ``n`` labelled pairs.

    Args:
        chosen_scores: ``[n, k]`` every head's score of each preferred response.
        rejected_scores: ``[n, k]`` the same for the dispreferred responses.
        method: ``"softmax"`` (paper) or ``"logistic"`` (module docstring).
        temperature: ``T`` of the softmax method (> 0).
        include_negated: softmax method only: also weigh the negated heads.
        l2: ridge strength of the logistic method (> 0 keeps separable few-shot sets finite).
    """
    if method not in ADAPT_METHODS:
        raise ValueError(f"adapt method={method!r} is not known; choose one of {', '.join(ADAPT_METHODS)}")
    if chosen_scores.dim() != 2 or chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
                         f"{tuple(rejected_scores.shape)} must both be [n, k]")
    n, k = chosen_scores.shape
    if n < 1:
        raise ValueError("fit_head_weights needs at least one labelled pair")
    c = chosen_scores.detach().to("cpu", torch.float64)
    r = rejected_scores.detach().to("cpu", torch.float64)
    mu, sigma = _standardize(c, r)
    d = (c - r) / sigma  # [n, k] standardized score differences
    if method == "softmax":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cand = torch.cat([d, -d], 1) if include_negated else d
        loss = -F.logsigmoid(cand).sum(0)  # [k] or [2k], summed over the pairs as the paper
        w = torch.softmax(-loss / temperature, 0)
        beta = w[:k] - w[k:] if include_negated else w
    else:
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0 for the logistic method, got {l2}")
        beta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([beta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            obj = F.softplus(-(d @ beta)).mean() + 0.5 * l2 * (beta @ beta)
            obj.backward()
            return obj

        opt.step(closure)
        beta = beta.detach()
    alpha = beta / sigma
    bias = -float((beta * mu / sigma).sum())
    acc = float(((d @ beta) > 0).double().mean())
    return HeadWeights(
        weights=alpha.to(torch.float32), bias=bias, beta=beta.to(torch.float32), method=method,
        num_pairs=n, fit_accuracy=acc, temperature=float(temperature), l2=float(l2) if method == "logistic" else 0.0,
        include_negated=bool(include_negated) if method == "softmax" else False,
    )


def adapt_heads(heads, pairs, method: str = "softmax", **kwargs) -> HeadWeights:
    """Fits weights over ``heads`` (:class:`DecomposedHeads`) on labelled ``pairs``
    (:class:`~fastrm.decompose.store.PairEmbeddings`: ``chosen [n, D]``, ``rejected [n, D]``);
    ``kwargs`` go to :func:`fit_head_weights`."""
    return fit_head_weights(heads.scores(pairs.chosen), heads.scores(pairs.rejected), method, **kwargs)


def mix_accuracy(heads, weights: HeadWeights, pairs, chunk_size: int = 4096) -> float:
    """Pairwise accuracy of the mixed reward ``W^T alpha`` on ``pairs`` (ties count as wrong)."""
    w, _ = heads.combine(weights=weights.weights)
    correct, n = 0, 0
    for z in pairs.iter_diffs(chunk_size):
        correct += int(((z.to(torch.float64) @ w.to(torch.float64)) > 0).sum())
        n += z.shape[0]
    if n == 0:
        raise ValueError("cannot measure accuracy on an empty set of pairs")
    return correct / n


def few_shot_split(num_pairs: int, num_shots: int, seed: int = 0,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(shots [num_shots], rest [num_pairs - num_shots])`` split of pair indices."""
    if not 1 <= num_shots < num_pairs:
        raise ValueError(f"num_shots must lie in [1, {num_pairs - 1}] for {num_pairs} pairs, "
                         f"got {num_shots}")
    g = generator or torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pairs, generator=g)
    return perm[:num_shots], perm[num_shots:]
