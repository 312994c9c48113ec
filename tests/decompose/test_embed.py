"""Embedding extraction with a tiny torchtune Llama: packed (with and without prefix sharing)
equals one unpacked causal forward per sequence; store round trip; the whole chain
embed -> PCA -> heads -> fused-path head scores the model's own rewards."""

import pytest
import torch

from fastrm.data.group import PreferenceGroup
from fastrm.decompose.embed import embed_pairs, jsonl_pairs
from fastrm.decompose.heads import load_into_head, orient_components
from fastrm.decompose.pca import fit_pca
from fastrm.decompose.store import EmbeddingStore
from fastrm.models import tiny_llama3_reward_model


def _groups(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(1, 12, (3,), generator=g))
        if i % 4 == 0:
            lp = 0  # prompt-free pair
        tok = lambda m: torch.randint(5, 200, (m,), generator=g).tolist()  # noqa: E731
        groups = PreferenceGroup(prompt_tokens=tok(lp), responses=[tok(lc), tok(lr)],
                                 comparisons=[(0, 1, None)], prompt_id=i, source_index=i)
        out.append(groups)
    # a grouped prompt: 3 responses, 2 comparisons (one response appears in both)
    out.append(PreferenceGroup(prompt_tokens=[7, 8, 9], responses=[[10, 11], [12], [13, 14, 15]],
                               comparisons=[(2, 0, None), (0, 1, None)], prompt_id=n, source_index=n))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama3_reward_model(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    max_seq_len=64).eval()


def _reference(model, groups):
    cs, rs = [], []
    with torch.no_grad():
        for g in groups:
            for i, j, _ in g.comparisons:
                e = []
                for k in (i, j):
                    seq = torch.tensor([g.sequence(k)])
                    e.append(model.forward_padded(seq)[0, -1].float())
                cs.append(e[0])
                rs.append(e[1])
    return torch.stack(cs), torch.stack(rs)


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("max_tokens", [24, 4096])
def test_packed_embeddings_equal_unpacked_forward(model, prefix_sharing, max_tokens):
    groups = _groups(9, seed=1)
    got = embed_pairs(model, groups, max_tokens=max_tokens, prefix_sharing=prefix_sharing,
                      progress=False)
    ref_c, ref_r = _reference(model, groups)
    assert got.num_pairs == 11 and got.dim == 32
    torch.testing.assert_close(got.chosen, ref_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.rejected, ref_r, rtol=1e-4, atol=1e-4)


def test_store_roundtrip_and_fused_head_scores_like_model(model, tmp_path):
    groups = _groups(40, seed=2)
    store = EmbeddingStore.create(tmp_path / "emb", dim=32, shard_size=16)
    store = embed_pairs(model, groups, store=store, max_tokens=64, progress=False)
    again = EmbeddingStore.open(tmp_path / "emb")
    assert again.num_pairs == 42 and again.info["num_forwards"] >= 2
    mem = embed_pairs(model, groups, max_tokens=64, progress=False)
    torch.testing.assert_close(again.load().chosen, mem.chosen)
    heads = orient_components(fit_pca(again, 3, progress=False), again, progress=False)
    assert bool((heads.train_accuracy >= 0.5).all())
    # head 1 loaded into the model's own D -> 1 head gives rewards r = v_1 . e (+ 0 bias)
    w, b = heads.combine(head=1)
    load_into_head(model.head, w, b)
    with torch.no_grad():
        seq = torch.tensor([groups[3].sequence(0)])
        r = model.rewards_padded(seq, torch.tensor([seq.shape[1]]))
    torch.testing.assert_close(r[0], mem.chosen[3] @ heads.weight[1], rtol=1e-4, atol=1e-4)


def test_jsonl_pairs_reads_one_split(tmp_path):
    from fastrm.data.tokenizer import ByteChatTokenizer

    p = tmp_path / "pairs.jsonl"
    rows = [
        '{"prompt": "q1", "chosen": "good", "rejected": "bad", "split": "train"}',
        '{"prompt": "q2", "chosen": "yes", "rejected": "no", "split": "validation"}',
        '{"prompt": "q3", "chosen": "fine", "rejected": "poor", "split": "train"}',
    ]
    p.write_text("\n".join(rows) + "\n")
    train = jsonl_pairs(ByteChatTokenizer(), str(p), split="train")
    assert len(train) == 2 and all(len(g.comparisons) == 1 for g in train)
    grouped = jsonl_pairs(ByteChatTokenizer(), str(p), group_by_prompt=True)
    assert len(grouped) == 3
    p2 = tmp_path / "grouped.jsonl"
    p2.write_text("\n".join([
        '{"prompt": "q", "chosen": "a", "rejected": "b", "qid": 7}',
        '{"prompt": "q", "chosen": "a", "rejected": "c", "qid": 7}',
        '{"prompt": "r", "chosen": "d", "rejected": "e", "qid": 8}']) + "\n")
    g2 = jsonl_pairs(ByteChatTokenizer(), str(p2), group_by_prompt=True, prompt_id_column="qid")
    assert sorted(len(g.responses) for g in g2) == [2, 3]
    assert sum(len(g.comparisons) for g in g2) == 3
    with pytest.raises(ValueError, match="no row"):
        jsonl_pairs(ByteChatTokenizer(), str(p), split="test")
    with pytest.raises(ValueError, match="does not exist"):
        jsonl_pairs(ByteChatTokenizer(), str(tmp_path / "missing.jsonl"))
