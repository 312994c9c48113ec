"""Tests of the TRL head-to-head benchmark (``benchmarks/bench_trl.py``, ``trl_plan.py``, ``trl_peer.py``).

* ``step_groups`` (fast, no TRL needed): the grouped layout of a step holds exactly the step's
  pairs, each comparison reading the same two full sequences as the pair it came from.
* the equivalence check (slow, skipped without trl, the ``bench`` extra): on a few synthetic pairs,
  TRL's ``RewardTrainer`` and each fastrm configuration give the same per-step losses within the
  benchmark's tolerances, and a run whose reward head differs is caught by the same check.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_trl  # noqa: E402
from trl_plan import CONFIGS, make_plan  # noqa: E402


def _random_pairs(rng: random.Random, n_prompts: int) -> list[dict]:
    """Pairs of a few prompts, responses drawn from a small pool per prompt (so pairs of one
    prompt share responses, as in qa-feedback), prompts kept together."""
    pairs = []
    for pid in rng.sample(range(1000), n_prompts):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))]
        pool = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 6))] for _ in range(4)]
        for _ in range(rng.randint(1, 5)):
            i, j = rng.sample(range(len(pool)), 2)
            pairs.append({"row": len(pairs), "prompt_id": pid, "prompt": prompt,
                          "chosen": pool[i], "rejected": pool[j]})
    return pairs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grouped_step_holds_the_same_comparisons(seed):
    from fastrm.data import collate_packed

    rng = random.Random(seed)
    pairs = _random_pairs(rng, rng.randint(1, 4))
    groups = bench_trl.step_groups(pairs, "grouped")
    # reference: the pairs' own full sequences, in order
    want = [(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) for p in pairs]
    got = [(g.prompt_tokens + g.responses[i], g.prompt_tokens + g.responses[j])
           for g in groups for i, j, _ in g.comparisons]
    assert sorted(map(str, got)) == sorted(map(str, want))
    assert len(got) == len(pairs)
    for g in groups:  # each distinct response computed once
        assert len({tuple(r) for r in g.responses}) == len(g.responses)
    # the packed batch reads every response at its last token
    batch = collate_packed(groups, prefix_sharing=True)
    distinct = sum(len(g.responses) for g in groups)
    assert batch.reward_positions.numel() == distinct
    assert batch.tokens.shape[1] == sum(len(g.prompt_tokens) + sum(map(len, g.responses))
                                        for g in groups)
    packed = bench_trl.step_groups(pairs, "packed")
    assert [(g.prompt_tokens + g.responses[0], g.prompt_tokens + g.responses[1])
            for g in packed] == want


def test_check_losses_tolerances():
    trl = {"loss": [0.70, 0.69, 0.68]}
    assert bench_trl.check_losses(trl, {"loss": [0.70003, 0.6905, 0.679]}, 1e-4, 5e-3)["ok"]
    assert not bench_trl.check_losses(trl, {"loss": [0.7002, 0.69, 0.68]}, 1e-4, 5e-3)["ok"]
    assert not bench_trl.check_losses(trl, {"loss": [0.70, 0.69, 0.67]}, 1e-4, 5e-3)["ok"]


@pytest.mark.slow
def test_fastrm_matches_trl_losses(smollm2_dir):
    pytest.importorskip("trl", reason="the TRL peer needs the bench extra (pip install 'fastrm[bench]')")
    from trl_peer import run_trl

    ckpt = str(smollm2_dir)
    # lr 1e-4: a step moves the loss far more than the tolerance, so step 2 tests the update
    spec = {"warmup": 0, "steps": 2, "batch_pairs": 3, "lr": 1e-4, "betas": [0.9, 0.999],
            "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0, "dtype": "float32",
            "threads": 1, "seed": 5, "attn_implementation": "sdpa"}
    plan = make_plan("synthetic", {"max_length": 160, "num_prompts": 12,
                                             "length_scale": 1.0}, spec, ckpt)
    trl = run_trl(plan, gradient_checkpointing=True)
    assert trl["checkpointing_on"]
    assert len(trl["loss"]) == 2 and trl["loss"][0] != trl["loss"][1]
    assert abs(trl["loss"][0] - trl["loss"][1]) > 1e-3
    for config in CONFIGS:
        fr = bench_trl.run_fastrm(plan, config, checkpointing=config == "grouped")
        chk = bench_trl.check_losses(trl, fr, 1e-4, 5e-3)
        assert chk["ok"], (config, trl["loss"], fr["loss"])
        assert fr["real_tokens"] == trl["real_tokens"]
    # the check can fail: the same run with a different reward head
    g = torch.Generator().manual_seed(123)
    plan["head_weight"] = plan["head_weight"] + 0.05 * torch.randn(plan["head_weight"].shape,
                                                                   generator=g)
    fr = bench_trl.run_fastrm(plan, "packed", checkpointing=False)
    assert not bench_trl.check_losses(trl, fr, 1e-4, 5e-3)["ok"]
