"""Checkpoint loading (torchtune HF and Meta checkpointers), head files, LoRA, YAML builders."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from rm_layout import pack_sequences, random_tokens

from fastrm.functional import comparison_loss
from fastrm.models import (
    RewardModel,
    load_base_weights,
    load_from_checkpointer,
    load_head,
    lora_reward_model,
    reward_model,
    save_head,
    tiny_llama3,
    tiny_lora_llama3,
)

VOCAB = 128
CFG = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
           max_seq_len=64)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pack_sequences([random_tokens(n, VOCAB, gen) for n in (6, 1, 20, 9)])


def _base_decoder(seed=1):
    torch.manual_seed(seed)
    return tiny_llama3(**CFG)


def _write_hf(decoder, path):
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    sd = tune_to_hf(decoder.state_dict(), num_heads=4, num_kv_heads=2, dim=64)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "num_hidden_layers": 2, "vocab_size": VOCAB, "tie_word_embeddings": False,
    }))


def _write_meta(decoder, path):
    from torchtune.models.convert_weights import tune_to_meta

    torch.save(tune_to_meta(decoder.state_dict()), path / "consolidated.00.pth")


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_load_through_torchtune_checkpointer(fmt, tmp_path):
    from torchtune.training import FullModelHFCheckpointer, FullModelMetaCheckpointer

    base = _base_decoder(seed=1)
    expected = RewardModel(copy.deepcopy(base))
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    if fmt == "hf":
        _write_hf(base, ckpt_dir)
        ckptr = FullModelHFCheckpointer(str(ckpt_dir), ["model.safetensors"], "LLAMA3",
                                        str(tmp_path / "out"))
    else:
        _write_meta(base, ckpt_dir)
        ckptr = FullModelMetaCheckpointer(str(ckpt_dir), ["consolidated.00.pth"], "LLAMA3",
                                          str(tmp_path / "out"))
    model = RewardModel(_base_decoder(seed=99))  # different random weights before loading
    report = load_from_checkpointer(model, ckptr)
    assert report.dropped == ["output.weight"]
    assert report.loaded == len(expected.decoder.state_dict())
    for k, v in expected.decoder.state_dict().items():
        torch.testing.assert_close(model.decoder.state_dict()[k], v, rtol=0, atol=0)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), expected(batch), rtol=1e-6, atol=1e-6)


def test_base_weights_strict(tmp_path):
    model = RewardModel(_base_decoder())
    sd = _base_decoder(seed=2).state_dict()
    sd.pop("layers.0.attn.q_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        load_base_weights(model, sd)
    sd = _base_decoder(seed=2).state_dict()
    sd["layers.9.attn.q_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_base_weights(model, sd)
    # keys with the "decoder." prefix of a saved RewardModel are accepted
    other = RewardModel(_base_decoder(seed=3))
    load_base_weights(model, {k: v for k, v in other.state_dict().items() if k.startswith("decoder.")})
    for k, v in other.decoder.state_dict().items():
        assert torch.equal(model.decoder.state_dict()[k], v)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_head_roundtrip(tmp_path, suffix):
    a = reward_model(_base_decoder(), head_init_std=0.5)
    path = str(tmp_path / f"head{suffix}")
    save_head(a, path)
    b = reward_model(_base_decoder(), head_checkpoint=path)
    assert torch.equal(a.head.weight, b.head.weight) and b.head.bias is None
    c = reward_model(_base_decoder())
    assert not torch.equal(a.head.weight, c.head.weight)  # fresh head differs
    torch.save({"head.weight": torch.zeros(1, 32), "head.bias": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="head.weight"):
        load_head(c, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_head(c, str(tmp_path / "missing.pt"))


def test_fresh_head_init():
    torch.manual_seed(0)
    d = 64
    m = reward_model(tiny_llama3(**{**CFG, "embed_dim": d}))
    assert m.head.bias is None  # bias-free, as HF's score
    std = float(m.head.weight.detach().std())
    assert 0.5 / (d + 1) ** 0.5 < std < 1.5 / (d + 1) ** 0.5


def test_lora_trains_only_adapters_and_head(tmp_path):
    torch.manual_seed(0)
    model = lora_reward_model(
        tiny_lora_llama3, lora_attn_modules=["q_proj", "v_proj", "output_proj"], lora_rank=4,
        lora_alpha=8, **CFG,
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable
    assert all(n.startswith("head.") or "lora_" in n for n in trainable)
    assert sum("lora_a" in n for n in trainable) == 2 * 3  # 2 layers x 3 projections
    # base weights load from a plain (non-LoRA) checkpoint; adapters keep their init
    base = _base_decoder(seed=4)
    report = load_base_weights(model, base.state_dict())
    assert report.adapter_keys_initialised and all("lora" in k for k in report.adapter_keys_initialised)
    # lora_b == 0 at init: the LoRA model equals the base model
    batch = _batch(1)
    plain = RewardModel(copy.deepcopy(base))
    plain.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(batch), plain(batch), rtol=1e-6, atol=1e-6)
    loss = comparison_loss(model.rewards(batch), batch.chosen_index, batch.rejected_index)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert model.head.weight.grad.abs().sum() > 0
    # lora_a gets a zero gradient while lora_b == 0 (its init); lora_b must move
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if "lora_b" in n)
    # torchtune's own peft helpers see the head as trainable too (a torchtune LoRA recipe works)
    from torchtune.modules.peft import get_adapter_params

    assert "head.weight" in set(get_adapter_params(model))
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        lora_reward_model(tiny_lora_llama3, apply_lora_to_output=True, **CFG)


def test_yaml_component_instantiation():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({
        "model": {"_component_": "fastrm.models.reward_model",
                  "decoder": "fastrm.models.tiny_llama3", "head_init_std": 0.02,
                  "attention_backend": "sdpa_segments", **CFG},
        "lora": {"_component_": "fastrm.models.lora_reward_model",
                 "decoder": "fastrm.models.tiny_lora_llama3",
                 "lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 2, "lora_alpha": 4, **CFG},
    })
    m = config.instantiate(cfg.model)
    assert isinstance(m, RewardModel) and m.attention_backend == "sdpa_segments"
    assert m.embed_dim == 64
    lm = config.instantiate(cfg.lora)
    assert isinstance(lm, RewardModel)
    assert sum(p.requires_grad for p in lm.parameters()) == 2 * 2 * 2 + 1  # adapters + head.weight
    out = m(_batch())
    assert out.shape == (_batch().num_tokens, 64)
    with pytest.raises(ValueError, match="cannot import"):
        reward_model("fastrm.models.no_such_builder")
