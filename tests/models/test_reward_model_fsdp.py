"""FSDP2 ``fully_shard`` per decoder layer + root (what the recipe does), single-rank gloo on CPU:
the sharded model's packed loss and every gradient equal the unsharded model's."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
from rm_layout import pack_groups, random_tokens

from fastrm.functional import comparison_loss, pair_loss
from fastrm.models import register_fsdp_forward_methods, reward_model, tiny_llama3


@pytest.fixture
def single_rank_group(free_port):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_fully_shard_packed_and_padded(single_rank_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = reward_model(tiny_llama3(vocab_size=128, max_seq_len=64))
    ref = copy.deepcopy(model)
    for layer in model.decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_methods(model)

    gen = torch.Generator().manual_seed(1)
    groups = [(random_tokens(p, 128, gen), [random_tokens(n, 128, gen) for n in resp])
              for p, resp in [(5, [3, 1]), (0, [4, 2]), (7, [6, 2, 2])]]
    random.Random(0).shuffle(groups)
    batch = pack_groups(groups, share=True).batch
    tokens = torch.randint(0, 128, (4, 9), generator=gen)
    lengths = torch.tensor([9, 3, 1, 6])

    losses = []
    for m in (model, ref):
        loss = comparison_loss(m.rewards(batch), batch.chosen_index, batch.rejected_index)
        rp = m.rewards_padded(tokens, lengths)
        loss = loss + pair_loss(rp[:2], rp[2:])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, rtol=1e-5, atol=1e-6)
