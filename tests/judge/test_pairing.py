"""Pairing strategies over generation rows."""

from __future__ import annotations

import random

import pytest

from fastrm.judge.generate import row_key
from fastrm.judge.pairing import make_pairs


def _rows(n_prompts=4, models=(("big", 2), ("mid", 2), ("small", 1)), seed=0):
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for m, n in models:
            for i in range(n):
                rows.append({"key": row_key(f"p{p}", m, i), "prompt_id": f"p{p}", "prompt": f"q{p}", "model": m,
                             "sample_index": i, "response": f"{m}-{p}-{i}-{rng.random():.6f}", "finish_reason": "stop"})
    rng.shuffle(rows)
    return rows


def test_all_pairs():
    rows = _rows()
    rows.append({**rows[0], "key": "dup", "sample_index": 9})  # same text as rows[0]: dropped
    rows.append({**rows[1], "key": "empty", "response": "  "})  # empty: dropped
    pairs, c = make_pairs(rows, "all")
    per_prompt = {p: sum(r["prompt_id"] == p and r["response"].strip() != "" for r in rows) for p in {r["prompt_id"] for r in rows}}
    assert c["candidate_pairs"] == sum(n * (n - 1) // 2 for n in per_prompt.values())
    assert c["dropped_identical"] == 1 and c["dropped_empty"] == 1 and c["pairs"] == len(pairs) == c["candidate_pairs"] - 1
    assert len({p["pair_id"] for p in pairs}) == len(pairs)
    for p in pairs:
        assert p["response_a"] != p["response_b"] and p["response_a"].split("-")[1] == p["response_b"].split("-")[1] == p["prompt_id"][1:]


def test_strong_vs_weak_orientation_and_cap():
    strengths = {"big": 3, "mid": 2, "small": 1}
    pairs, c = make_pairs(_rows(), "strong_vs_weak", strengths=strengths)
    # per prompt: big x mid (2*2) + big x small (2*1) + mid x small (2*1)
    assert c["pairs"] == 4 * (4 + 2 + 2)
    assert all(strengths[p["model_a"]] > strengths[p["model_b"]] for p in pairs)
    capped, _ = make_pairs(_rows(), "strong_vs_weak", strengths=strengths, k=3, seed=1)
    assert len(capped) == 4 * 3 and {p["pair_id"] for p in capped} <= {p["pair_id"] for p in pairs}
    with pytest.raises(ValueError, match="no entry for model"):
        make_pairs(_rows(), "strong_vs_weak", strengths={"big": 1})


def test_random_k_deterministic_per_prompt():
    rows = _rows()
    a, _ = make_pairs(rows, "random_k", k=4, seed=3)
    b, _ = make_pairs(list(reversed(rows)), "random_k", k=4, seed=3)
    assert [p["pair_id"] for p in a] == [p["pair_id"] for p in b] and len(a) == 4 * 4
    # a prompt's draw does not depend on the other prompts
    only_p1, _ = make_pairs([r for r in rows if r["prompt_id"] == "p1"], "random_k", k=4, seed=3)
    assert [p["pair_id"] for p in only_p1] == [p["pair_id"] for p in a if p["prompt_id"] == "p1"]
    other, _ = make_pairs(rows, "random_k", k=4, seed=4)
    assert {p["pair_id"] for p in other} != {p["pair_id"] for p in a}
    with pytest.raises(ValueError, match="random_k"):
        make_pairs(rows, "random_k")
    with pytest.raises(ValueError, match="strategy"):
        make_pairs(rows, "best")


def test_drop_truncated_and_missing_fields():
    rows = _rows(1)
    rows[0]["finish_reason"] = "length"
    _, c = make_pairs(rows, "all", drop_truncated=True)
    assert c["dropped_truncated"] == 1
    with pytest.raises(ValueError, match="no field 'response'"):
        make_pairs([{"key": "x", "prompt_id": "p", "prompt": "q", "model": "m"}], "all")
