"""Plain torch formulas for every reward-model objective fastrm offers.

This module is the reference: the fused kernels in :mod:`fastrm.ops` (Triton, native C++) are
tested against these functions evaluated in float64. Keep it simple and obviously correct; speed
lives elsewhere.

Notation (shapes in brackets):

* ``rewards [N]``: one scalar reward per scored response (``N`` reward positions).
* a *comparison* ``p`` says response ``chosen_index[p]`` is preferred over
  ``rejected_index[p]``; ``P`` comparisons in all. A batch of ``B`` plain pairs is ``N = 2B``
  rewards with ``P = B`` comparisons, but a response may appear in several comparisons
  (grouped responses).
* ``delta_p = r[chosen_index[p]] - r[rejected_index[p]] - margin_p``.
* ``weight [P]``: per-comparison weights; the loss is the weighted mean
  ``sum_p weight_p * l_p / sum_p weight_p`` (plain mean when ``weight`` is ``None``).

Objectives (``l_p`` as a function of ``delta_p``):

* ``"bradley_terry"``: ``-(1 - eps) * logsigmoid(delta) - eps * logsigmoid(-delta)``
  with label smoothing ``eps`` (``eps = 0`` is plain Bradley-Terry, ``eps > 0`` the
  "conservative" BT that assumes a fraction ``eps`` of labels are flipped).
* ``"hinge"``: ``relu(hinge_margin - delta)`` (margin ranking loss).

Reward centering (arXiv 2312.09244) adds ``c * weighted_mean_p((r_c + r_r) ** 2)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OBJECTIVES = ("bradley_terry", "hinge")
#: listwise objectives: they need whole rankings (every group's comparisons a total order)
LISTWISE_OBJECTIVES = ("plackett_luce",)


def check_objective(objective: str, listwise: bool = False) -> None:
    known = OBJECTIVES + (LISTWISE_OBJECTIVES if listwise else ())
    if objective not in known:
        raise ValueError(f"objective={objective!r} is not known; choose one of {', '.join(known)}")


def pairwise_objective(
    delta: torch.Tensor,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
) -> torch.Tensor:
    """Per-comparison loss ``l(delta)``, elementwise; same shape as ``delta``."""
    check_objective(objective)
    if objective == "bradley_terry":
        loss = -F.logsigmoid(delta)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-delta)
        return loss
    return torch.relu(hinge_margin - delta)


def pairwise_objective_grad(
    delta: torch.Tensor,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
) -> torch.Tensor:
    """``d l / d delta``, elementwise: what the fused kernels compute in closed form."""
    check_objective(objective)
    if objective == "bradley_terry":
        # d/dx -logsigmoid(x) = -sigmoid(-x);  d/dx -logsigmoid(-x) = sigmoid(x)
        s = torch.sigmoid(-delta)
        return -(1.0 - label_smoothing) * s + label_smoothing * (1.0 - s)
    return -(delta < hinge_margin).to(delta.dtype)


def comparison_loss(
    rewards: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
    centering_coefficient: float = 0.0,
) -> torch.Tensor:
    """Weighted mean pairwise loss over comparisons of ``rewards [N]``; returns a scalar.

    Args:
        rewards: ``[N]`` rewards.
        chosen_index, rejected_index: ``[P]`` indices into ``rewards``.
        margin: ``[P]`` optional margins subtracted from each difference.
        weight: ``[P]`` optional non-negative comparison weights.
    """
    r_c = rewards[chosen_index]
    r_r = rewards[rejected_index]
    delta = r_c - r_r
    if margin is not None:
        delta = delta - margin.to(delta.dtype)
    per = pairwise_objective(delta, objective, label_smoothing, hinge_margin)
    if centering_coefficient:
        per = per + centering_coefficient * (r_c + r_r) ** 2
    if weight is None:
        return per.mean()
    weight = weight.to(per.dtype)
    return (per * weight).sum() / weight.sum()


def pair_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
    centering_coefficient: float = 0.0,
) -> torch.Tensor:
    """Mean loss over ``B`` pairs: ``chosen_rewards [B]``, ``rejected_rewards [B]``, ``margin [B]``."""
    b = chosen_rewards.shape[0]
    rewards = torch.cat([chosen_rewards, rejected_rewards])
    idx = torch.arange(b, device=rewards.device)
    return comparison_loss(
        rewards, idx, idx + b, margin, None, objective, label_smoothing, hinge_margin,
        centering_coefficient,
    )


def prompt_similarity_weights(
    chosen_prompt_embeddings: torch.Tensor,
    rejected_prompt_embeddings: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Contrast weights of Relative Preference Optimization (arXiv 2402.10958).

    ``W[i, j] = softmax_j(cos(e_i, e_j) / temperature)`` where ``e_i`` embeds the prompt of
    chosen response ``i`` (``[Bc, E]``) and ``e_j`` that of rejected response ``j`` (``[Br, E]``).
    Returns ``[Bc, Br]``, rows summing to 1. ``temperature -> 0`` approaches the identity on
    paired data (same-prompt Bradley-Terry).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = F.normalize(chosen_prompt_embeddings.float(), dim=-1)
    b = F.normalize(rejected_prompt_embeddings.float(), dim=-1)
    return torch.softmax(a @ b.T / temperature, dim=-1)


def contrast_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    contrast_weights: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
    centering_coefficient: float = 0.0,
) -> torch.Tensor:
    """Cross-prompt (RPO) loss over every chosen vs every rejected response.

    ``loss = (1 / Bc) * sum_i sum_j W[i, j] * l(r_c[i] - r_r[j] - m_ij)`` with
    ``m_ii = margin[i]`` and ``m_ij = 0`` for ``i != j`` (a margin belongs to a labelled pair).
    ``chosen_rewards [Bc]``, ``rejected_rewards [Br]``, ``contrast_weights [Bc, Br]``; unpaired
    pools have ``Bc != Br`` and take no margin. ``W = I`` gives :func:`pair_loss` exactly.
    Reward centering uses the same weights: ``c * sum_ij W[i, j] * (r_c[i] + r_r[j])**2 / Bc``,
    which is ``c * mean_i (r_c[i] + r_r[i])**2`` when ``W = I``.
    """
    bc, br = chosen_rewards.shape[0], rejected_rewards.shape[0]
    if contrast_weights.shape != (bc, br):
        raise ValueError(
            f"contrast_weights has shape {tuple(contrast_weights.shape)}, expected ({bc}, {br})"
        )
    delta = chosen_rewards[:, None] - rejected_rewards[None, :]
    if margin is not None:
        if bc != br:
            raise ValueError("margin needs paired data (as many chosen as rejected responses)")
        delta = delta - torch.diag(margin.to(delta.dtype))
    w = contrast_weights.to(delta.dtype)
    per = pairwise_objective(delta, objective, label_smoothing, hinge_margin)
    if centering_coefficient:
        per = per + centering_coefficient * (chosen_rewards[:, None] + rejected_rewards[None, :]) ** 2
    return (w * per).sum() / bc


def plackett_luce_loss(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """Listwise Plackett-Luce negative log-likelihood of one full ranking.

    ``ranking [K]`` lists indices into ``rewards`` from best to worst;
    ``loss = -sum_{k=0}^{K-2} (r[ranking[k]] - logsumexp_{m >= k} r[ranking[m]])``.
    With ``K = 2`` it equals Bradley-Terry on the pair.
    """
    r = rewards[ranking]
    # reverse cumulative logsumexp: lse_k = log sum_{m >= k} exp(r_m)
    lse = torch.logcumsumexp(r.flip(0), dim=0).flip(0)
    return -(r[:-1] - lse[:-1]).sum()


def rankings_from_comparisons(
    chosen_index: torch.Tensor, rejected_index: torch.Tensor, group_index: torch.Tensor
) -> list[torch.Tensor]:
    """One full ranking per group (indices into the rewards, best first) from its comparisons.

    A group's comparisons must be a complete, consistent tournament over its responses (every
    pair compared once, no cycle), which is what a full ranking or distinct scores produce:
    then the number of wins of the responses is ``K-1, ..., 1, 0`` and orders them. Anything
    else raises ``ValueError`` naming the group.
    """
    rankings = []
    ci, ri, gi = chosen_index.tolist(), rejected_index.tolist(), group_index.tolist()
    by_group: dict[int, list[tuple[int, int]]] = {}
    for a, b, g in zip(ci, ri, gi):
        by_group.setdefault(g, []).append((a, b))
    for g, comps in by_group.items():
        members = sorted({x for ab in comps for x in ab})
        k = len(members)
        wins = {m: 0 for m in members}
        for a, _ in comps:
            wins[a] += 1
        pairs = {frozenset(ab) for ab in comps}
        if len(comps) != k * (k - 1) // 2 or len(pairs) != len(comps) or sorted(wins.values()) != list(range(k)):
            raise ValueError(
                f"group {g} has {k} responses and {len(comps)} comparisons that do not form one "
                "full ranking; the listwise (plackett_luce) objective needs every pair of a "
                "group compared consistently (use bradley_terry for partial comparisons)")
        rankings.append(torch.tensor(sorted(members, key=lambda m: -wins[m]),
                                     device=chosen_index.device))
    return rankings


def listwise_loss(
    rewards: torch.Tensor, rankings: list[torch.Tensor], centering_coefficient: float = 0.0,
    chosen_index: Optional[torch.Tensor] = None, rejected_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over groups of the Plackett-Luce NLL divided by ``K - 1`` (per choice, so groups of
    different sizes weigh alike): ``mean_g plackett_luce_loss(r, ranking_g) / (K_g - 1)``. A
    group of 2 gives Bradley-Terry exactly. Centering, when on, is over the comparisons, as for
    the pairwise objectives."""
    per_group = torch.stack([plackett_luce_loss(rewards, rk) / (rk.numel() - 1) for rk in rankings])
    loss = per_group.mean()
    if centering_coefficient:
        loss = loss + centering_coefficient * ((rewards[chosen_index] + rewards[rejected_index]) ** 2).mean()
    return loss
