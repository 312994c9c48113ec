"""Several ranks build the reward model on the meta device, shard it with FSDP2 and receive
the base checkpoint from rank 0 (:func:`build_sharded_step_module`): the sharded model equals
the one-process model (backbone = the checkpoint's tensors read independently with
safetensors, the fresh head and LoRA adapters, RoPE caches), and so do the loss and the
gradients of a step, on 2 gloo ranks."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fastrm import RewardLoss
from fastrm.data import ByteChatTokenizer, PackedPreferenceDataset, synthetic_preference_dataset
from fastrm.models.random_hf import write_random_llama_checkpoint
from fastrm.training.model_setup import (
    FRESH_SEED_OFFSET, RewardModelStep, build_model, build_sharded_step_module, fresh_parameters,
)

ARCH = dict(vocab_size=261, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=512)
SEED = 7


def lora_cfg(tmp_path: Path):
    ckpt = write_random_llama_checkpoint(tmp_path / "base", seed=3, layers_per_file=1, **ARCH)
    cfg = {
        "model": {"_component_": "fastrm.models.lora_reward_model",
                  "decoder": "fastrm.models.builders.tiny_lora_llama3",
                  "lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0,
                  **ARCH},
        "checkpointer": ckpt,
    }
    return OmegaConf.create(cfg)


def batch():
    groups = synthetic_preference_dataset(ByteChatTokenizer(), num_prompts=24, length_scale=0.1,
                                          max_seq_len=128, progress=False)
    return PackedPreferenceDataset(groups, max_seq_len=512)[0]


def step_result(step, b):
    loss, rewards = step(b)
    loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {
        "loss": loss.detach(), "rewards": rewards.detach(),
        "params": {n: full(p.detach()).clone() for n, p in step.model.named_parameters()},
        "grads": {n: full(p.grad).clone() for n, p in step.model.named_parameters() if p.grad is not None},
        "buffers": {n: b_.clone() for n, b_ in step.model.named_buffers()},
    }


def _worker(rank: int, world: int, init_file: str, cfg_path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = OmegaConf.load(cfg_path)
        step, _ = build_sharded_step_module(cfg, RewardLoss(use_margin=True), torch.device("cpu"),
                                            torch.float32, world, rank, SEED)
        res = step_result(step, batch())
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, cfg) -> dict:
    cfg_path, out = tmp_path / "cfg.yaml", tmp_path / "two.pt"
    OmegaConf.save(cfg, cfg_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(cfg_path), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def test_two_meta_ranks_equal_one_process_with_checkpoint_lora_and_head(tmp_path):
    cfg = lora_cfg(tmp_path)
    two = run_two_ranks(tmp_path, cfg)
    torch.manual_seed(SEED)
    model, _ = build_model(cfg, torch.device("cpu"), torch.float32, seed=SEED)
    one = step_result(RewardModelStep(model, RewardLoss(use_margin=True)), batch())

    # backbone: the checkpoint's tensors, read here with safetensors alone (HF names)
    hf = {}
    for f in sorted((tmp_path / "base").glob("*.safetensors")):
        hf.update(load_file(str(f)))
    torch.testing.assert_close(two["params"]["decoder.tok_embeddings.weight"], hf["model.embed_tokens.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(two["params"]["decoder.layers.1.mlp.w2.weight"],
                               hf["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(two["params"]["decoder.layers.0.attn.q_proj.lora_b.weight"],
                               torch.zeros(64, 4), rtol=0, atol=0)
    # head and adapters: the same draws on both paths, and what their initialisers promise
    assert set(two["params"]) == set(one["params"])
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, rtol=0, atol=0, msg=name)
    head = two["params"]["head.weight"]
    assert abs(head.std().item() - 1 / math.sqrt(65)) < 0.05 and "head.bias" not in two["params"]
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    lora_a = two["params"]["decoder.layers.1.attn.v_proj.lora_a.weight"]
    assert lora_a.abs().max() <= bound and lora_a.abs().max() > 0.8 * bound
    # the head is not the first draws of the stream the config seed starts (backbone init)
    torch.manual_seed(SEED)
    assert not torch.allclose(head, torch.randn(1, 64) / math.sqrt(65))
    # RoPE caches were built (no checkpoint holds them) like the one-process model's
    assert one["buffers"] and set(two["buffers"]) == set(one["buffers"])
    for name, value in one["buffers"].items():
        torch.testing.assert_close(two["buffers"][name], value, msg=name)
    # one step: loss, rewards and gradients of every trainable parameter
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(two["rewards"], one["rewards"], rtol=1e-5, atol=1e-6)
    assert set(two["grads"]) == set(one["grads"]) and any("lora_a" in n for n in one["grads"])
    assert not any("lora" not in n and not n.startswith("head.") for n in one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fresh_parameters_follow_the_seed_and_skip_a_loaded_head(tmp_path):
    cfg = lora_cfg(tmp_path)
    with torch.device("meta"):
        from torchtune import config

        meta = config.instantiate(cfg.model)
    a, b = fresh_parameters(meta, 1), fresh_parameters(meta, 1)
    assert set(a) == {"head.weight"} | {
        f"decoder.layers.{i}.attn.{p}_proj.lora_{ab}.weight" for i in range(2) for p in "qv" for ab in "ab"}
    for k in a:
        assert a[k].device.type == "cpu" and torch.equal(a[k], b[k])
    assert not torch.equal(fresh_parameters(meta, 2)["head.weight"], a["head.weight"])
    # the global RNG is left where it was
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    fresh_parameters(meta, 1)
    assert torch.equal(torch.rand(3), want)
    assert "head.weight" not in fresh_parameters(meta, 1, head=False)
    assert FRESH_SEED_OFFSET != 0


def test_random_checkpoint_loads_in_transformers(tmp_path):
    import transformers  # the reference (dev extra, installed by make test)
    write_random_llama_checkpoint(tmp_path, seed=0, layers_per_file=1, **ARCH)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)
    w = load_file(str(tmp_path / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]))
    torch.testing.assert_close(sd["model.layers.1.self_attn.k_proj.weight"],
                               w["model.layers.1.self_attn.k_proj.weight"])


def test_meta_path_takes_the_head_of_a_reward_model_base_and_of_a_head_file(tmp_path, one_rank_group):
    """A base that is an HF reward model (fastrm.hf.HFCheckpointer maps score.weight to the
    head) gives its head; a head_checkpoint file given as well wins, as on the plain path."""
    from fastrm.hf.export import export_reward_model
    from fastrm.models import tiny_llama3_reward_model
    from fastrm.models.reward_model import write_head

    base = tmp_path / "base"
    write_random_llama_checkpoint(base, seed=3, layers_per_file=1, **ARCH)
    torch.manual_seed(5)
    trained = tiny_llama3_reward_model(**ARCH)
    export_reward_model(tmp_path / "rm", trained, config=base, tokenizer=base)
    model_cfg = {"_component_": "fastrm.models.tiny_llama3_reward_model", **ARCH}
    cfg = OmegaConf.create({"model": model_cfg, "checkpointer": {
        "_component_": "fastrm.hf.HFCheckpointer", "checkpoint_dir": str(tmp_path / "rm")}})
    step, _ = build_sharded_step_module(cfg, RewardLoss(), torch.device("cpu"), torch.float32, 1, 0, SEED)
    got = {k: v.full_tensor() for k, v in step.model.state_dict().items() if hasattr(v, "full_tensor")}
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    head = torch.randn(1, 64)
    write_head(tmp_path / "head.safetensors", head)
    cfg.head_checkpoint = str(tmp_path / "head.safetensors")
    step, _ = build_sharded_step_module(cfg, RewardLoss(), torch.device("cpu"), torch.float32, 1, 0, SEED)
    torch.testing.assert_close(step.model.head.weight.full_tensor(), head, rtol=0, atol=0)
