"""FSDP2 shards over a mesh of the run's device: with a GPU visible (here: faked by making
the default accelerator CUDA), a CPU run must not build its mesh on CUDA."""

import torch

from fastrm import RewardLoss
from fastrm.data import ByteChatTokenizer, PackedPreferenceDataset, synthetic_preference_dataset
from fastrm.models import tiny_llama3_reward_model
from fastrm.training.model_setup import RewardModelStep, shard


def test_cpu_run_shards_on_a_cpu_mesh_when_the_default_accelerator_is_cuda(one_rank_group, monkeypatch):
    # what fully_shard without a mesh would pick on a machine with a GPU
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    torch.manual_seed(0)
    model = tiny_llama3_reward_model(vocab_size=261, num_layers=2, num_heads=4, num_kv_heads=2,
                                     embed_dim=64, max_seq_len=512)
    step = RewardModelStep(model, RewardLoss(use_margin=True))
    mesh = shard(step, torch.device("cpu"), world_size=1)
    assert mesh.device_type == "cpu"
    for name, p in step.named_parameters():
        assert p.device_mesh.device_type == "cpu" and p.device.type == "cpu", name
    groups = synthetic_preference_dataset(ByteChatTokenizer(), num_prompts=20, length_scale=0.1,
                                          max_seq_len=128, progress=False)
    loss, rewards = step(PackedPreferenceDataset(groups, max_seq_len=512)[0])
    loss.backward()
    assert torch.isfinite(loss) and rewards.device.type == "cpu"
    assert all(p.grad is not None for p in step.parameters())
