"""The real collators' batches (``fastrm.data.batch``) through the reward model: packed rewards,
loss and gradients with prefix sharing / grouped responses == the padded baseline's."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from fastrm.data import collate_packed, collate_padded
from fastrm.data.group import PreferenceGroup
from fastrm.functional import comparison_loss
from fastrm.models import reward_model, tiny_llama3

VOCAB = 128


def _groups(seed: int) -> list[PreferenceGroup]:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    groups = []
    for p, resp in [(6, [4, 1]), (0, [3, 5]), (9, [2, 7, 1]), (1, [1, 2]), (12, [20, 3])]:
        k = len(resp)
        comps = [(0, j, None) for j in range(1, k)]
        groups.append(PreferenceGroup(prompt_tokens=tok(p), responses=[tok(n) for n in resp],
                                      comparisons=comps))
    rng.shuffle(groups)
    return groups


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_real_packer_batch_matches_padded(prefix_sharing):
    groups = _groups(0)
    packed = collate_packed(groups, prefix_sharing=prefix_sharing)
    padded = collate_padded(groups)
    assert packed.has_prefix == prefix_sharing
    torch.manual_seed(0)
    model = reward_model(tiny_llama3(vocab_size=VOCAB, max_seq_len=64))
    ref = copy.deepcopy(model)

    r_packed = model.rewards(packed)
    r_padded = ref.rewards_padded(padded.tokens, padded.lengths)
    torch.testing.assert_close(r_packed.detach(), r_padded.detach(), rtol=1e-5, atol=1e-5)
    loss_p = comparison_loss(r_packed, packed.chosen_index, packed.rejected_index)
    loss_r = comparison_loss(r_padded, padded.chosen_index, padded.rejected_index)
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-6, atol=1e-6)
    loss_p.backward()
    loss_r.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")
