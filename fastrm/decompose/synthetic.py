"""Synthetic pair embeddings with planted, orthogonal preference directions (known answers).

Population pairs (:func:`planted_pairs`): ``r`` orthonormal directions ``v_j`` in ``R^D``. Each
pair is decided on one attribute: it has type ``j`` with probability ``pi_j`` and

    z_p = e_chosen - e_rejected = a_p v_j + noise * eps_p,   eps_p ~ N(0, I_D),
    a_p = +s_j |g_p| with probability q_j, else -s_j |g_p|,  g_p ~ N(0, 1),
    e_chosen = b_p + z_p / 2,  e_rejected = b_p - z_p / 2,  b_p ~ N(0, base_scale^2 I_D).

(``q_j`` is the share of annotators who prefer "more ``v_j``".) Known answers, exact in
expectation: ``E[z z^T] = sum_j pi_j s_j^2 v_j v_j^T + noise^2 I`` (the cross terms vanish as a
pair moves along one direction only), so the uncentered decomposition has eigenvectors ``v_j``
with eigenvalues ``pi_j s_j^2 + noise^2`` (:func:`planted_second_moment`); and head ``v_j``
ranks a pair right with probability (:func:`planted_accuracy`)

    acc_j = pi_j (q_j p_j + (1 - q_j)(1 - p_j)) + (1 - pi_j) / 2,
    p_j = P(s_j |g| + noise * eps > 0) = 1 - atan(noise / s_j) / pi.

User pairs (:func:`user_pairs`): a new user with preference direction ``u = sum_j beta_j v_j``
(unit) labels pairs whose difference ``x = sum_j g_j v_j + noise * eps``
(``g_j ~ N(0, spread_j^2)``) carries no population bias: the chosen side is the one with
``u . e`` larger, flipped with probability ``sigmoid(-|u . x| / label_temperature)``
(Bradley-Terry label noise) when ``label_temperature > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastrm.decompose.store import PairEmbeddings


def random_orthonormal(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[num, dim]`` orthonormal rows (QR of a Gaussian matrix)."""
    if num > dim:
        raise ValueError(f"cannot plant {num} orthogonal directions in D={dim}")
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(dim, num, generator=g, dtype=torch.float64)).Q
    return q.T.contiguous().to(torch.float32)


def _planted_params(weights, scale, agreement) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pi = torch.as_tensor(weights, dtype=torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64)
    q = torch.as_tensor(agreement, dtype=torch.float64)
    if not (pi.shape == s.shape == q.shape) or pi.dim() != 1:
        raise ValueError("weights, scale and agreement need one entry per planted direction")
    if bool((pi < 0).any()) or abs(float(pi.sum()) - 1.0) > 1e-6:
        raise ValueError(f"weights (pair-type probabilities) must be >= 0 and sum to 1, got {pi.tolist()}")
    if bool(((q < 0) | (q > 1)).any()):
        raise ValueError(f"agreement must lie in [0, 1], got {q.tolist()}")
    return pi, s, q


def planted_accuracy(weights: Sequence[float], scale: Sequence[float], agreement: Sequence[float],
                     noise: float) -> torch.Tensor:
    """``[r]`` population accuracy of head ``v_j`` (module docstring)."""
    pi, s, q = _planted_params(weights, scale, agreement)
    p = 1.0 - torch.atan(noise / s) / math.pi
    return pi * (q * p + (1 - q) * (1 - p)) + (1 - pi) / 2


def planted_second_moment(weights: Sequence[float], scale: Sequence[float],
                          noise: float) -> torch.Tensor:
    """``[r]`` eigenvalue of ``E[z z^T]`` along each planted direction: ``pi_j s_j^2 + noise^2``."""
    pi = torch.as_tensor(weights, dtype=torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64)
    return pi * s**2 + noise**2


