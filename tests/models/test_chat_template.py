"""fastrm's chat-template tokenization == transformers' ``apply_chat_template``, on three template
families built locally (tests/fixtures/hf_tokenizers.py: SmolLM2/ChatML, Llama-3.1, Qwen2.5).

The reference is transformers itself (``AutoTokenizer.from_pretrained(dir)``); fastrm never
imports it. 50 conversations per family: system turns, multi-turn, unicode, empty and
whitespace-only responses, long texts, special-token text inside messages.
"""

import json
from pathlib import Path

import pytest
from torchtune.data import Message

from fastrm.data import PreferenceDataset
from fastrm.models.chat_template import ChatTemplate
from fastrm.models.tokenizer import HFChatTokenizer, hf_tokenizer
from fastrm.models.tokenizer_files import TokenizerFiles
from fixtures.hf_tokenizers import FAMILIES, LLAMA31_TEMPLATE, QWEN25_TEMPLATE, SMOLLM2_TEMPLATE, \
    build_tokenizer_dir, conversations

import transformers  # the reference (dev extra, installed by make test)

N_CONV = 50


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {f: build_tokenizer_dir(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def hf_toks(family_dirs) -> dict:
    return {f: transformers.AutoTokenizer.from_pretrained(str(d)) for f, d in family_dirs.items()}


def _ids(out) -> list:
    """transformers 5 returns a BatchEncoding from ``apply_chat_template(tokenize=True)``."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_equal_apply_chat_template(family, family_dirs, hf_toks):
    ours, hf = HFChatTokenizer(family_dirs[family]), hf_toks[family]
    assert ours.chat
    convs = conversations(seed=FAMILIES.index(family))
    assert len(convs) == N_CONV
    kinds = {"system": 0, "multi_turn": 0, "empty": 0, "whitespace": 0}
    for conv in convs:
        text = hf.apply_chat_template(conv, tokenize=False)
        assert ours.render(conv) == text
        ids = ours.tokenize_messages(conv)[0]
        assert ids == _ids(hf.apply_chat_template(conv, tokenize=True)), text
        # the generation prompt of the conversation's prompt (what the datasets share)
        gen = ours.tokenize_messages(conv[:-1], add_generation_prompt=True)[0]
        assert gen == _ids(hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True))
        # the reward is read at the last token; HF's SequenceClassification reads the rightmost
        # token that is not pad_token_id: the same one unless the pad token is that token
        assert ids[-1] != hf.pad_token_id or hf.pad_token_id is None
        kinds["system"] += conv[0]["role"] == "system"
        kinds["multi_turn"] += len(conv) > 3
        kinds["empty"] += conv[-1]["content"] == ""
        kinds["whitespace"] += conv[-1]["content"] != "" and not conv[-1]["content"].strip()
    assert all(v >= 5 for v in kinds.values()), kinds


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_mode_equals_trl_text_tokenization(family, family_dirs, hf_toks):
    """Plain mode == ``tokenizer(prompt + response + eos_token)`` (TRL's non-conversational rows),
    post-processor included (Llama adds BOS), EOS read as the reward token."""
    ours, hf = HFChatTokenizer(family_dirs[family], chat=False), hf_toks[family]
    for conv in conversations(seed=10 + FAMILIES.index(family)):
        text = "".join(m["content"] for m in conv)
        ids = ours.tokenize_messages(conv)[0]
        assert ids == hf(text + hf.eos_token)["input_ids"]
        assert ids[-1] == ours.eos_id == hf.eos_token_id
        assert ours.tokenize_messages(conv, add_generation_prompt=True)[0] == hf(text)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_match_transformers(family, family_dirs, hf_toks):
    ours, hf = HFChatTokenizer(family_dirs[family]), hf_toks[family]
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens == {t.content: i for i, t in hf.added_tokens_decoder.items() if t.special}
    for s in ("Hello world", "東京 😀 e\u0301", "a<|im_end|>b", "  \n\n x", ""):
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False)
        assert ours.decode(ours.encode(s)) == hf.decode(hf.encode(s, add_special_tokens=False))
    end = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}[family]
    assert ours.end_token_id == hf.convert_tokens_to_ids(end)
    gen_eos = ours.files.generation_eos_ids()
    assert set(ours.stop_tokens) == {ours.end_token_id, ours.eos_id, *gen_eos}


def test_template_features_render_like_transformers():
    """A template using every environment feature transformers provides: both renderers agree."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tpl = (
        "{%- set ns = namespace(n=0) -%}{{ bos_token }}"
        "{%- for m in messages -%}{%- if m.role == 'skip' %}{% continue %}{% endif -%}"
        "{%- set ns.n = ns.n + 1 -%}[{{ ns.n }}:{{ m.role }}]"
        "{% generation %}{{ m.content | trim }}{% endgeneration %}"
        "{{ {'k': m.content, 'é': [1, 2]} | tojson(indent=2, sort_keys=true) }}"
        "{%- if loop.index > 3 %}{% break %}{% endif -%}{%- endfor -%}"
        "{{ dict(a=1) | tojson }}{{ (strftime_now('%Y') | int) > 2000 }}"
        "{%- if add_generation_prompt %}<gen>{{ extra }}{% endif %}"
    )
    msgs = [{"role": "user", "content": " ünïcödé 😀 "}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "<b>&</b>"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "never"}]
    for gen in (False, True):
        ours = ChatTemplate(tpl, {"bos_token": "<s>"}, {"extra": "E"}).render(msgs, gen)
        theirs = render_jinja_template([msgs], chat_template=tpl, add_generation_prompt=gen,
                                       bos_token="<s>", extra="E")[0][0]
        assert ours == theirs
        assert "never" not in ours and '"é"' in ours and "&" in ours  # no HTML escaping


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="refused.*roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])


def _write_dir(src: Path, dst: Path, config_template=None, jinja=None, extra=None) -> Path:
    dst.mkdir()
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if config_template is not None:
        cfg["chat_template"] = config_template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (dst / "chat_template.jinja").write_text(jinja)
    for name, text in (extra or {}).items():
        (dst / "additional_chat_templates").mkdir(exist_ok=True)
        (dst / "additional_chat_templates" / f"{name}.jinja").write_text(text)
    return dst


def test_template_sources_and_selection(family_dirs, tmp_path):
    """Where a template is read from, as transformers resolves it (checked against it)."""
    src = family_dirs["qwen2"]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    named = [{"name": "default", "template": SMOLLM2_TEMPLATE}, {"name": "tool_use", "template": QWEN25_TEMPLATE}]
    cases = {
        "config_string": _write_dir(src, tmp_path / "a", config_template=SMOLLM2_TEMPLATE),
        "config_named": _write_dir(src, tmp_path / "b", config_template=named),
        "jinja_wins": _write_dir(src, tmp_path / "c", config_template=QWEN25_TEMPLATE, jinja=SMOLLM2_TEMPLATE),
        "jinja_dir": _write_dir(src, tmp_path / "d", jinja=SMOLLM2_TEMPLATE, extra={"tool_use": QWEN25_TEMPLATE}),
    }
    for name, d in cases.items():
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        ours = HFChatTokenizer(d)
        assert ours.tokenize_messages(conv)[0] == _ids(hf.apply_chat_template(conv)), name
        assert ours.render(conv).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        if name in ("config_named", "jinja_dir"):
            tool = HFChatTokenizer(d, chat_template="tool_use")
            assert tool.render(conv) == hf.apply_chat_template(conv, tokenize=False, chat_template="tool_use")
            assert "You are Qwen" in tool.render(conv)
    # a Jinja string instead of the directory's template
    own = HFChatTokenizer(src, chat_template=LLAMA31_TEMPLATE.replace("{{- bos_token }}", ""))
    assert own.render(conv).startswith("<|start_header_id|>system")
    # several templates without a default, an unknown name, no template at all
    nodefault = _write_dir(src, tmp_path / "e", config_template=named[1:] + [{"name": "x", "template": "{{ 1 }}"}])
    with pytest.raises(ValueError, match="no 'default'"):
        HFChatTokenizer(nodefault)
    with pytest.raises(ValueError, match="chat_template='nope'"):
        HFChatTokenizer(cases["config_named"], chat_template="nope")
    bare = _write_dir(src, tmp_path / "f")
    assert not HFChatTokenizer(bare).chat  # no template: plain mode
    with pytest.raises(ValueError, match="no chat template"):
        HFChatTokenizer(bare, chat=True)
    with pytest.raises(ValueError, match="template_kwargs needs chat mode"):
        HFChatTokenizer(bare, template_kwargs={"x": 1})
    bad = _write_dir(src, tmp_path / "g", config_template=[{"template": "x"}])
    with pytest.raises(ValueError, match="chat_template must be"):
        TokenizerFiles.read(bad)


def test_template_kwargs_from_yaml(family_dirs, hf_toks):
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({"tokenizer": {
        "_component_": "fastrm.models.tokenizer.hf_tokenizer", "path": str(family_dirs["llama3"]),
        "template_kwargs": {"date_string": "01 Jan 2030"}}})
    tok = config.instantiate(cfg.tokenizer)
    conv = conversations(seed=5, n=3)[0]
    assert "Today Date: 01 Jan 2030" in tok.render(conv)
    ref = hf_toks["llama3"].apply_chat_template(conv, tokenize=True, date_string="01 Jan 2030")
    assert tok.tokenize_messages(conv)[0] == _ids(ref)
    assert isinstance(hf_tokenizer(str(family_dirs["llama3"])), HFChatTokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_follow_messages(family, family_dirs):
    """Tokens of masked messages are masked; the reference boundary is the prompt tokenized alone
    (a prefix of the conversation for these conversations)."""
    tok = HFChatTokenizer(family_dirs[family])
    checked = 0
    for conv in conversations(seed=20):
        prompt = [Message(m["role"], m["content"], masked=True) for m in conv[:-1]]
        msgs = prompt + [Message("assistant", conv[-1]["content"])]
        tokens, mask = tok.tokenize_messages(msgs)
        alone = tok.tokenize_messages(prompt)[0]
        assert len(mask) == len(tokens)
        if tokens[:len(alone)] != alone:
            continue
        checked += 1
        assert mask == [True] * len(alone) + [False] * (len(tokens) - len(alone))
        gen, gmask = tok.tokenize_messages(prompt[:1], add_generation_prompt=True)
        assert all(gmask)  # the generation prompt is masked like torchtune's
        plain = [Message(m.role, m.content) for m in msgs]
        assert not any(tok.tokenize_messages(plain)[1])
    assert checked >= 40


def test_truncation_keeps_the_closing_tokens(family_dirs):
    tok = HFChatTokenizer(family_dirs["smollm2"])
    conv = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "answer " * 80}]
    full = tok.tokenize_messages(conv)[0]
    cut = HFChatTokenizer(family_dirs["smollm2"], max_seq_len=40)
    tokens, mask = cut.tokenize_messages(conv)
    end = tok.encode("<|im_end|>\n")
    assert len(tokens) == len(mask) == 40 and cut.num_truncated == 1
    assert tokens == full[:38] + end and full[-2:] == end
    gen, _ = cut.tokenize_messages(conv[:1], add_generation_prompt=True)
    assert gen[-3:] == tok.encode("<|im_start|>assistant\n") and len(gen) == 40
    with pytest.raises(ValueError, match="max_seq_len=40"):
        HFChatTokenizer(family_dirs["smollm2"], max_seq_len=40, truncation="error").tokenize_messages(conv)
    with pytest.raises(ValueError, match="truncation"):
        HFChatTokenizer(family_dirs["smollm2"], truncation="left")
    with pytest.raises(ValueError, match="max_seq_len"):
        HFChatTokenizer(family_dirs["smollm2"], max_seq_len=1)


