"""Cross-prompt (RPO) data side: embedders, similar-prompt batching, unpaired pools."""

import numpy as np
import pytest
import torch

from fastrm import datasets, functional as F
from fastrm.data import PackedPreferenceDataset, PreferenceGroup, collate_packed, collate_padded
from fastrm.data.cross_prompt import (
    CallableEmbedder, HashedNgramEmbedder, SentenceEmbedder, SimilarityOrder,
    SimilarPromptBatchSampler, embed_groups, sentence_embedder_available,
)


def test_hashed_embedder_deterministic_and_similarity(tok):
    e = HashedNgramEmbedder(dim=512, ngrams=(2, 3, 4))  # byte tokens: letters are unigrams
    a = tok.encode("What is the capital of France? Answer briefly.")
    b = tok.encode("What is the capital of Spain? Answer briefly.")
    c = tok.encode("Reply only with a JSON object with keys name, age.")
    x = e.embed_tokens([a, b, c])
    assert torch.equal(x, HashedNgramEmbedder(dim=512, ngrams=(2, 3, 4)).embed_tokens([a, b, c]))
    assert torch.allclose(x.norm(dim=1), torch.ones(3))
    cos = x @ x.T
    assert cos[0, 1] > 0.7 and cos[0, 2] < 0.5 * cos[0, 1]
    # independent pure-Python evaluation of the documented hash
    ref = np.zeros(512)
    for n in (2, 3, 4):
        for s in range(len(a) - n + 1):
            h = n
            for t in a[s:s + n]:
                h = ((h ^ t) * 0x9E3779B97F4A7C15) % 2**64
                h ^= h >> 29
            ref[h % 512] += -1.0 if h >> 63 else 1.0
    assert np.allclose(x[0].numpy(), ref / np.linalg.norm(ref), atol=1e-6)
    assert not torch.equal(HashedNgramEmbedder(512, (2, 3, 4), seed=1).embed_tokens([a]), x[:1])


def test_embed_groups_once_per_prompt_and_callable():
    calls = []

    def fn(prompts):
        calls.append(len(prompts))
        return torch.tensor([[float(sum(p)), float(len(p))] for p in prompts])

    groups = [PreferenceGroup([1, 2], [[3], [4]], [(0, 1, None)], prompt_id=0),
              PreferenceGroup([5], [[3], [4]], [(0, 1, None)], prompt_id=1),
              PreferenceGroup([1, 2], [[6], [7]], [(0, 1, None)], prompt_id=0)]
    e = embed_groups(groups, CallableEmbedder(fn, batch_size=1))
    assert calls == [1, 1]  # two distinct prompts
    assert e.tolist() == [[3.0, 2.0], [5.0, 1.0], [3.0, 2.0]]


def test_similar_prompt_batches_are_more_similar_than_random(tok):
    ds = datasets.synthetic_preference_dataset(tok, num_prompts=600, progress=False)
    emb = embed_groups(ds, HashedNgramEmbedder(dim=256))
    sampler = SimilarPromptBatchSampler(emb, batch_size=16, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))

    def mean_cos(bs):
        vals = []
        for b in bs:
            x = emb[b]
            c = x @ x.T
            n = len(b)
            if n > 1:
                vals.append(float((c.sum() - c.diag().sum()) / (n * (n - 1))))
        return np.mean(vals)

    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ds))
    random_batches = [perm[i:i + 16].tolist() for i in range(0, len(ds), 16)]
    assert mean_cos(batches) > mean_cos(random_batches) + 0.05
    # categories concentrate: most batches are dominated by one category
    purity = np.mean([max(np.bincount([hash(ds[i].category) % 97 for i in b])) / len(b)
                      for b in batches])
    assert purity > 0.5
    # resume
    state = sampler.state_dict(batches_done=3)
    s2 = SimilarPromptBatchSampler(emb, batch_size=16, seed=0)
    s2.load_state_dict(state)
    assert list(s2) == batches[3:]
    # contrast weights from these embeddings are rows of a softmax (loss-side contract)
    b = collate_padded([ds[i] for i in batches[0]])
    pe = emb[batches[0]]
    w = F.prompt_similarity_weights(pe, pe, temperature=0.1)
    assert torch.allclose(w.sum(1), torch.ones(len(batches[0])))
    assert b.chosen_index.numel() == len(batches[0])


def test_packed_steps_with_similarity_order(tok):
    ds = datasets.synthetic_preference_dataset(tok, num_prompts=600, max_seq_len=512,
                                               progress=False)
    emb = embed_groups(ds)
    order = SimilarityOrder(emb, seed=0)
    window = 24
    packed = PackedPreferenceDataset(ds, max_seq_len=2048, rows_per_step=1, order_key=order,
                                     window=window, seed=0)
    seen = []
    for i in range(len(packed)):
        b = packed[i]
        b.validate()
        seen.extend(id(g) for g in packed.step_groups(i))
    assert sorted(seen) == sorted(id(g) for g in ds)
    # steps hold prompts that are neighbours along the projection
    key = order(0)
    pos = {id(g): k for k, g in enumerate(ds)}
    spread = np.mean([np.ptp([key[pos[id(g)]] for g in packed.step_groups(i)])
                      for i in range(len(packed)) if len(packed.step_groups(i)) > 1])
    assert spread < 0.5 * np.ptp(key)


def test_unpaired_pools(tok, fixtures):
    ds = datasets.unpaired_preference_dataset(
        tok, source="json", data_files=str(fixtures / "unpaired.jsonl"), progress=False)
    assert [g.labels for g in ds] == [[1], [-1], [1]]
    assert ds[0].prompt_id == ds[1].prompt_id != ds[2].prompt_id
    b = collate_packed(list(ds), prefix_sharing=True)
    b.validate()
    assert b.num_comparisons == 0
    assert b.labels.tolist() == [1, -1, 1]
    assert b.prompt_ids.tolist() == [0, 0, 1]
    assert tok.decode(b.tokens[0, :b.reward_positions[0] + 1].tolist()).endswith("9\n")


def test_sentence_embedder_optional():
    ok, why = sentence_embedder_available()
    if not ok:
        pytest.skip(why)
    e = SentenceEmbedder()
    g = [PreferenceGroup([1], [[2]], [], prompt_text=t) for t in
         ("What is the capital of France?", "Which city is France's capital?", "Bake bread.")]
    x = e(g)
    assert x.shape == (3, 384)
    cos = x @ x.T
    assert cos[0, 1] > cos[0, 2]
