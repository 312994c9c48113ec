"""RewardLoss and the reference formulas against hand-written float64 math."""

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from fastrm import RewardLoss
from fastrm import functional as RF


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _hand_pair_loss(rc, rr, m, objective, eps, h, c):
    """Per-pair loop in Python floats: an implementation independent of fastrm.functional."""
    total = 0.0
    for a, b, mm in zip(rc, rr, m):
        d = a - b - mm
        if objective == "bradley_terry":
            l = -(1 - eps) * _logsig(d) - eps * _logsig(-d)
        else:
            l = max(0.0, h - d)
        total += l + c * (a + b) ** 2
    return total / len(rc)


@pytest.mark.parametrize(
    "objective,eps,c,use_margin,b",
    [
        ("bradley_terry", 0.0, 0.0, False, 1),
        ("bradley_terry", 0.0, 0.0, True, 7),
        ("bradley_terry", 0.1, 0.01, True, 5),
        ("bradley_terry", 0.0, 0.05, False, 16),
        ("hinge", 0.0, 0.0, True, 9),
        ("hinge", 0.0, 0.02, False, 3),
    ],
)
def test_pair_loss_matches_hand_computation(objective, eps, c, use_margin, b):
    g = torch.Generator().manual_seed(b * 31 + int(use_margin))
    rc = torch.randn(b, generator=g, dtype=torch.float64) * 2
    rr = torch.randn(b, generator=g, dtype=torch.float64) * 2
    m = torch.rand(b, generator=g, dtype=torch.float64) if use_margin else None
    loss_fn = RewardLoss(objective=objective, label_smoothing=eps, centering_coefficient=c,
                         use_margin=use_margin, hinge_margin=0.7)
    got = loss_fn(rc, rr.unsqueeze(1), m)
    want = _hand_pair_loss(rc.tolist(), rr.tolist(), (m if m is not None else torch.zeros(b)).tolist(),
                           objective, eps, 0.7, c)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_pair_loss_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    rc = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(6, generator=g, dtype=torch.float64)
    eps, c = 0.2, 0.03
    RewardLoss(label_smoothing=eps, centering_coefficient=c, use_margin=True)(rc, rr, m).backward()
    d = (rc - rr - m).detach()
    dl = RF.pairwise_objective_grad(d, "bradley_terry", eps)
    cen = 2 * c * (rc + rr).detach()
    torch.testing.assert_close(rc.grad, (dl + cen) / 6, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rr.grad, (-dl + cen) / 6, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", RF.OBJECTIVES)
def test_objective_grad_matches_autograd(objective):
    d = torch.linspace(-4, 4, 41, dtype=torch.float64) + 0.013  # avoid the hinge kink itself
    d.requires_grad_(True)
    RF.pairwise_objective(d, objective, 0.15 if objective == "bradley_terry" else 0.0, 0.5).sum().backward()
    want = RF.pairwise_objective_grad(d.detach(), objective,
                                      0.15 if objective == "bradley_terry" else 0.0, 0.5)
    torch.testing.assert_close(d.grad, want)


def test_yaml_instantiation_exactly_as_documented():
    cfg = OmegaConf.create(
        "loss:\n  _component_: fastrm.RewardLoss\n  centering_coefficient: 0.01\n  use_margin: True\n"
    )
    loss_fn = config.instantiate(cfg.loss)
    assert isinstance(loss_fn, RewardLoss)
    assert loss_fn.use_margin and loss_fn.centering_coefficient == 0.01
    rc, rr, m = torch.randn(4), torch.randn(4), torch.rand(4)
    want = _hand_pair_loss(rc.tolist(), rr.tolist(), m.tolist(), "bradley_terry", 0, 1, 0.01)
    assert loss_fn(rc, rr, m).item() == pytest.approx(want, rel=1e-5)


def test_margin_errors_name_the_problem():
    loss_fn = RewardLoss(use_margin=True)
    with pytest.raises(ValueError, match="needs a margin"):
        loss_fn(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="pair 2"):
        loss_fn(torch.randn(4), torch.randn(4), torch.tensor([0.0, 1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="pair 0"):
        loss_fn(torch.randn(2), torch.randn(2), torch.tensor([float("inf"), 0.0]))
    with pytest.raises(ValueError, match="one per pair"):
        loss_fn(torch.randn(3), torch.randn(3), torch.rand(2))


def test_constructor_and_shape_errors():
    with pytest.raises(ValueError, match="objective"):
        RewardLoss(objective="dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        RewardLoss(label_smoothing=0.7)
    with pytest.raises(ValueError, match="weighting"):
        RewardLoss(weighting="prompt")
    with pytest.raises(ValueError, match="same shape"):
        RewardLoss()(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        RewardLoss()(torch.randn(3, 2), torch.randn(3, 2))


def test_unused_margin_warns_once_unless_turned_off_explicitly():
    import warnings

    loss_fn = RewardLoss()  # use_margin left unset: margins ignored, said once
    with pytest.warns(UserWarning, match="use_margin"):
        loss_fn(torch.randn(2), torch.randn(2), torch.rand(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(torch.randn(2), torch.randn(2), torch.rand(2))  # once only
        chosen, rejected, margin = torch.randn(3), torch.randn(3), torch.rand(3)
        off = RewardLoss(use_margin=False)(chosen, rejected, margin)  # a config's choice: silent
    assert off == pytest.approx(float(-torch.nn.functional.logsigmoid(chosen - rejected).mean()))


def test_metrics_match_hand_values():
    rc = torch.tensor([1.0, 0.5, -1.0, 2.0])
    rr = torch.tensor([0.0, 1.5, -2.0, 2.5])
    mt = RewardLoss.metrics(rc, rr)
    assert mt["accuracy"] == pytest.approx(0.5)
    assert mt["margin"] == pytest.approx((1 - 1 + 1 - 0.5) / 4)
    allr = rc.tolist() + rr.tolist()
    mean = sum(allr) / 8
    assert mt["reward_mean"] == pytest.approx(mean)
    assert mt["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in allr) / 8))
    assert mt["chosen_reward"] == pytest.approx(2.5 / 4)
    assert mt["rejected_reward"] == pytest.approx(2.0 / 4)
    assert mt["comparisons"] == 4


# ---------------------------------------------------------------- cross-prompt (RPO)
def _hand_contrast(rc, rr, w, m, c):
    bc = len(rc)
    total = 0.0
    for i in range(bc):
        for j in range(len(rr)):
            mm = m[i] if (m is not None and i == j) else 0.0
            total += w[i][j] * (-_logsig(rc[i] - rr[j] - mm) + c * (rc[i] + rr[j]) ** 2)
    return total / bc


def test_cross_prompt_identity_weights_equal_bradley_terry():
    g = torch.Generator().manual_seed(11)
    rc = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(6, generator=g, dtype=torch.float64)
    cross = RewardLoss(cross_prompt=True, use_margin=True, centering_coefficient=0.02)
    plain = RewardLoss(use_margin=True, centering_coefficient=0.02)
    a = cross(rc, rr, m, contrast_weights=torch.eye(6, dtype=torch.float64))
    ga = torch.autograd.grad(a, (rc, rr))
    b = plain(rc, rr, m)
    gb = torch.autograd.grad(b, (rc, rr))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)


def test_cross_prompt_matches_hand_reference_with_embeddings():
    g = torch.Generator().manual_seed(5)
    rc = torch.randn(4, generator=g, dtype=torch.float64)
    rr = torch.randn(4, generator=g, dtype=torch.float64)
    m = torch.rand(4, generator=g, dtype=torch.float64)
    ec, er = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    tau = 0.5
    w = [[0.0] * 4 for _ in range(4)]
    for i in range(4):
        sims = [float(ec[i] @ er[j] / (ec[i].norm() * er[j].norm())) / tau for j in range(4)]
        z = sum(math.exp(s) for s in sims)
        w[i] = [math.exp(s) / z for s in sims]
    loss_fn = RewardLoss(cross_prompt=True, temperature=tau, use_margin=True, centering_coefficient=0.01)
    got = loss_fn(rc, rr, m, chosen_prompt_embeddings=ec, rejected_prompt_embeddings=er)
    want = _hand_contrast(rc.tolist(), rr.tolist(), w, m.tolist(), 0.01)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_cross_prompt_unpaired_pools():
    g = torch.Generator().manual_seed(8)
    rc = torch.randn(3, generator=g, dtype=torch.float64)
    rr = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    got = RewardLoss(cross_prompt=True)(rc, rr, contrast_weights=w)
    want = _hand_contrast(rc.tolist(), rr.tolist(), w.tolist(), None, 0.0)
    assert got.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="paired data"):
        RewardLoss(cross_prompt=True, use_margin=True)(rc, rr, torch.rand(3), contrast_weights=w)
    with pytest.raises(ValueError, match="needs contrast_weights"):
        RewardLoss(cross_prompt=True)(rc, rr)


# ---------------------------------------------------------------- grouped comparisons
def test_comparisons_equal_expanded_pairs_and_group_weighting():
    g = torch.Generator().manual_seed(21)
    # two groups: K=4 with all 6 comparisons, K=2 with one
    rewards = torch.randn(6, generator=g, dtype=torch.float64)
    comps = list(itertools.combinations(range(4), 2)) + [(4, 5)]
    ci = torch.tensor([a for a, _ in comps])
    ri = torch.tensor([b for _, b in comps])
    gi = torch.tensor([0] * 6 + [1])
    m = torch.rand(7, generator=g, dtype=torch.float64)
    loss_fn = RewardLoss(use_margin=True)
    got = loss_fn.comparison_loss(rewards, ci, ri, m, gi)
    expanded = loss_fn(rewards[ci], rewards[ri], m)
    torch.testing.assert_close(got, expanded, rtol=1e-14, atol=1e-14)
    # per-group weights 1/C_g: group 0 comparisons weigh 1/6, group 1 weighs 1
    per = [-_logsig(float(rewards[a] - rewards[b] - m[k])) for k, (a, b) in enumerate(comps)]
    want = (sum(per[:6]) / 6 + per[6]) / (6 * (1 / 6) + 1)
    got_g = RewardLoss(use_margin=True, weighting="group").comparison_loss(rewards, ci, ri, m, gi)
    assert got_g.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="group_index"):
        RewardLoss(weighting="group").comparison_loss(rewards, ci, ri)


def test_plackett_luce_against_brute_force():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(4, generator=g, dtype=torch.float64)
    ranking = torch.tensor([2, 0, 3, 1])
    # P(ranking) = prod_k exp(r_k) / sum_{m>=k} exp(r_m)
    rs = [float(r[i]) for i in ranking]
    logp = sum(rs[k] - math.log(sum(math.exp(x) for x in rs[k:])) for k in range(4))
    assert RF.plackett_luce_loss(r, ranking).item() == pytest.approx(-logp, rel=1e-12)
    two = torch.tensor([1, 3])
    assert RF.plackett_luce_loss(r, two).item() == pytest.approx(-_logsig(float(r[1] - r[3])), rel=1e-12)


# ---------------------------------------------------------------- listwise (Plackett-Luce)
def _tournament(ranking: list[int], rng) -> list[tuple[int, int]]:
    comps = [(ranking[a], ranking[b]) for a, b in itertools.combinations(range(len(ranking)), 2)]
    rng.shuffle(comps)
    return comps


def test_rankings_recovered_from_complete_comparisons_and_errors():
    import random

    rng = random.Random(0)
    ranking = [5, 2, 7, 3, 6]
    comps = _tournament(ranking, rng)
    ci = torch.tensor([a for a, _ in comps])
    ri = torch.tensor([b for _, b in comps])
    (got,) = RF.rankings_from_comparisons(ci, ri, torch.zeros(len(comps), dtype=torch.long))
    assert got.tolist() == ranking
    with pytest.raises(ValueError, match="group 0 .*full ranking"):
        RF.rankings_from_comparisons(ci[:-1], ri[:-1], torch.zeros(len(comps) - 1, dtype=torch.long))
    cyc = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    with pytest.raises(ValueError, match="full ranking"):
        RF.rankings_from_comparisons(*cyc, torch.zeros(3, dtype=torch.long))


def test_plackett_luce_objective_matches_hand_computation_and_gradients():
    import random

    rng = random.Random(1)
    g = torch.Generator().manual_seed(9)
    # two groups: K=4 (responses 0-3) and K=2 (responses 4-5), full rankings
    rankings = [[2, 0, 3, 1], [5, 4]]
    comps, gids = [], []
    for gid, rk in enumerate(rankings):
        c = _tournament(rk, rng)
        comps += c
        gids += [gid] * len(c)
    ci = torch.tensor([a for a, _ in comps])
    ri = torch.tensor([b for _, b in comps])
    gi = torch.tensor(gids)
    rewards = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = RewardLoss(objective="plackett_luce")
    loss = loss_fn.comparison_loss(rewards, ci, ri, group_index=gi)

    def nll(rk):
        rs = [float(rewards.detach()[i]) for i in rk]
        return -sum(rs[k] - math.log(sum(math.exp(x) for x in rs[k:])) for k in range(len(rs) - 1))

    want = (nll(rankings[0]) / 3 + nll(rankings[1]) / 1) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # K = 2 is Bradley-Terry
    assert nll(rankings[1]) == pytest.approx(-_logsig(float(rewards[5] - rewards[4])), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, rewards)
    eps = 1e-6
    for i in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = eps
        num = (loss_fn.comparison_loss(rewards.detach() + e, ci, ri, group_index=gi)
               - loss_fn.comparison_loss(rewards.detach() - e, ci, ri, group_index=gi)) / (2 * eps)
        assert grad[i].item() == pytest.approx(num.item(), abs=1e-7)
    with pytest.raises(ValueError, match="no margin"):
        RewardLoss(objective="plackett_luce", use_margin=True)
    with pytest.raises(ValueError, match="group_index"):
        loss_fn.comparison_loss(rewards, ci, ri)


def test_plackett_luce_from_hidden_equals_gathered_reference():
    import random

    from fastrm.data.batch import PackedBatch

    rng = random.Random(2)
    g = torch.Generator().manual_seed(10)
    t, d = 40, 13
    hidden = torch.randn(t, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([3, 9, 15, 22, 30, 39])
    comps, gids = _tournament([1, 0, 2], rng), [0, 0, 0]
    comps += [(a + 3, b_ + 3) for a, b_ in _tournament([2, 1, 0], rng)]
    gids += [1, 1, 1]
    batch = PackedBatch(
        tokens=torch.zeros(1, t, dtype=torch.long), position_ids=torch.arange(t)[None],
        cu_seqlens=torch.tensor([0, t], dtype=torch.int32),
        segment_prefix=torch.zeros(1, 2, dtype=torch.int32), reward_positions=positions,
        chosen_index=torch.tensor([a for a, _ in comps]),
        rejected_index=torch.tensor([b_ for _, b_ in comps]), group_index=torch.tensor(gids))
    loss_fn = RewardLoss(objective="plackett_luce", centering_coefficient=0.1)
    loss, rewards = loss_fn.from_hidden(hidden, w, b, batch)
    grads = torch.autograd.grad(loss, (hidden, w, b))
    ref_rewards = hidden[positions] @ w[0] + b
    ref = loss_fn.comparison_loss(ref_rewards, batch.chosen_index, batch.rejected_index,
                                  group_index=batch.group_index)
    ref_grads = torch.autograd.grad(ref, (hidden, w, b))
    torch.testing.assert_close(rewards, ref_rewards.detach().float())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
