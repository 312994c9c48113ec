"""Test helpers of the inference tests: a tiny reward model and an independent float64
reference scorer (torchtune's own unfused modules, a padded batch with one whole conversation
per row, each conversation tokenized whole)."""

from __future__ import annotations

import random

import torch

from fastrm.models.builders import tiny_llama3_reward_model


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 1024, fused_ops: bool = True):
    m = tiny_llama3_reward_model(vocab_size=vocab_size, seed=seed, max_seq_len=max_seq_len,
                                 embed_dim=32, num_heads=4, num_kv_heads=2, fused_ops=fused_ops)
    with torch.no_grad():  # a head that separates responses (the default init is tiny)
        torch.manual_seed(seed)
        m.head.weight.normal_(0, 1.0)
    return m.eval()


def reference_rewards(model, tokenizer, conversations) -> list[float]:
    """float64 rewards of each whole conversation (list of message dicts): the tokenizer on the
    full conversation, torchtune's unfused modules, a padded batch, no packing."""
    ref = tiny_llama3_reward_model(vocab_size=model.decoder.tok_embeddings.num_embeddings,
                                   max_seq_len=model.decoder.max_seq_len, embed_dim=32,
                                   num_heads=4, num_kv_heads=2, fused_ops=False)
    ref.load_state_dict(model.state_dict())
    ref = ref.double().eval()
    seqs = [tokenizer.tokenize_messages(c)[0] for c in conversations]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        return ref.rewards_padded(tokens, lengths).tolist()


WORDS = "the cat sat on a mat and then it ran far away 東京 😀 café".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_rows(seed: int, n: int = 24) -> list[dict]:
    """Every row format, random lengths, empty responses, extra columns of several types."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        prompt = _text(rng, 5, 40)
        if kind == 0:
            rows.append({"id": i, "prompt": prompt, "response": rng.choice(["", _text(rng, 1, 20)]),
                         "meta": {"k": [1, 2]}})
        elif kind == 1:
            msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(rng, 1, 10)},
                    {"role": "user", "content": _text(rng, 1, 5)},
                    {"role": "assistant", "content": _text(rng, 0, 15)}]
            rows.append({"id": i, "messages": msgs})
        elif kind == 2:
            k = rng.randint(1, 7)
            rows.append({"id": i, "prompt": prompt,
                         "responses": [_text(rng, 0, 25) for _ in range(k)], "flag": True})
        else:  # prompt as messages, response as a message list
            rows.append({"id": i, "prompt": [{"role": "user", "content": prompt}],
                         "response": [{"role": "assistant", "content": _text(rng, 1, 12)}]})
    return rows


def conversations_of(rows: list[dict]) -> list[list[dict]]:
    """The whole conversation of every scored response, row after row (an independent reading
    of the row formats)."""
    def msgs(v, role):
        return [{"role": role, "content": v}] if isinstance(v, str) else list(v)

    out = []
    for r in rows:
        if "messages" in r:
            out.append(list(r["messages"]))
            continue
        p = msgs(r["prompt"], "user") if "prompt" in r else []
        for resp in (r["responses"] if "responses" in r else [r["response"]]):
            out.append(p + msgs(resp, "assistant"))
    return out


def flat_rewards(out: list[dict]) -> list[float]:
    return [x for r in out for x in (r["rewards"] if "rewards" in r else [r["reward"]])]
