"""Planted-direction tests: recovered heads, per-head accuracy, orientation, adaptation, save/load."""

import math

import pytest
import torch
from torch import nn

from fastrm.decompose.adapt import (HeadWeights, adapt_heads, few_shot_split, fit_head_weights,
                                    mix_accuracy)
from fastrm.decompose.heads import (DecomposedHeads, head_accuracy, load_into_head,
                                    multihead_rewards, orient_components)
from fastrm.decompose.pca import exact_pca, fit_pca
from fastrm.decompose.synthetic import (planted_accuracy, planted_pairs, planted_second_moment,
                                        random_orthonormal, user_pairs)

PI = (0.4, 0.3, 0.2, 0.1)
SCALE = (3.0, 3.0, 3.0, 3.0)
AGREE = (0.9, 0.85, 0.8, 0.8)
NOISE = 0.2
D = 48


@pytest.fixture(scope="module")
def planted():
    v = random_orthonormal(4, D, seed=42)
    train = planted_pairs(20_000, v, PI, SCALE, AGREE, NOISE, seed=1)
    heldout = planted_pairs(8_000, v, PI, SCALE, AGREE, NOISE, seed=2)
    return v, train, heldout


@pytest.mark.parametrize("method", ["exact", "covariance", "randomized"])
def test_recovered_heads_match_planted_directions(planted, method):
    v, train, heldout = planted
    pca = fit_pca(train, 4, method=method, chunk_size=3000, progress=False)
    heads = orient_components(pca, train, progress=False)
    # cosine with the planted directions, sign included (orientation must be right)
    cos = (heads.weight.double() * v.double()).sum(1)
    assert bool((cos > 0.99).all()), cos
    # eigenvalues and explained variance match the planted second moments
    # (within 4 standard errors: var(a^2) = pi s^4 (3 - pi) for a = +-s|g| on a pi-share)
    lam = planted_second_moment(PI, SCALE, NOISE)
    pi, sc = torch.tensor(PI, dtype=torch.float64), torch.tensor(SCALE, dtype=torch.float64)
    se_lam = sc**2 * torch.sqrt(pi * (3 - pi)) / math.sqrt(train.num_pairs)
    assert bool(((heads.explained_variance - lam).abs() < 4 * se_lam).all()), (heads.explained_variance, lam)
    total = float(lam.sum()) + (D - 4) * NOISE**2
    torch.testing.assert_close(heads.explained_variance_ratio, lam / total, rtol=0.12, atol=0.0)
    # per-head held-out accuracy matches Phi(m / sqrt(s^2 + noise^2)) within 4 standard errors
    acc = head_accuracy(heads, heldout)
    truth = planted_accuracy(PI, SCALE, AGREE, NOISE)
    se = torch.sqrt(truth * (1 - truth) / heldout.num_pairs)
    assert bool(((acc - truth).abs() < 4 * se).all()), (acc, truth)
    # training accuracy too (orientation counted the same thing)
    se_tr = torch.sqrt(truth * (1 - truth) / train.num_pairs)
    assert bool(((heads.train_accuracy - truth).abs() < 4 * se_tr).all())


def test_orientation_flips_exactly_the_negative_components(planted):
    v, train, _ = planted
    pca = exact_pca(train.diffs(), 4)
    manual = pca.components.clone()
    manual[1] = -manual[1]
    manual[3] = -manual[3]
    pca.components = manual
    heads = orient_components(pca, train, progress=False)
    z = train.diffs().double()
    for i in range(4):
        frac_pos = float(((z @ manual[i].double()) > 0).double().mean())
        assert bool(heads.flipped[i]) == (frac_pos < 0.5)
        assert float((heads.weight[i].double() @ v[i].double())) > 0.99
        assert math.isclose(float(heads.train_accuracy[i]), max(frac_pos, float(((z @ manual[i].double()) < 0).double().mean())))


