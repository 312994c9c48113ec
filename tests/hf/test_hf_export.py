"""fastrm reward models as HF reward models, against transformers itself.

For tiny random models of every family (written by transformers' ``save_pretrained``): the
exported directory loads in ``AutoModelForSequenceClassification`` with no missing or unexpected
keys, and on 32 conversations (system turns, multi-turn, unicode, empty responses) transformers'
reward on ``apply_chat_template`` ids, right-padded with the exported pad token, equals fastrm's
packed reward within 1e-4 (fp32). The loader reads both fastrm's export and a directory written
by transformers; torchtune's ``REWARD`` checkpointer reads the export.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastrm.hf import HFCheckpointer, check_conversion, choose_pad_token, export_reward_model, load_reward_model
from fastrm.hf.families import build_decoder, family_for, read_config
from fastrm.models import RewardModel, load_base_weights
from fastrm.models.tokenizer import HFChatTokenizer
from fixtures.hf_models import FAMILIES, build_model_dir, lora_llama_reward_model
from fixtures.hf_tokenizers import FAMILIES as TOKENIZER_FAMILIES, build_tokenizer_dir, conversations

import transformers  # the reference (dev extra, installed by make test)

N_CONVERSATIONS = 32
TOL = 1e-4


def fastrm_model(src) -> RewardModel:
    ck = HFCheckpointer(str(src))
    model = RewardModel(build_decoder(ck._config))
    load_base_weights(model, ck.load_checkpoint()["model"])
    with torch.no_grad():
        model.head.weight.normal_()
    return model.eval()


def packed_rewards(model: RewardModel, ids: list[list[int]]) -> torch.Tensor:
    """All conversations in one packed row (varlen attention), the reward at each last token."""
    lens = torch.tensor([len(i) for i in ids])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    flat = torch.tensor([t for i in ids for t in i])[None]
    pos = torch.cat([torch.arange(n) for n in lens.tolist()])[None]
    with torch.no_grad():
        return model.score(model.hidden_states(flat, pos, cu), cu[1:] - 1)


def hf_rewards(directory, convs) -> tuple[torch.Tensor, list[list[int]]]:
    """transformers' rewards on apply_chat_template ids, one right-padded batch."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert tok.pad_token_id == hf.config.pad_token_id
    ids = [list(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(x)
    for b, i in enumerate(ids):
        x[b, :len(i)] = torch.tensor(i)
        mask[b, :len(i)] = 1
    with torch.no_grad():
        return hf(input_ids=x, attention_mask=mask).logits[:, 0], ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (base dir, export dir, fastrm model), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            src = build_model_dir(family, root / "base", seed=len(cache))
            model = fastrm_model(src)
            out = export_reward_model(root / "rm", model, read_config(src), HFChatTokenizer(src),
                                      reward_mean=0.25, reward_std=1.5)
            cache[family] = (src, out, model)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_equal_rewards(family, exported):
    src, out, model = exported(family)
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(out), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    cfg = json.loads((out / "config.json").read_text())
    base = read_config(src)
    assert cfg["architectures"] == [base["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    assert hf.config.num_labels == 1 and (cfg["mean"], cfg["std"]) == (0.25, 1.5)
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)

    convs = conversations(11, N_CONVERSATIONS)
    assert any(c[-1]["content"] == "" for c in convs) and any(c[0]["role"] == "system" for c in convs)
    r_hf, ids = hf_rewards(out, convs)
    tok = HFChatTokenizer(out)
    assert [tok.tokenize_messages(c)[0] for c in convs] == ids
    assert all(i[-1] != cfg["pad_token_id"] for i in ids)  # HF reads the last token
    r_fastrm = packed_rewards(model, ids)
    assert r_fastrm.std() > 0.1  # rewards that differ, so a wrong token or weight shows
    torch.testing.assert_close(r_hf, r_fastrm, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_round_trips_the_export(family, exported):
    import fastrm

    _, out, model = exported(family)
    assert fastrm.load_reward_model is load_reward_model  # the top-level name
    loaded = load_reward_model(out)
    want = model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (loaded.reward_mean, loaded.reward_std) == (0.25, 1.5)
    assert loaded.tokenizer.pad_id == loaded.config["pad_token_id"]
    assert not loaded.model.training


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_loader_reads_a_sequence_classification_dir_written_by_transformers(family, tmp_path):
    src = build_model_dir(family, tmp_path / "seqcls", seqcls=True, seed=3)
    convs = conversations(5, 16)
    r_hf, ids = hf_rewards(src, convs)
    loaded = load_reward_model(src)
    assert loaded.reward_mean is None
    torch.testing.assert_close(packed_rewards(loaded.model, ids), r_hf, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_torchtune_reward_checkpointer_reads_the_export(family, exported, tmp_path):
    from torchtune.training import FullModelHFCheckpointer

    _, out, model = exported(family)
    ck = FullModelHFCheckpointer(checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
                                 model_type="REWARD", output_dir=str(tmp_path / "tt"))
    sd = ck.load_checkpoint()["model"]
    want = {k[len("decoder."):]: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    assert torch.equal(sd.pop("output.weight"), model.head.weight.detach())
    assert set(sd) == set(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k


def test_sharded_export_loads_everywhere(exported, tmp_path):
    src, _, model = exported("qwen2")
    out = export_reward_model(tmp_path / "sharded", model, read_config(src), HFChatTokenizer(src),
                              max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    ids = [[5, 9, 33, 2], [7, 7, 40]]
    r_hf = torch.stack([transformers.AutoModelForSequenceClassification.from_pretrained(str(out))(
        input_ids=torch.tensor([i])).logits[0, 0] for i in ids]).detach()
    torch.testing.assert_close(packed_rewards(load_reward_model(out).model, ids), r_hf, atol=TOL, rtol=0)


def test_export_merges_lora(tmp_path):
    """A LoRA reward model (torchtune's lora_llama3 builder, adapters trained to non-zero) exports
    with the adapters merged: transformers' reward equals fastrm's."""
    src, cfg, model = lora_llama_reward_model(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_reward_model(tmp_path / "rm", model, cfg, HFChatTokenizer(src), lora_rank=4, lora_alpha=8.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    ids = [[5, 9, 33, 2, 17], [7, 7, 40]]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out))
    r_hf = torch.stack([hf(input_ids=torch.tensor([i])).logits[0, 0] for i in ids]).detach()
    torch.testing.assert_close(packed_rewards(model.eval(), ids), r_hf, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="lora_rank and lora_alpha"):
        export_reward_model(tmp_path / "rm2", model, cfg, HFChatTokenizer(src))


@pytest.mark.parametrize("tok_family", TOKENIZER_FAMILIES)
def test_pad_token_is_never_the_reward_token(tok_family, tmp_path):
    tok = HFChatTokenizer(build_tokenizer_dir(tok_family, tmp_path))
    text, pad = choose_pad_token(tok)
    seqs = [tok.tokenize_messages(c)[0] for c in conversations(3, 50)]
    assert all(s[-1] != pad for s in seqs)
    # the shipped SmolLM2 pad (<|im_end|>) closes every turn: a token the template never writes wins
    assert text == {"smollm2": "<|endoftext|>", "llama3": "<|end_of_text|>", "qwen2": "<|endoftext|>"}[tok_family]


def test_pad_token_error_when_every_special_token_is_used(tmp_path):
    tok = HFChatTokenizer(build_tokenizer_dir("qwen2", tmp_path))
    # pretend the template writes every special token: none is left but the reward token's kin
    tok.special_tokens = {"<|im_end|>": tok.special_tokens["<|im_end|>"]}
    last = tok.tokenize_messages(conversations(0, 1)[0])[0][-1]
    tok.special_tokens = {tok._tok.id_to_token(last): last}
    with pytest.raises(ValueError, match="add a pad token"):
        choose_pad_token(tok)


def test_conversion_check_and_unsupported_families(exported):
    src, _, model = exported("qwen2")
    check_conversion(model.state_dict(), read_config(src))  # the real keys pass
    llama_cfg = read_config(exported("llama")[0])
    with pytest.raises(ValueError, match="llama"):
        check_conversion(model.state_dict(), llama_cfg)  # q/k/v biases have no llama HF name
    qwen3_cfg = read_config(exported("qwen3")[0])
    with pytest.raises(ValueError, match="conversion does not give an HF Qwen3ForSequenceClassification"):
        check_conversion(exported("qwen3")[2].state_dict(), dict(qwen3_cfg, head_dim=16))
    with pytest.raises(ValueError, match=r"model_type 'phi3' .* not supported .*'qwen3'"):
        family_for({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        build_decoder(dict(llama_cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))


def test_loader_refuses_a_causal_lm(exported):
    src, _, _ = exported("gemma")
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(src)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trl_grpo_reward_path_reads_fastrms_reward(family, exported):
    """What TRL's GRPOTrainer / RLOOTrainer do with ``reward_funcs=DIR``: TRL's own
    ``apply_chat_template`` on ``{"messages": prompt + completion}``, the RM tokenizer with
    ``add_special_tokens=False``, right padding, ``logits[:, 0]``; equals fastrm's reward."""
    trl_data = pytest.importorskip("trl.data_utils")  # bench extra
    _, out, model = exported(family)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    convs = conversations(13, 8)
    texts = [trl_data.apply_chat_template({"messages": c}, tok)["text"] for c in convs]
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right",
                 add_special_tokens=False)
    with torch.no_grad():
        r_trl = hf(**inputs).logits[:, 0]
    ids = [HFChatTokenizer(out).tokenize_messages(c)[0] for c in convs]
    torch.testing.assert_close(r_trl, packed_rewards(model, ids), atol=TOL, rtol=0)


def test_export_keeps_the_training_chat_template(exported, tmp_path):
    """A template given as a string in the tokenizer config (not the directory's default) is the
    exported directory's template: transformers renders what training rendered."""
    src, _, model = exported("qwen2")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                "{% endfor %}\n")
    tok = HFChatTokenizer(src, chat_template=template)
    out = export_reward_model(tmp_path / "rm", model, read_config(src), tok)
    assert (out / "chat_template.jinja").read_text() == template
    convs = conversations(17, 6)
    r_hf, ids = hf_rewards(out, convs)
    assert ids == [tok.tokenize_messages(c)[0] for c in convs]
    torch.testing.assert_close(r_hf, packed_rewards(model, ids), atol=TOL, rtol=0)


def test_pad_choice_with_a_template_that_refuses_system_turns(tmp_path):
    """Gemma's and Mistral v0.1's templates raise on a system turn: the pad is chosen from the
    conversations the template renders."""
    import json as _json

    d = build_tokenizer_dir("qwen2", tmp_path)
    cfg = _json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    (d / "tokenizer_config.json").write_text(_json.dumps(cfg))
    tok = HFChatTokenizer(d)
    text, pad = choose_pad_token(tok)
    assert text == "<|endoftext|>"
    (d / "chat_template.jinja").write_text("{{ raise_exception('nothing renders') }}")
    with pytest.raises(ValueError, match="renders none of the probe conversations"):
        choose_pad_token(HFChatTokenizer(d))


def test_decoder_kwargs_read_old_and_new_rope_spellings():
    """transformers < 5 writes ``rope_theta`` + ``rope_scaling``; 5.x writes ``rope_parameters``."""
    from fastrm.hf.families import decoder_kwargs

    base = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = decoder_kwargs(dict(base, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling}))
    new = decoder_kwargs(dict(base, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling}))
    assert old == new and old["rope_base"] == 500000.0 and old["rope_scaling"] == scaling
    assert decoder_kwargs(dict(base, rope_theta=1e4))["rope_scaling"] is None
    assert decoder_kwargs(dict(base, max_position_embeddings=131072), max_seq_len=2048)["max_seq_len"] == 2048
    with pytest.raises(ValueError, match="sliding_window=64 < 4096"):
        decoder_kwargs(dict(base, model_type="qwen2", sliding_window=64, use_sliding_window=True))
    assert decoder_kwargs(dict(base, model_type="mistral", sliding_window=1024))["max_seq_len"] == 1024
