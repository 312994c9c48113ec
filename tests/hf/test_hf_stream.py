"""The HF export streams: it converts and writes one decoder layer at a time into safetensors
shards of bounded size, as transformers shards them.

References: transformers' own ``from_pretrained`` (no missing / unexpected keys, rewards of the
sharded export equal the single-file export's), transformers' ``save_pretrained`` index
(``total_size``, keys), and torchtune's whole-state-dict LoRA merge + conversion.
"""

from __future__ import annotations

import json
import re
import weakref

import pytest
import torch
from safetensors.torch import load_file

import fastrm.hf.export as export_mod
from fastrm.hf import HFCheckpointer, export_reward_model
from fastrm.hf.export import ShardWriter, parse_shard_size, write_hf_directory
from fastrm.hf.families import build_decoder, read_config, to_hf
from fastrm.models import RewardModel, load_base_weights
from fastrm.models.tokenizer import HFChatTokenizer
from fixtures.hf_models import build_model_dir, lora_llama_reward_model

import transformers  # the reference (dev extra, installed by make test)

SHARD = 60_000  # bytes: several shards for a tiny model, below its largest tensors


def _model(src, seed: int) -> RewardModel:
    ck = HFCheckpointer(str(src))
    model = RewardModel(build_decoder(ck._config))
    load_base_weights(model, ck.load_checkpoint()["model"])
    torch.manual_seed(seed)
    with torch.no_grad():
        model.head.weight.normal_()
    return model.eval()


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharded_export_equals_single_file(family, tmp_path):
    src = build_model_dir(family, tmp_path / "base", seed=11, dims=dict(num_hidden_layers=3))
    model = _model(src, seed=5)
    cfg, tok = read_config(src), HFChatTokenizer(src)
    one = export_reward_model(tmp_path / "one", model, cfg, tok)
    many = export_reward_model(tmp_path / "many", model, cfg, tok, max_shard_size=SHARD)
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()

    files = sorted(p.name for p in many.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and not (many / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(many.glob(".shard-*"))  # temporary names are gone
    text = (many / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert set(index) == {"metadata", "weight_map"} and text.endswith("}\n")
    assert sorted(set(index["weight_map"].values())) == files
    for f in files:  # the index says where each tensor is, and each shard is bounded
        keys = load_file(str(many / f)).keys()
        assert {k for k, v in index["weight_map"].items() if v == f} == set(keys)
        size = (many / f).stat().st_size
        assert size < SHARD + 4096 or len(keys) == 1, (f, size)

    # the same tensors as the single file, and as transformers' own sharded save
    a, b = _hf_tensors(one), _hf_tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(many), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.save_pretrained(str(tmp_path / "ref"), max_shard_size=SHARD)
    ref = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert set(ref["weight_map"]) == set(index["weight_map"])
    assert ref["metadata"]["total_size"] == index["metadata"]["total_size"]

    hf_one = transformers.AutoModelForSequenceClassification.from_pretrained(str(one)).eval()
    torch.manual_seed(7)
    x = torch.randint(0, cfg["vocab_size"], (4, 13))
    with torch.no_grad():
        r_one, r_many = hf_one(input_ids=x).logits, hf.eval()(input_ids=x).logits
    torch.testing.assert_close(r_many, r_one, atol=1e-6, rtol=0)


def test_writer_holds_about_one_layer(tmp_path, monkeypatch):
    """Bytes held by the writer stay below max(shard, largest tensor); the tensors alive in the
    whole pipeline (source stream -> layer conversion -> writer) stay below one shard plus two
    layers, far below the model."""
    src = build_model_dir("llama", tmp_path / "base", seed=2, dims=dict(num_hidden_layers=8))
    model = _model(src, seed=1)
    sd = model.state_dict()
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    layers: dict[str, int] = {}
    for k, v in sd.items():
        g = re.match(r"decoder\.layers\.\d+\.", k)
        layers[g.group(0) if g else k] = layers.get(g.group(0) if g else k, 0) + nbytes(v)
    total, largest_layer = sum(layers.values()), max(layers.values())
    largest_tensor = max(nbytes(v) for v in sd.values())
    shard = 2 * max(layers[k] for k in layers if k.startswith("decoder.layers."))

    live = {"now": 0, "peak": 0}

    def release(n):
        live["now"] -= n

    def stream():  # fresh tensors, as gathered from FSDP shards; counts what is still alive
        for k, v in sd.items():
            t = v.detach().clone()
            live["now"] += nbytes(t)
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, release, nbytes(t))
            yield k, t
            del t

    writers = []

    class Recording(ShardWriter):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            writers.append(self)

    monkeypatch.setattr(export_mod, "ShardWriter", Recording)
    out = tmp_path / "rm"
    out.mkdir()
    write_hf_directory(out, stream(), read_config(src), HFChatTokenizer(src), max_shard_size=shard)
    (w,) = writers
    assert w.total_bytes <= total  # an untied lm_head is dropped
    assert w.peak_bytes <= max(shard, largest_tensor) <= max(shard, largest_layer)
    assert live["peak"] <= shard + 2 * largest_layer
    assert live["peak"] < total / 2, (live["peak"], total)
    assert len(list(out.glob("model-*.safetensors"))) > 3
    assert transformers.AutoModelForSequenceClassification.from_pretrained(str(out)) is not None


def test_streamed_lora_merge_equals_whole_state_dict_merge(tmp_path):
    """Adapters merged layer by layer, written in shards == torchtune's merge of the whole state
    dict converted at once."""
    from torchtune.modules.peft import get_merged_lora_ckpt

    src, cfg, model = lora_llama_reward_model(tmp_path / "base", seed=3)
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    want = to_hf(get_merged_lora_ckpt(whole, rank=4, alpha=8.0), cfg)
    out = export_reward_model(tmp_path / "rm", model, cfg, HFChatTokenizer(src), lora_rank=4,
                              lora_alpha=8.0, max_shard_size="30KB")
    got = _hf_tensors(out)
    assert (out / "model.safetensors.index.json").is_file()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].contiguous(), atol=0, rtol=0, msg=k)


def test_shard_size_values(tmp_path):
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("40KB") == 40_000
    assert parse_shard_size(123) == 123
    for bad in (0, -5, "lots", True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_shard_size(bad)
    w = ShardWriter(tmp_path, 100)
    w.add("a", torch.zeros(4))
    with pytest.raises(ValueError, match="written twice"):
        w.add("a", torch.zeros(4))
    with pytest.raises(ValueError, match="no tensors"):
        ShardWriter(tmp_path, 100).close()
