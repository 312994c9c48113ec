"""Grouped responses (issue 14) end to end: one segment ``[prompt][r1]..[rK]`` per prompt gives
the same rewards, loss and parameter gradients as expanding every comparison into an
independent pair, for K = 2..9, empty prompts, one-token responses, and groups split across
rows."""

import itertools
import random

import pytest
import torch

from fastrm import RewardLoss
from fastrm.data import PackedPreferenceDataset, PreferenceGroup, collate_packed, expand_to_pairs
from fastrm.models import tiny_llama3_reward_model

VOCAB = 97


def random_groups(seed: int, n: int, k_range=(2, 9)) -> list[PreferenceGroup]:
    rng = random.Random(seed)
    groups = []
    for g in range(n):
        k = rng.randint(*k_range)
        prompt_len = 0 if g % 4 == 0 else rng.randint(1, 24)
        responses = [[rng.randrange(1, VOCAB) for _ in range(1 if r == 0 else rng.randint(1, 12))]
                     for r in range(k)]
        pairs = list(itertools.combinations(range(k), 2))
        rng.shuffle(pairs)
        comps = []
        for i, j in pairs[: rng.randint(1, len(pairs))]:
            a, b = (i, j) if rng.random() < 0.5 else (j, i)
            comps.append((a, b, rng.uniform(0, 1)))
        groups.append(PreferenceGroup(prompt_tokens=[rng.randrange(1, VOCAB) for _ in range(prompt_len)],
                                      responses=responses, comparisons=comps, prompt_id=g))
    return groups


def summed_loss_and_grads(model, loss_fn, batches):
    """Sum over batches of (mean loss x comparisons): the total that a step normalizes."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    per_comparison = []
    for batch in batches:
        batch.validate()
        hidden = model(batch)
        loss, rewards = loss_fn.from_hidden(hidden, model.head.weight, model.head.bias, batch)
        (loss * batch.num_comparisons).backward()
        total += loss.detach().double() * batch.num_comparisons
        diff = rewards[batch.chosen_index] - rewards[batch.rejected_index]
        per_comparison.extend(diff.tolist())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, sorted(per_comparison), grads


#: fp32 unit roundoff
_EPS32 = torch.finfo(torch.float32).eps


def assert_grads_close(got: dict, want: dict) -> None:
    """Every parameter gradient of one layout equals the other's, to fp32 rounding.

    The two layouts sum the same per-token contributions in different orders (one segment per
    group against one per pair), so each gradient element carries a rounding error of a few ulp
    of the *summands*, not of the element: an element near zero is a cancellation of terms as
    large as the tensor's largest entries. The absolute tolerance is therefore set from the
    tensor's scale, ``16 eps max|g|`` (the observed worst case over seeds 0-7 is ~2.2 eps
    max|g|, on ``head.weight`` and the attention projections), with ``rtol=1e-4`` for the rest
    and a floor of ``1e-6`` for tensors that are themselves a cancellation (``head.bias``: the
    bias cancels in ``r_c - r_r`` and only the centering term is left).
    A wrong layout (a comparison missed, a response read at the wrong position) moves gradients
    by a share of a whole comparison's contribution, orders of magnitude above this bound.
    """
    assert got.keys() == want.keys()
    for name, ref in want.items():
        atol = max(1e-6, 16 * _EPS32 * float(ref.abs().max()))
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_equals_expanded_pairs(seed):
    torch.manual_seed(seed)
    model = tiny_llama3_reward_model(vocab_size=VOCAB, max_seq_len=256, embed_dim=32,
                                     num_heads=4, num_kv_heads=2)
    loss_fn = RewardLoss(use_margin=True, centering_coefficient=0.05)
    groups = random_groups(seed, n=6)
    assert {len(g.responses) for g in groups} >= {2} and max(len(g.responses) for g in groups) > 4

    grouped = collate_packed(groups, prefix_sharing=True)
    pairs = collate_packed(expand_to_pairs(groups), prefix_sharing=False)
    assert grouped.num_comparisons == pairs.num_comparisons
    assert grouped.num_tokens < pairs.num_tokens  # each prompt and response computed once
    lg, dg, gg = summed_loss_and_grads(model, loss_fn, [grouped])
    lp, dp, gp = summed_loss_and_grads(model, loss_fn, [pairs])
    torch.testing.assert_close(lg, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(dg), torch.tensor(dp), rtol=1e-4, atol=1e-5)
    assert len(gg) == len(list(model.parameters()))
    assert_grads_close(gg, gp)


def test_groups_split_across_rows_serve_every_comparison():
    torch.manual_seed(3)
    model = tiny_llama3_reward_model(vocab_size=VOCAB, max_seq_len=256, embed_dim=32,
                                     num_heads=4, num_kv_heads=2)
    loss_fn = RewardLoss(use_margin=True)
    groups = random_groups(7, n=5, k_range=(7, 9))
    biggest = max(g.num_tokens(True) for g in groups)
    row = biggest // 2 + 8  # the largest groups cannot fit one row
    packed = PackedPreferenceDataset(groups, max_seq_len=row, rows_per_step=1, prefix_sharing=True)
    assert packed.stats.split_groups > 0
    assert packed.stats.cross_subgroup_dropped == 0
    split_batches = [packed[i] for i in range(len(packed))]
    assert max(b.num_tokens for b in split_batches) <= row
    pairs = collate_packed(expand_to_pairs(groups), prefix_sharing=False)
    ls, ds, gs = summed_loss_and_grads(model, loss_fn, split_batches)
    lp, dp, gp = summed_loss_and_grads(model, loss_fn, [pairs])
    assert len(ds) == len(dp)
    torch.testing.assert_close(ls, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ds), torch.tensor(dp), rtol=1e-4, atol=1e-5)
    assert_grads_close(gs, gp)
