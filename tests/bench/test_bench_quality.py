"""``benchmarks/bench_quality.py``: its statistics against hand-computed values, its held-out
scorer against the model's own packed and padded forwards, and a quick-mode run end to end
(every setting of the synthetic suites trains with the shipped recipe and is scored)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_quality as bq  # noqa: E402

from fastrm.data.group import PreferenceGroup  # noqa: E402


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------ statistics
def test_ece_matches_a_hand_computed_value():
    # confidences 0.62 (x3: right, right, wrong), 0.93 (right), 0.5 (a tie: half right)
    d = torch.tensor([_logit(0.62), _logit(0.62), -_logit(0.62), _logit(0.93), 0.0])
    out = bq.expected_calibration_error(d)
    # bin [0.60, 0.65): acc 2/3, conf 0.62, weight 3/5; bin [0.90, 0.95): acc 1, conf 0.93,
    # weight 1/5; bin [0.50, 0.55): acc 0.5, conf 0.5 -> 0
    expected = 3 / 5 * abs(2 / 3 - 0.62) + 1 / 5 * abs(1 - 0.93)
    assert out["ece"] == pytest.approx(expected, abs=1e-9)
    counts = [b["count"] for b in out["bins"]]
    assert counts == [1, 0, 3, 0, 0, 0, 0, 0, 1, 0]
    assert out["bins"][2]["accuracy"] == pytest.approx(2 / 3)
    assert bq.pairwise_accuracy(d) == pytest.approx(3 / 5)


def test_ece_is_small_for_calibrated_and_large_for_overconfident_predictions():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200_000, generator=g, dtype=torch.float64) * 2
    # the label agrees with the sign of d with probability sigmoid(|d|): calibrated
    right = torch.rand(d.shape, generator=g, dtype=torch.float64) < torch.sigmoid(d.abs())
    calibrated = torch.where(right, d.abs(), -d.abs())
    assert bq.expected_calibration_error(calibrated)["ece"] < 0.01
    assert bq.expected_calibration_error(calibrated * 4)["ece"] > 0.1


def test_t_interval_matches_a_hand_computed_value():
    out = bq.t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975,2} = 4.3027
    assert out["mean"] == pytest.approx(2.0)
    assert out["half_width"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-6)
    assert (out["lo"], out["hi"]) == pytest.approx((2 - 2.484165, 2 + 2.484165), abs=1e-5)
    one = bq.t_interval([0.7])
    assert one["mean"] == 0.7 and one["half_width"] is None and one["lo"] is None
    with pytest.raises(ValueError):
        bq.t_interval([])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")  # an independent reference (not a dependency)
    for df in range(1, 31):
        assert bq.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)
    assert bq.t_quantile_975(200) == pytest.approx(stats.t.ppf(0.975, 200), rel=0.01)


# ------------------------------------------------------------------------------ data
def _group(k, comps):
    return PreferenceGroup(prompt_tokens=[1, 2], responses=[[10 + i] for i in range(k)],
                           comparisons=comps, prompt_id=7, category="x")


def test_complete_ranking_and_independent_pairs():
    full = _group(3, [(0, 1, 2.0), (0, 2, 3.0), (1, 2, 1.0)])
    assert bq.complete_ranking(full)
    assert not bq.complete_ranking(_group(3, [(0, 1, None), (1, 2, None)]))            # missing
    assert not bq.complete_ranking(_group(3, [(0, 1, None), (1, 2, None), (2, 0, None)]))  # cycle
    pairs = bq.as_independent_pairs([full])
    assert [(p.responses, p.comparisons) for p in pairs] == [
        ([[10], [11]], [(0, 1, 2.0)]), ([[10], [12]], [(0, 1, 3.0)]), ([[11], [12]], [(0, 1, 1.0)])]
    assert all(p.prompt_tokens == [1, 2] and p.prompt_id == 7 for p in pairs)


# ------------------------------------------------------------------------------ scoring
def _tiny_model_and_data(seed=0):
    from omegaconf import OmegaConf

    from fastrm.data.tokenizer import ByteChatTokenizer
    from fastrm.models import tiny_llama3_reward_model
    from fastrm.training.step_data import StepData

    torch.manual_seed(seed)
    model = tiny_llama3_reward_model(vocab_size=261, num_layers=3, num_heads=4, num_kv_heads=2,
                                     embed_dim=32, max_seq_len=1024)
    tok = ByteChatTokenizer()
    groups = bq.prepared_dataset(tok, builder=bq.SYN, split="validation", num_prompts=200,
                                 responses_per_prompt=3, with_margin=False, length_scale=0.2,
                                 max_seq_len=256, max_groups=6, progress=False)
    data = StepData(groups, OmegaConf.create({"max_seq_len": 512, "rows_per_step": 1,
                                              "prefix_sharing": True}), 1, 0, seed=0, train=False)
    return model, data


def test_held_out_scorer_agrees_with_the_full_packed_forward():
    model, data = _tiny_model_and_data()
    for p in [*model.decoder.tok_embeddings.parameters(), *model.decoder.layers[:2].parameters()]:
        p.requires_grad_(False)
    assert bq.frozen_prefix_layers(model) == 2
    scorer = bq.HeldOutScorer(data)
    for _ in range(2):  # the first call fills the cache, the second uses it
        diffs, rewards = scorer.score(model)
        ref_r, ref_d = [], []
        with torch.no_grad():
            for b, real in data.eval_steps():
                r = model.rewards(b)
                ref_r.append(r)
                ref_d.append(r[b.chosen_index] - r[b.rejected_index])
        torch.testing.assert_close(rewards, torch.cat(ref_r), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(diffs, torch.cat(ref_d), rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the top layer and head train: the cache must not hide that
            for p in [*model.decoder.layers[2].parameters(), model.head.weight]:
                p.mul_(1.3)
    cached = scorer._cache
    with torch.no_grad():  # a different frozen trunk (another random init): the cache is rebuilt
        model.decoder.layers[0].attn.q_proj.weight.add_(0.05)
        ref = torch.cat([model.rewards(b) for b in scorer.batches])
    _, rewards = scorer.score(model)
    assert scorer._cache is not cached
    torch.testing.assert_close(rewards, ref, rtol=1e-5, atol=1e-5)


def test_held_out_rewards_match_the_padded_forward_of_each_sequence():
    model, data = _tiny_model_and_data(seed=1)
    scorer = bq.HeldOutScorer(data)
    _, rewards = scorer.score(model)  # nothing frozen: the whole packed forward
    groups = data.packed.units
    # independent path: padded forward of prompt + response, reward at the last token
    seqs = [g.sequence(k) for g in groups for k in range(g.num_responses)]
    assert len(seqs) == rewards.numel()
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        padded = model.rewards_padded(tokens, lengths).float()
    # the packed batches hold the groups in planning order: compare as multisets
    torch.testing.assert_close(torch.sort(rewards).values, torch.sort(padded).values,
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ end to end
def test_quick_mode_trains_and_scores_every_setting(tmp_path):
    assert bq.main(["--mode", "quick", "--suites", "synthetic,synthetic_k4",
                    "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality_quick.json").read_text())
    assert (tmp_path / "quality_quick.md").is_file() and (tmp_path / "quality_quick.png").is_file()
    expected = {(s.suite, s.name) for s in bq.SETTINGS if s.suite != "qa_feedback"}
    assert {(r["suite"], r["setting"]) for r in report["runs"]} == expected
    for run in report["runs"]:
        assert run["steps"] == 2 and run["train_comparisons"] > 0 and run["train_wall_s"] > 0
        assert set(run["held_out"]) == {"validation", "held_out"}
        for m in run["held_out"].values():
            d = torch.tensor(m["diffs"])
            assert d.numel() == m["comparisons"] > 0
            assert m["accuracy"] == pytest.approx(float((d > 0).float().mean()))
            assert m["ece"] == pytest.approx(bq.expected_calibration_error(d)["ece"], abs=1e-4)
    # independent pairs train the grouped suite's comparisons one pair per group
    k4 = {r["setting"]: r for r in report["runs"] if r["suite"] == "synthetic_k4"}
    assert k4["independent_pairs"]["train_groups"] > 3 * k4["grouped"]["train_groups"]
    rows = {(r["suite"], r["setting"], r["held_out"]) for r in report["summary"]}
    assert len(rows) == 2 * len(expected)
    table = (tmp_path / "quality_quick.md").read_text()
    assert "accuracy (95% CI)" in table and "plackett_luce" in table and "margins" in table
    # the table and figure can be rebuilt from the JSON alone
    (tmp_path / "quality_quick.md").unlink()
    (tmp_path / "quality_quick.png").unlink()
    assert bq.main(["--mode", "quick", "--report-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "quality_quick.md").read_text() == table
    assert (tmp_path / "quality_quick.png").is_file()


def test_summary_pairs_each_setting_with_the_reference_seed_by_seed():
    def run(setting, seed, acc):
        return {"suite": "synthetic", "setting": setting, "seed": seed, "train_wall_s": 1.0,
                "train_comparisons": 10, "held_out": {"validation": {
                    "accuracy": acc, "ece": 0.1, "reward_mean": 0.0, "reward_std": 1.0,
                    "comparisons": 20}}}
    runs = [run("bt", 0, 0.5), run("bt", 1, 0.7), run("bt", 2, 0.6),
            run("margins", 2, 0.9), run("margins", 0, 0.6), run("margins", 1, 0.9)]
    rows = {r["setting"]: r for r in bq.summarize(runs)}
    assert rows["bt"]["accuracy_vs_reference"] is None and rows["bt"]["reference"] == "bt"
    delta = rows["margins"]["accuracy_vs_reference"]  # per seed: +0.1, +0.2, +0.3
    assert delta["mean"] == pytest.approx(0.2)
    assert delta["half_width"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-6)
    assert rows["margins"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert rows["margins"]["seeds"] == [0, 1, 2]


def test_options_two_seeds_and_missing_shared_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRM_SHARED_DATA", str(tmp_path / "nowhere"))
    assert bq.main(["--mode", "quick", "--suites", "qa_feedback,synthetic_k4", "--settings",
                    "grouped,independent_pairs", "--seeds", "2", "--steps", "1", "--threads", "1",
                    "--name", "two", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "two.json").read_text())
    assert "no data at" in report["not_applicable"]["qa_feedback"]
    assert sorted((r["setting"], r["seed"], r["steps"]) for r in report["runs"]) == [
        ("grouped", 0, 1), ("grouped", 1, 1),
        ("independent_pairs", 0, 1), ("independent_pairs", 1, 1)]
    for row in report["summary"]:
        assert row["seeds"] == [0, 1] and row["accuracy"]["half_width"] is not None
        if row["setting"] == "grouped":
            acc = {(r["setting"], r["seed"]): r["held_out"][row["held_out"]]["accuracy"]
                   for r in report["runs"]}
            paired = [acc[("grouped", s)] - acc[("independent_pairs", s)] for s in (0, 1)]
            assert row["accuracy_vs_reference"]["mean"] == pytest.approx(sum(paired) / 2)
    with pytest.raises(SystemExit, match="unknown setting"):
        bq.main(["--mode", "quick", "--settings", "bradley", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown suite"):
        bq.main(["--mode", "quick", "--suites", "hh_rlhf", "--out-dir", str(tmp_path)])
