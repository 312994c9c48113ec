"""Checks of the benchmark helpers whose numbers end up in the tables: token / attention-pair
counts of each layout, the analytic FLOP model and per-repeat ratios (no timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_e2e import collate, counts, random_groups  # noqa: E402


def _brute_pairs(batch) -> int:
    """(query, key) pairs allowed by PackedBatch's attention rule, by enumeration."""
    cu = batch.cu_seqlens.tolist()
    total = 0
    for s, (a, b) in enumerate(zip(cu, cu[1:])):
        p0, p1 = batch.segment_prefix[s].tolist()
        for q in range(a, b):
            total += (q - a + 1) + (p1 - p0)
    return total


@pytest.mark.parametrize("layout", ["packed", "packed+prefix", "grouped"])
def test_packed_counts_match_enumeration(layout):
    groups = random_groups(5, 3, ("lognormal", 9, 0.5), ("lognormal", 7, 0.7), seed=11, vocab=100,
                           cap=64)
    batch = collate(layout, groups)
    tok, pairs, head = common.packed_counts(batch)
    assert tok == batch.tokens.shape[1]
    assert pairs == _brute_pairs(batch)
    assert head == batch.reward_positions.shape[0]


def test_layout_token_counts_by_hand():
    groups = random_groups(3, 3, ("fixed", 5), ("fixed", 4), seed=1, vocab=100)
    # 3 groups x 3 comparisons; each pair = 2 sequences of 5 + 4 tokens
    pairs = 9
    assert collate("packed", groups).tokens.shape[1] == pairs * 2 * 9
    assert collate("packed+prefix", groups).tokens.shape[1] == pairs * (5 + 4 + 4)
    assert collate("grouped", groups).tokens.shape[1] == 3 * (5 + 3 * 4)
    padded = collate("padded", groups)
    assert tuple(padded.tokens.shape) == (2 * pairs, 9) and padded.num_padding_tokens == 0
    ragged = random_groups(2, 2, ("fixed", 3), ("lognormal", 6, 0.9), seed=5, vocab=100)
    pb = collate("padded", ragged)
    lengths = [3 + len(r) for g in ragged for r in g.responses]
    assert pb.num_padding_tokens == len(lengths) * max(lengths) - sum(lengths)


def test_flop_model_by_hand():
    spec = common.ModelSpec("t", "llama3", 10, 2, 4, 2, 8, 16)  # head_dim 2
    # per layer linear params: q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 = 64+64+64+384
    assert spec.linear_params_per_layer == 576
    f = common.layout_flops(spec, computed_tokens=10, attended_pairs=30, head_positions=4)
    assert f == 3 * (2 * (2 * 576 * 10 + 4 * 4 * 2 * 30) + 2 * 8 * 4)
    spec_model = common.build_model(spec, 32, seed=0)
    n = sum(p.numel() for p in spec_model.parameters())
    assert n == spec.num_params()


def test_ratio_stats_pairs_repeats():
    r = common.ratio_stats([2.0, 3.0, 9.0], [1.0, 1.5, 3.0])
    assert (r["min"], r["median"], r["max"]) == (2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="side by side"):
        common.ratio_stats([1.0], [1.0, 2.0])


def test_counts_padded_head_over_every_token():
    spec = common.ModelSpec("t", "llama3", 100, 1, 2, 1, 4, 8)
    groups = random_groups(2, 2, ("fixed", 2), ("fixed", 3), seed=0, vocab=100)
    c_pad = counts(spec, "padded", collate("padded", groups))
    c_pk = counts(spec, "packed", collate("packed", groups))
    # equal lengths: same tokens and attention; padded evaluates the head at all 20 tokens
    assert c_pad["computed_tokens"] == c_pk["computed_tokens"] == 20
    assert c_pad["flops"] - c_pk["flops"] == pytest.approx(3 * 2 * 4 * (20 - 4))
    assert torch.tensor(c_pad["attended_pairs"]) == 4 * 5 * 6 // 2
