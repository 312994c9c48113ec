"""``benchmarks/bench_score.py --quick`` on the tiny model: both scorers agree on every reward,
the table / JSON / PNG are written, the server section measures every client count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_score  # noqa: E402


def test_quick_mode_writes_results_and_scorers_agree(tmp_path):
    out = tmp_path / "score.json"
    res = bench_score.main(["--quick", "--threads", "1", "--prompts", "2", "--clients", "1,4",
                            "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["best_of"] for r in saved["scoring"]] == [4, 16]
    for r in res["scoring"]:
        assert r["max_abs_reward_diff"] < 1e-4  # same checkpoint, same rewards
        assert r["fastrm"]["tokens_computed"] < r["transformers"]["tokens_computed"]
        assert r["fastrm"]["rows_per_s"] > 0 and r["transformers"]["rows_per_s"] > 0
    assert [s["clients"] for s in saved["server"]] == [1, 4]
    assert all(s["p99_ms"] >= s["p50_ms"] > 0 for s in saved["server"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "transformers rows/s" in out.with_suffix(".md").read_text()
