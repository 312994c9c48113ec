"""``benchmarks/bench_fsdp_memory.py --quick``: a tiny random HF checkpoint trained by the
recipe on 1 rank and on 2 torchrun ranks (gloo); each rank reports its resident high-water
mark after set-up and at the end, the two runs' losses agree, and the table, JSON and figure
are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_fsdp_memory  # noqa: E402


def test_quick_mode_runs_one_and_two_ranks_and_writes_its_report(tmp_path):
    assert bench_fsdp_memory.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fsdp_memory_quick.json").read_text())
    assert (tmp_path / "fsdp_memory_quick.md").is_file() and (tmp_path / "fsdp_memory_quick.png").is_file()
    rows = result["rows"]
    assert [(r["ranks"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    for r in rows:
        assert 0.1 < r["peak_after_setup_gib"] <= r["peak_gib"] < 8
    one = rows[0]["peak_gib"]
    assert abs(result["max_peak_ratio_2_ranks_vs_1"] - max(r["peak_gib"] for r in rows[1:]) / one) < 0.01
    # the same global batches on both runs: the same losses, step by step
    assert len(result["losses_1_rank"]) == len(result["losses_2_ranks"]) == 2
    assert result["max_abs_loss_diff"] <= 1e-5 and result["pass"]["losses"]
    assert result["params"] > 0 and result["machine"]["torch_threads"] == 1
