"""Grouped responses: rows of one prompt -> one group, scores/ranks -> comparisons, duplicates,
contradictions and ties counted, expansion back to pairs, packed groups vs expanded pairs."""

import itertools
import random

import pytest

from fastrm import datasets
from fastrm.data import (
    GroupingStats, PreferenceDataset, collate_packed, comparisons_from_ranking,
    comparisons_from_scores, expand_to_pairs, merge_comparisons,
)


def test_merge_comparisons_counts_duplicates_and_contradictions():
    stats = GroupingStats()
    keys, comps = merge_comparisons(
        [("a", "b", None), ("a", "b", None), ("b", "c", None), ("c", "b", None), ("a", "c", None)],
        stats)
    assert keys == ["a", "b", "c"]
    assert comps == [(0, 1, None), (0, 2, None)]  # b/c contradictory: both dropped
    assert stats.duplicates == 1 and stats.contradictions == 1
    with pytest.raises(ValueError, match="different margins"):
        merge_comparisons([("a", "b", 1.0), ("a", "b", 2.0)])


def test_scores_to_comparisons_against_bruteforce():
    rng = random.Random(0)
    for _ in range(50):
        scores = [rng.choice([1.0, 2.0, 2.5, 4.0, 7.0]) for _ in range(rng.randint(2, 7))]
        stats = GroupingStats()
        comps = comparisons_from_scores(scores, scale=0.5, stats=stats)
        want = {(i, j): 0.5 * (scores[i] - scores[j]) for i, j in
                itertools.permutations(range(len(scores)), 2) if scores[i] > scores[j]}
        assert {(i, j): m for i, j, m in comps} == pytest.approx(want)
        ties = sum(1 for i, j in itertools.combinations(range(len(scores)), 2)
                   if scores[i] == scores[j])
        assert stats.ties == ties and len(comps) + ties == len(scores) * (len(scores) - 1) // 2


def test_ranking_to_comparisons():
    stats = GroupingStats()
    comps = comparisons_from_ranking([2, 4, 1, 3, 1], stats)
    assert all(m is None for _, _, m in comps)
    assert sorted((i, j) for i, j, _ in comps) == sorted(
        [(0, 1), (0, 3), (2, 0), (2, 1), (2, 3), (3, 1), (4, 0), (4, 1), (4, 3)])
    assert stats.ties == 1  # responses 2 and 4 share rank 1


def test_scored_fixture_ultrafeedback_completions(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="json", data_files=str(fixtures / "scored.jsonl"),
                                     format="scored", score_key="overall_score", margin_scale=0.1,
                                     progress=False)
    g = ds[0]
    texts = [tok.decode(r) for r in g.responses]
    assert [t.split("\n")[0] for t in texts] == ["Joyful.", "Sad.", "Glad.", "Hungry."]
    # Joyful and Glad tie (9.0): 5 comparisons, 1 tie
    assert ds.stats["ties"] == 1
    assert sorted((i, j, round(m, 6)) for i, j, m in g.comparisons) == [
        (0, 1, 0.8), (0, 3, 0.65), (2, 1, 0.8), (2, 3, 0.65), (3, 1, 0.15)]


def test_ranked_fixture(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="json", data_files=str(fixtures / "ranked.jsonl"),
                                     format="scored", progress=False)
    g = ds[0]
    assert g.num_responses == 4 and g.num_comparisons == 6
    assert (2, 1, None) in g.comparisons and (0, 3, None) in g.comparisons


def test_group_by_prompt_merges_rows(tok):
    rows = [
        {"prompt": "P", "chosen": "a", "rejected": "b", "qid": 1},
        {"prompt": "P", "chosen": "a", "rejected": "c", "qid": 1},
        {"prompt": "P", "chosen": "a", "rejected": "b", "qid": 1},  # duplicate
        {"prompt": "P", "chosen": "c", "rejected": "d", "qid": 1},
        {"prompt": "P", "chosen": "d", "rejected": "c", "qid": 1},  # contradicts row 3
        {"prompt": "Q", "chosen": "x", "rejected": "y", "qid": 2},
    ]
    from fastrm.data.formats import PairTransform
    ds = PreferenceDataset(tok, data=rows, transform=PairTransform({"prompt_id": "qid"}),
                           group_by_prompt=True, progress=False)
    assert len(ds) == 2
    g = ds[0]
    texts = [tok.decode(r).split("\n")[0] for r in g.responses]
    assert texts == ["a", "b", "c"]  # d was only in the contradictory pair
    assert [(texts[i], texts[j]) for i, j, _ in g.comparisons] == [("a", "b"), ("a", "c")]
    assert ds.stats["grouping_duplicates"] == 1 and ds.stats["grouping_contradictions"] == 1
    assert g.source_index == (0, 1, 2, 3, 4)
    # same key, different prompt text: an error naming the rows
    bad = rows[:2] + [{"prompt": "other", "chosen": "a", "rejected": "b", "qid": 1}]
    with pytest.raises(ValueError, match="rows 0 and 2"):
        PreferenceDataset(tok, data=bad, transform=PairTransform({"prompt_id": "qid"}),
                          group_by_prompt=True, progress=False)


def test_grouped_batch_equals_expanded_pairs(tok):
    ds = datasets.synthetic_preference_dataset(tok, num_prompts=60, responses_per_prompt=4,
                                               progress=False)
    groups = list(ds)[:8]
    pairs = expand_to_pairs(groups)
    assert len(pairs) == sum(g.num_comparisons for g in groups)
    gb, pb = collate_packed(groups, True), collate_packed(pairs, True)
    gb.validate()
    pb.validate()

    def seq_at(b, n):  # full unshared sequence of reward n (prefix tokens + segment)
        cu = b.cu_seqlens.tolist()
        t = int(b.reward_positions[n])
        s = max(k for k in range(len(cu) - 1) if cu[k] <= t)
        a, e = b.segment_prefix[s].tolist()
        return b.tokens[0, a:e].tolist() + b.tokens[0, cu[s]:t + 1].tolist()

    got = [(seq_at(gb, int(c)), seq_at(gb, int(r)), float(m))
           for c, r, m in zip(gb.chosen_index, gb.rejected_index, gb.margin)]
    want = [(seq_at(pb, int(c)), seq_at(pb, int(r)), float(m))
            for c, r, m in zip(pb.chosen_index, pb.rejected_index, pb.margin)]
    assert got == want
    assert gb.num_tokens < pb.num_tokens  # each response computed once


def test_accuracy_by_category_and_batch_categories(tok, fixtures):
    from fastrm.data import accuracy_by_category
    cats = ["a", "a", "a", "b"]
    acc = accuracy_by_category(cats, [1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 2.0, 1.0])
    assert acc == {"a": pytest.approx(1.5 / 3), "b": 1.0, "mean": pytest.approx((0.5 + 1) / 2),
                   "overall": pytest.approx(2.5 / 4)}
    ds = datasets.rewardbench_dataset(tok, source="json", split="train",
                                      data_files=str(fixtures / "rewardbench.jsonl"), progress=False)
    b = collate_packed(list(ds))
    assert b.categories == ["alpacaeval-easy", "refusals-dangerous"]