def test_uncentered_keeps_the_consensus_direction():
    # A direction everyone agrees on (q = 1) next to a contested one (q = 0.5) with a
    # slightly smaller second moment (3.78 vs 4.5): the uncentered decomposition ranks the
    # consensus first; centering removes its mean (variance 4.5 - 1.43 = 3.07) and ranks the
    # contested direction first.
    v = random_orthonormal(2, 16, seed=3)
    pairs = planted_pairs(5000, v, weights=(0.5, 0.5), scale=(3.0, 2.75), agreement=(1.0, 0.5),
                          noise=0.1, seed=4)
    unc = orient_components(exact_pca(pairs.diffs(), 1, center=False), pairs, progress=False)
    cen = orient_components(exact_pca(pairs.diffs(), 1, center=True), pairs, progress=False)
    assert float(unc.weight[0] @ v[0]) > 0.99
    assert abs(float(cen.weight[0] @ v[1])) > 0.99


@pytest.mark.parametrize("method", ["softmax", "logistic"])
def test_adapted_weights_beat_first_head_on_planted_mix(planted, method):
    v, train, _ = planted
    heads = orient_components(fit_pca(train, 4, progress=False), train, progress=False)
    user = user_pairs(2000, v, user_weights=(0.0, 0.6, 0.8, 0.0), noise=NOISE, seed=9)
    first = float(head_accuracy(heads.weight[0], user)[0])
    accs = []
    for trial in range(5):
        shots, rest = few_shot_split(user.num_pairs, 24, seed=trial)
        hw = adapt_heads(heads, user.select(shots), method=method)
        accs.append(mix_accuracy(heads, hw, user.select(rest)))
    mean_acc = sum(accs) / len(accs)
    assert first < 0.56  # head 0 is orthogonal to the user's preference
    assert mean_acc > first + 0.2, (mean_acc, first)
    if method == "logistic":
        # the regression recovers the planted mix itself: cos(W^T alpha, u) close to 1
        u = 0.6 * v[1] + 0.8 * v[2]
        w, _ = heads.combine(weights=hw.weights)
        assert float(torch.nn.functional.cosine_similarity(w, u, dim=0)) > 0.9
        assert mean_acc > 0.9


def test_softmax_weights_match_hand_computation():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(6, 3, generator=g, dtype=torch.float64)
    r = torch.randn(6, 3, generator=g, dtype=torch.float64)
    hw = fit_head_weights(c, r, method="softmax", temperature=0.7, include_negated=True)
    both = torch.cat([c, r])
    mu, sd = both.mean(0), both.std(0)
    d = (c - r) / sd
    loss = torch.cat([-torch.log(torch.sigmoid(d)).sum(0), -torch.log(torch.sigmoid(-d)).sum(0)])
    w = torch.exp(-loss / 0.7) / torch.exp(-loss / 0.7).sum()
    beta = w[:3] - w[3:]
    torch.testing.assert_close(hw.beta.double(), beta, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hw.weights.double(), beta / sd, rtol=1e-5, atol=1e-7)
    # the raw-score reward equals the standardized mix of the paper, bias included
    s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hw.score(s).double(), ((s - mu) / sd) @ beta, rtol=1e-5, atol=1e-5)


def test_logistic_weights_satisfy_optimality():
    g = torch.Generator().manual_seed(6)
    c = torch.randn(30, 4, generator=g, dtype=torch.float64)
    r = torch.randn(30, 4, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0, 0, -0.5], dtype=torch.float64)
    hw = fit_head_weights(c, r, method="logistic", l2=0.05)
    sd = torch.cat([c, r]).std(0)
    d = (c - r) / sd
    beta = hw.beta.double().requires_grad_(True)
    obj = torch.nn.functional.softplus(-(d @ beta)).mean() + 0.5 * 0.05 * beta @ beta
    (grad,) = torch.autograd.grad(obj, beta)
    assert float(grad.abs().max()) < 1e-5