def test_transform_and_bad_input(family_dirs, tmp_path):
    tok = HFChatTokenizer(family_dirs["qwen2"])
    msgs = [Message("user", "Hi"), Message("assistant", "Hello")]
    sample = tok({"messages": msgs, "id": 7})
    assert set(sample) == {"tokens", "mask", "id"} and sample["tokens"] == tok.tokenize_messages(msgs)[0]
    inf = tok({"messages": msgs[:1]}, inference=True)
    assert tok.decode(inf["tokens"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="messages is empty"):
        tok.tokenize_messages([])
    with pytest.raises(ValueError, match="content must be text"):
        tok.tokenize_messages([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", add_bos=True)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFChatTokenizer(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_dataset_prefix_sharing_is_exact(family, family_dirs, hf_toks):
    """Through a dataset: ``prompt_tokens + responses[k]`` is HF's tokenization of the full
    conversation, and the shared prompt is the generation prompt whenever that is a prefix."""
    tok, hf = HFChatTokenizer(family_dirs[family]), hf_toks[family]
    convs = conversations(seed=30 + FAMILIES.index(family))
    rows = [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": f"No. {i}"}]}
            for i, c in enumerate(convs)]
    ds = PreferenceDataset(tok, data=rows, progress=False)
    assert len(ds) == N_CONV
    for g, row in zip(ds, rows):
        for k, resp in enumerate((row["chosen"], row["rejected"])):
            assert g.sequence(k) == _ids(hf.apply_chat_template(row["prompt"] + resp))
        gen = tok.tokenize_messages(row["prompt"], add_generation_prompt=True)[0]
        if all(g.sequence(k)[:len(gen)] == gen for k in range(2)):
            assert g.prompt_tokens[:len(gen)] == gen
    assert ds.stats["prompt_not_generation_prefix"] == sum(
        1 for r in rows if any(
            tok.tokenize_messages(r["prompt"] + resp)[0][:len(p)] != p
            for p in [tok.tokenize_messages(r["prompt"], add_generation_prompt=True)[0]]
            for resp in (r["chosen"], r["rejected"])))


def test_warns_when_transformers_would_rebuild_the_pre_tokenizer(family_dirs, tmp_path, caplog):
    """A directory declaring GPT2Tokenizer whose tokenizer.json has more than a ByteLevel
    pre-tokenizer (SmolLM2's Digits step): transformers 5 would tokenize it differently."""
    d = _write_dir(family_dirs["smollm2"], tmp_path / "gpt2", config_template=SMOLLM2_TEMPLATE)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    with caplog.at_level("WARNING", logger="fastrm.models.tokenizer"):
        HFChatTokenizer(d)
    assert not caplog.records
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    with caplog.at_level("WARNING", logger="fastrm.models.tokenizer"):
        HFChatTokenizer(d)
    assert "PreTrainedTokenizerFast" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_left_prompt_truncation_keeps_the_reward_token(family, family_dirs, hf_toks):
    """The dataset's ``left_prompt`` policy cuts the prompt from the left: every kept sequence is
    the end of HF's full tokenization, so it still ends on the reward token."""
    tok, hf = HFChatTokenizer(family_dirs[family]), hf_toks[family]
    convs = [c for c in conversations(seed=40) if len(c[-1]["content"]) < 60]
    rows = [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": "no"}]}
            for c in convs]
    L = 48
    ds = PreferenceDataset(tok, data=rows, max_seq_len=L, truncation="left_prompt", progress=False)
    assert ds.stats["truncated_prompts"] > 0
    for g in ds:
        row = rows[g.source_index]
        for k, resp in enumerate((row["chosen"], row["rejected"])):
            full = _ids(hf.apply_chat_template(row["prompt"] + resp))
            seq = g.sequence(k)
            assert len(seq) <= L and seq == full[len(full) - len(seq):]
