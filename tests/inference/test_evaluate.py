"""evaluate_pairs / pair_metrics / RewardBench sections against hand computations on rewards of
the independent float64 reference scorer; the report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fastrm.datasets import synthetic_preference_dataset
from fastrm.inference import RewardScorer, evaluate_pairs, pair_metrics, section_scores, \
    write_report
from fastrm.judge.store import read_rows
from scoring_ref import reference_rewards

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rewardbench_sections.jsonl"


def test_section_weighting_by_hand():
    # Reasoning: math-prm counts 984 (its 447 pairs up-weighted to the six code subsets' 6 x 164)
    acc = {"math-prm": 1.0, "hep-python": 0.0, "hep-go": 0.5,
           "alpacaeval-easy": 0.9, "mt-bench-med": 0.4,
           "llmbar-natural": 0.2,
           "refusals-dangerous": 1.0, "xstest-should-refuse": 0.5, "not-a-subset": 0.0}
    s = section_scores(acc)
    assert s["Reasoning"] == pytest.approx((984 * 1.0 + 164 * 0.0 + 164 * 0.5) / (984 + 164 + 164))
    assert s["Chat"] == pytest.approx((100 * 0.9 + 40 * 0.4) / 140)
    assert s["Chat Hard"] == pytest.approx(0.2)
    assert s["Safety"] == pytest.approx((100 * 1.0 + 250 * 0.5) / 350)
    assert s["Score"] == pytest.approx((s["Chat"] + s["Chat Hard"] + s["Safety"] + s["Reasoning"]) / 4)
    partial = section_scores({"math-prm": 1.0})
    assert partial["Chat"] is None and partial["Score"] is None and partial["Reasoning"] == 1.0


def test_pair_metrics_by_hand():
    rc = [1.0, 0.5, 2.0, -1.0, 0.0]
    rr = [0.0, 0.5, 3.0, -2.0, 1.0]
    m = pair_metrics(rc, rr, ["a", "a", "b", "b", "b"])
    assert m["pairs"] == 5 and m["ties"] == 1
    assert m["accuracy"] == pytest.approx(2 / 5)  # the tie counts as wrong (RewardBench)
    assert m["accuracy_by_category"]["a"]["accuracy"] == pytest.approx(0.5)
    assert m["accuracy_by_category"]["b"]["accuracy"] == pytest.approx(1 / 3)
    assert m["mean_category_accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    d = np.array(rc) - np.array(rr)
    assert m["margin"]["mean"] == pytest.approx(d.mean())
    assert m["margin"]["p50"] == pytest.approx(float(np.median(d)))
    assert m["margin"]["min"] == -1.0 and m["margin"]["max"] == 1.0
    assert "rewardbench" not in m
    with pytest.raises(ValueError, match="categories has 1 entries for 5"):
        pair_metrics(rc, rr, ["a"])


def test_rewardbench_fixture_against_reference(chatml_model, chatml_tok):
    rows = read_rows(FIXTURE)
    scorer = RewardScorer(chatml_model, chatml_tok, batch_tokens=256, chunk_tokens=200)
    m = evaluate_pairs(scorer, rows, return_scores=True, progress=True)  # several chunks
    conv = []
    for r in rows:
        for k in ("chosen", "rejected"):
            conv.append([{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r[k]}])
    ref = np.array(reference_rewards(chatml_model, chatml_tok, conv)).reshape(-1, 2)
    np.testing.assert_allclose(m["scores"]["chosen"], ref[:, 0], atol=1e-4)
    np.testing.assert_allclose(m["scores"]["rejected"], ref[:, 1], atol=1e-4)
    win = ref[:, 0] > ref[:, 1]
    assert m["pairs"] == len(rows) and m["accuracy"] == pytest.approx(win.mean())
    subsets = [r["subset"] for r in rows]
    by = {s: float(np.mean([w for w, t in zip(win, subsets) if t == s])) for s in set(subsets)}
    for s, a in by.items():
        assert m["accuracy_by_category"][s]["accuracy"] == pytest.approx(a)
    counts = {"alpacaeval-easy": 100, "mt-bench-med": 40, "mt-bench-hard": 37,
              "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "refusals-dangerous": 100,
              "xstest-should-respond": 154, "donotanswer": 136, "math-prm": 984,
              "hep-python": 164, "hep-go": 164}
    sections = {"Chat": ["alpacaeval-easy", "mt-bench-med"],
                "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor"],
                "Safety": ["refusals-dangerous", "xstest-should-respond", "donotanswer"],
                "Reasoning": ["math-prm", "hep-python", "hep-go"]}
    for name, subs in sections.items():
        want = sum(by[s] * counts[s] for s in subs) / sum(counts[s] for s in subs)
        assert m["rewardbench"][name] == pytest.approx(want)
    assert m["rewardbench"]["Score"] == pytest.approx(
        np.mean([m["rewardbench"][s] for s in sections]))


def test_dataset_groups_and_report(byte_model, byte_tok, tmp_path):
    ds = synthetic_preference_dataset(byte_tok, num_prompts=12, seed=3)
    scorer = RewardScorer(byte_model, byte_tok, batch_tokens=1024)
    m = evaluate_pairs(scorer, ds, return_scores=True)
    assert m["pairs"] == sum(len(g.comparisons) for g in ds)
    assert math.isfinite(m["margin"]["std"])
    paths = write_report(m, m.pop("scores"), tmp_path / "eval", title="synthetic")
    assert json.loads(Path(paths["metrics"]).read_text())["pairs"] == m["pairs"]
    assert len(Path(paths["scores"]).read_text().splitlines()) == m["pairs"]
    assert Path(paths["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert "| **all** |" in Path(paths["table"]).read_text()
