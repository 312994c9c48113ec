"""LocalBackend: batched KV-cache sampling against a naive no-cache reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from fastrm.judge.local import LocalBackend, _sample_tokens, _stop_ids, encode_chat_prompt
from fastrm.judge.types import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, GenerationRequest, SamplingParams

PROMPTS = ["hi", "what is two plus two?", "tell me a story about a cat", "x"]


def _msgs(q):
    return [{"role": "user", "content": q}]


@torch.no_grad()
def naive_greedy(model, prompt_ids, n, stop_ids):
    """Full forward on the unpadded sequence each step (no cache, no mask): the reference."""
    toks, lps = list(prompt_ids), []
    for _ in range(n):
        logits = model(torch.tensor([toks]))[0, -1].double()
        t = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        toks.append(t)
        if t in stop_ids:
            break
    return toks[len(prompt_ids):], lps


def test_byte_tokenizer_generation_prompt_by_hand(tokenizer):
    """The prompt leaves the assistant turn open; a response stops at <im_end> or <eos>."""
    b = lambda text: [c + 5 for c in text.encode()]  # noqa: E731 - byte b is token b + 5
    bos, eos, im_start, im_end = 1, 2, 3, 4
    want = [bos, im_start, *b("user\nhi"), im_end, *b("\n"), im_start, *b("assistant\n")]
    assert encode_chat_prompt(tokenizer, _msgs("hi")) == want
    assert _stop_ids(tokenizer) == [eos, im_end]


@pytest.mark.parametrize("chunk", [3, 256])
def test_greedy_batched_kv_cache_matches_naive(tiny_model, tokenizer, chunk):
    be = LocalBackend(tiny_model, tokenizer, max_batch_size=3, prefill_chunk_size=chunk)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True, top_logprobs=5)
    out = be.generate([GenerationRequest(_msgs(q), params, seed=i) for i, q in enumerate(PROMPTS)])
    assert not tiny_model.caches_are_setup()  # caches live only inside a batch
    for q, c in zip(PROMPTS, out):
        ref_ids, ref_lps = naive_greedy(tiny_model, encode_chat_prompt(tokenizer, _msgs(q)), 12, be.stop_ids)
        text_ids = ref_ids[:-1] if ref_ids[-1] in be.stop_ids else ref_ids
        assert c.text == tokenizer.decode(text_ids)
        assert c.num_tokens == len(ref_ids)
        assert c.finish_reason == (FINISH_STOP if ref_ids[-1] in be.stop_ids else FINISH_LENGTH)
        got = [t.logprob for t in c.logprobs]
        assert got == pytest.approx(ref_lps, abs=1e-4)
        for t in c.logprobs:  # greedy: the chosen token is the top alternative
            assert len(t.top) >= 1 and max(t.top.values()) == pytest.approx(t.logprob, abs=1e-6)
            assert list(t.top.values()) == sorted(t.top.values(), reverse=True)


def test_sampling_reproducible_per_row_and_independent_of_batch(tiny_backend):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=10)
    reqs = [GenerationRequest(_msgs(q), params, seed=100 + i) for i, q in enumerate(PROMPTS)]
    together = tiny_backend.generate(reqs)
    alone = [tiny_backend.generate([r])[0] for r in reqs]
    assert [c.text for c in together] == [c.text for c in alone]
    other_seed = tiny_backend.generate([GenerationRequest(_msgs(PROMPTS[2]), params, seed=7)] * 1)[0]
    many = tiny_backend.generate([GenerationRequest(_msgs(PROMPTS[2]), params, seed=s) for s in range(8)])
    assert len({c.text for c in many + [other_seed]}) > 1  # different seeds give different samples


def test_top_k1_and_tiny_top_p_are_greedy(tiny_backend):
    greedy = tiny_backend.generate([GenerationRequest(_msgs(q), SamplingParams(temperature=0.0, max_new_tokens=8)) for q in PROMPTS])
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        p = SamplingParams(temperature=1.5, max_new_tokens=8, **extra)
        got = tiny_backend.generate([GenerationRequest(_msgs(q), p, seed=i) for i, q in enumerate(PROMPTS)])
        assert [c.text for c in got] == [c.text for c in greedy]


def test_sample_tokens_distribution_matches_nucleus_reference():
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 1.5
    T, top_p, top_k = 0.8, 0.75, 5
    # reference: temperature, keep top_k, then the smallest prefix of the sorted probs reaching top_p
    p = torch.softmax(logits[0].double() / T, -1)
    order = torch.argsort(p, descending=True)[:top_k]
    keep, mass = [], 0.0
    pk = p[order] / p[order].sum()
    for i, q in zip(order.tolist(), pk.tolist()):
        keep.append(i)
        mass += q
        if mass >= top_p:
            break
    ref = torch.zeros(7, dtype=torch.float64)
    ref[keep] = p[keep] / p[keep].sum()
    n = 6000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    toks = _sample_tokens(logits.expand(n, 7).contiguous(), SamplingParams(temperature=T, top_p=top_p, top_k=top_k), gens)
    freq = torch.bincount(toks, minlength=7).double() / n
    assert (freq[ref == 0] == 0).all()
    assert torch.allclose(freq, ref, atol=4 * math.sqrt(0.25 / n))


def test_stop_and_length_and_errors(tiny_model, tokenizer):
    be = LocalBackend(tiny_model, tokenizer, max_seq_len=64)
    forced = {"id": tokenizer.im_end_id}
    # force the next token: a hook on the LM head adds a large logit to one id
    h = tiny_model.output.register_forward_hook(lambda mod, inp, out: out if forced["id"] is None else out.index_add(
        -1, torch.tensor([forced["id"]]), torch.full((*out.shape[:-1], 1), 1e4, dtype=out.dtype)))
    try:
        p = SamplingParams(temperature=1.0, max_new_tokens=5)
        out = be.generate([GenerationRequest(_msgs("hello"), p, seed=1), GenerationRequest(_msgs("y" * 80), p, seed=2)])
        assert (out[0].finish_reason, out[0].num_tokens, out[0].text) == (FINISH_STOP, 1, "")
        assert out[1].finish_reason == FINISH_ERROR and "max_seq_len" in out[1].error and out[1].text is None
        forced["id"] = tokenizer.encode("z")[0]
        out = be.generate([GenerationRequest(_msgs("hello"), p, seed=1)])
        assert (out[0].finish_reason, out[0].num_tokens, out[0].text) == (FINISH_LENGTH, 5, "zzzzz")
        # a stop string ends the response before it
        out = be.generate([GenerationRequest(_msgs("hello"), SamplingParams(temperature=0.0, max_new_tokens=9, stop=["zzz"]))])
        assert (out[0].finish_reason, out[0].num_tokens, out[0].text) == (FINISH_STOP, 3, "")
        forced["id"] = None
    finally:
        h.remove()


def test_score_matches_full_forward(tiny_model, tokenizer):
    be = LocalBackend(tiny_model, tokenizer, max_batch_size=2, prefill_chunk_size=4)
    items = [(_msgs("hi"), "hello there"), (_msgs("what is 2+2?"), "4"), (_msgs("a" * 30), "some longer answer text")]
    got = be.score(items)
    for (m, r), (s, n) in zip(items, got):
        p = encode_chat_prompt(tokenizer, m)
        ids = tokenizer.encode(r)
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(torch.tensor([p + ids]))[0].double(), -1)
        ref = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(ids))
        assert n == len(ids)
        assert s == pytest.approx(ref, abs=1e-3)
    with pytest.raises(ValueError, match="empty"):
        be.score([(_msgs("hi"), "")])


@pytest.mark.slow
def test_smollm2_generates_real_text(smollm2_backend):
    be = smollm2_backend
    qs = ["What is the capital of France?", "What is 2+2? Answer with a number.", "Name a primary color."]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    out = be.generate([GenerationRequest(_msgs(q), greedy) for q in qs])
    assert "Paris" in out[0].text
    assert "4" in out[1].text
    assert all(c.ok and c.num_tokens > 0 for c in out)
    # batched (left-padded) greedy equals one-at-a-time greedy
    alone = [be.generate([GenerationRequest(_msgs(q), greedy)])[0].text for q in qs]
    assert alone == [c.text for c in out]
    sampled = be.generate([GenerationRequest(_msgs(qs[0]), SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24), seed=s) for s in range(4)])
    assert len({c.text for c in sampled}) > 1


def test_dtype_names_resolve_like_training(tiny_model, tokenizer, monkeypatch):
    import copy

    from fastrm.training import dtype as dtype_mod

    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtype_mod, "cpu_has_fast_bf16", lambda fast=fast: fast)
        be = LocalBackend(copy.deepcopy(tiny_model), tokenizer, dtype="auto")
        assert be.dtype == want
        assert next(be.model.parameters()).dtype == want
    assert LocalBackend(copy.deepcopy(tiny_model), tokenizer, dtype="fp16").dtype == torch.float16
    with pytest.raises(ValueError, match="not known"):
        LocalBackend(copy.deepcopy(tiny_model), tokenizer, dtype="fp8")