def planted_pairs(num_pairs: int, directions: torch.Tensor, weights: Sequence[float],
                  scale: Sequence[float], agreement: Sequence[float], noise: float = 0.1,
                  base_scale: float = 1.0, seed: int = 0) -> PairEmbeddings:
    """Population pairs (module docstring): ``directions [r, D]``; ``weights [r]`` the
    pair-type probabilities ``pi``, ``scale [r]`` ``s``, ``agreement [r]`` ``q``."""
    r, d = directions.shape
    pi, s, q = _planted_params(weights, scale, agreement)
    if pi.shape[0] != r:
        raise ValueError(f"weights, scale and agreement need one entry per planted direction ({r})")
    g = torch.Generator().manual_seed(seed)
    kind = torch.multinomial(pi.float(), num_pairs, replacement=True, generator=g)
    mag = s.float()[kind] * torch.randn(num_pairs, generator=g).abs()
    sign = torch.where(torch.rand(num_pairs, generator=g) < q.float()[kind], 1.0, -1.0)
    z = (sign * mag)[:, None] * directions[kind] + noise * torch.randn(num_pairs, d, generator=g)
    b = base_scale * torch.randn(num_pairs, d, generator=g)
    return PairEmbeddings(b + z / 2, b - z / 2)


def user_pairs(num_pairs: int, directions: torch.Tensor, user_weights: Sequence[float],
               spread: Optional[Sequence[float]] = None, noise: float = 0.1,
               base_scale: float = 1.0, label_temperature: float = 0.0,
               seed: int = 0) -> PairEmbeddings:
    """Pairs labelled by a user with preference ``u ~ sum_j user_weights[j] v_j`` (module
    docstring); ``spread [r]`` (default ones) is the spread of the pairs along each direction."""
    r, d = directions.shape
    beta = torch.as_tensor(user_weights, dtype=torch.float32)
    if beta.shape[0] != r:
        raise ValueError(f"user_weights needs one entry per planted direction ({r})")
    u = beta @ directions
    u = u / u.norm()
    sp = torch.ones(r) if spread is None else torch.as_tensor(spread, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    x = (sp * torch.randn(num_pairs, r, generator=g)) @ directions
    x = x + noise * torch.randn(num_pairs, d, generator=g)
    util = x @ u
    sign = torch.sign(util)
    sign[sign == 0] = 1
    if label_temperature > 0:
        flip = torch.rand(num_pairs, generator=g) < torch.sigmoid(-util.abs() / label_temperature)
        sign = torch.where(flip, -sign, sign)
    z = x * sign[:, None]
    b = base_scale * torch.randn(num_pairs, d, generator=g)
    return PairEmbeddings(b + z / 2, b - z / 2)


@dataclass
class PlantedEmbeddingSource:
    """A recipe embedding source with known answers (``decompose_synthetic.yaml``).

    Builds the splits the recipe reads: ``train`` and ``validation`` population pairs from
    :func:`planted_pairs`, and ``user`` pairs labelled by a planted mix
    (:func:`user_pairs`) for the few-shot adaptation. ``directions`` are
    ``random_orthonormal(len(weights), dim, seed)``; reported in :meth:`truth`.
    """

    dim: int = 64
    weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1)
    scale: Sequence[float] = (3.0, 3.0, 3.0, 3.0)
    agreement: Sequence[float] = (0.9, 0.85, 0.8, 0.8)
    noise: float = 0.2
    num_train: int = 4000
    num_validation: int = 1000
    num_user: int = 1000
    user_weights: Sequence[float] = (0.0, 0.6, 0.8, 0.0)
    seed: int = 0

    def directions(self) -> torch.Tensor:
        return random_orthonormal(len(self.weights), self.dim, self.seed)

    def build(self, output_dir=None) -> dict[str, PairEmbeddings]:
        """``{"train", "validation", "user"}`` -> :class:`PairEmbeddings` (in memory)."""
        v = self.directions()
        return {
            "train": planted_pairs(self.num_train, v, self.weights, self.scale, self.agreement,
                                   self.noise, seed=self.seed + 1),
            "validation": planted_pairs(self.num_validation, v, self.weights, self.scale,
                                        self.agreement, self.noise, seed=self.seed + 2),
            "user": user_pairs(self.num_user, v, self.user_weights, noise=self.noise, seed=self.seed + 3),
        }

    def truth(self) -> dict:
        """The planted answers, for the report."""
        return {
            "planted_accuracy": planted_accuracy(self.weights, self.scale, self.agreement,
                                                 self.noise).tolist(),
            "planted_variance": planted_second_moment(self.weights, self.scale, self.noise).tolist(),
            "user_weights": list(self.user_weights),
        }