def test_save_load_roundtrip_and_fused_head_path(planted, tmp_path):
    v, train, heldout = planted
    heads = orient_components(fit_pca(train, 4, progress=False), train, info={"backbone": "x"},
                              progress=False)
    hw = fit_head_weights(heads.scores(heldout.chosen[:32]), heads.scores(heldout.rejected[:32]),
                          method="logistic")
    heads.save(tmp_path / "h", weights={"user": hw})
    back = DecomposedHeads.load(tmp_path / "h")
    hw2 = HeadWeights.load(tmp_path / "h" / "weights_user.json")
    assert torch.equal(back.weight, heads.weight) and back.info == {"backbone": "x"}
    torch.testing.assert_close(hw2.weights, hw.weights)
    assert hw2.bias == hw.bias and hw2.method == "logistic"
    # a D -> 1 head carrying head i scores exactly like row i of the D -> k linear
    hidden = torch.randn(20, D)
    pos = torch.tensor([3, 7, 11, 19])
    multi = multihead_rewards(hidden, pos, back)
    torch.testing.assert_close(multi, back.as_linear()(hidden[pos]))
    lin = nn.Linear(D, 1)
    for i in range(back.num_heads):
        w, b = back.combine(head=i)
        load_into_head(lin, w, b)
        torch.testing.assert_close(lin(hidden[pos])[:, 0], multi[:, i], rtol=1e-5, atol=1e-5)
    w, b = back.combine(weights=hw2.weights, bias=hw2.bias)
    load_into_head(lin, w, b)
    torch.testing.assert_close(lin(hidden[pos])[:, 0], hw2.score(multi), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise(planted):
    v, train, _ = planted
    heads = orient_components(fit_pca(train, 2, progress=False), train, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        heads.combine()
    with pytest.raises(ValueError, match="out of range"):
        heads.combine(head=5)
    with pytest.raises(ValueError, match="one per head"):
        heads.combine(weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="method"):
        fit_head_weights(torch.randn(3, 2), torch.randn(3, 2), method="ridge")
    with pytest.raises(ValueError, match="num_shots"):
        few_shot_split(10, 10)
    with pytest.raises(ValueError, match="nn.Linear"):
        load_into_head(nn.Linear(D + 1, 1), heads.combine(head=0)[0])
    with pytest.raises(ValueError, match="no decomposed heads"):
        DecomposedHeads.load("/nonexistent/heads")


@pytest.mark.parametrize("which", ["head", "mix"])
def test_head_loss_goes_through_fused_path(planted, which):
    from fastrm.data.group import PreferenceGroup
    from fastrm.data.batch import collate_packed
    from fastrm.decompose.heads import head_loss
    from fastrm.functional import comparison_loss

    v, train, _ = planted
    heads = orient_components(fit_pca(train, 4, progress=False), train, progress=False)
    groups = [PreferenceGroup([1, 2, 3], [[4, 5], [6]], [(0, 1, None)]),
              PreferenceGroup([], [[7, 8, 9], [10, 11]], [(1, 0, None)]),
              PreferenceGroup([12], [[13], [14, 15], [16]], [(0, 1, None), (2, 1, None)])]
    batch = collate_packed(groups, prefix_sharing=True)
    hidden = torch.randn(batch.num_tokens, D)
    alpha = torch.tensor([0.3, -1.2, 0.5, 2.0])
    kw = {"head": 2} if which == "head" else {"weights": alpha, "bias": 0.7}
    loss, rewards = head_loss(hidden, batch, heads, **kw)
    w = heads.weight[2] if which == "head" else alpha @ heads.weight
    b = 0.0 if which == "head" else 0.7
    ref_r = hidden.double()[batch.reward_positions] @ w.double() + b
    torch.testing.assert_close(rewards.double(), ref_r, rtol=1e-4, atol=1e-4)
    ref_loss = comparison_loss(ref_r, batch.chosen_index, batch.rejected_index)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
