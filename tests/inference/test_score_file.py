"""score_file: incremental output in input order, resumable after a crash with no row lost or
duplicated; a torn last line is repaired; Parquet in and out; a journal of another job is
refused."""

from __future__ import annotations

import json

import pytest

from fastrm.inference import RewardScorer, score_file
from fastrm.judge.store import iter_jsonl
from scoring_ref import random_rows


class Crash(RuntimeError):
    pass


class CrashingScorer(RewardScorer):
    """Fails after ``fail_after`` chunks (a process killed mid-run)."""

    def __init__(self, *a, fail_after: int, **kw):
        super().__init__(*a, **kw)
        self.fail_after = fail_after

    def iter_score(self, rows, start=0):
        for n, chunk in enumerate(super().iter_score(rows, start)):
            if n == self.fail_after:
                raise Crash("injected failure")
            yield chunk


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "input_row"} for r in rows]


def test_resume_after_crash_loses_and_duplicates_nothing(byte_model, byte_tok, tmp_path):
    rows = random_rows(11, n=30)
    src = _write_jsonl(tmp_path / "rows.jsonl", rows)
    clean = tmp_path / "clean.jsonl"
    summary = score_file(RewardScorer(byte_model, byte_tok, chunk_tokens=300), src, clean,
                         progress=False)
    assert summary["scored"] == 30 and summary["resumed"] == 0
    expected = list(iter_jsonl(clean))
    assert [r["input_row"] for r in expected] == list(range(30))

    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        score_file(CrashingScorer(byte_model, byte_tok, chunk_tokens=300, fail_after=3), src, out,
                   progress=False)
    partial = list(iter_jsonl(out))
    assert 0 < len(partial) < 30
    with open(out, "a") as f:  # the process died mid-line
        f.write('{"id": 99, "prompt": "tor')
    summary = score_file(RewardScorer(byte_model, byte_tok, chunk_tokens=300), src, out,
                         progress=False)
    assert summary["resumed"] == len(partial) and summary["scored"] == 30 - len(partial)
    got = list(iter_jsonl(out))
    assert [r["input_row"] for r in got] == list(range(30))
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("reward", "rewards"):
                assert a[k] == pytest.approx(b[k], abs=1e-5)
            else:
                assert a[k] == b[k]
    # a finished job rerun scores nothing
    again = score_file(RewardScorer(byte_model, byte_tok), src, out, progress=False)
    assert again["scored"] == 0 and len(list(iter_jsonl(out))) == 30


def test_journal_of_another_job_is_refused(byte_model, byte_tok, tmp_path):
    rows = random_rows(12, n=6)
    src = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    score_file(RewardScorer(byte_model, byte_tok), src, out, progress=False)
    with pytest.raises(ValueError, match="normalize: False there, True now"):
        score_file(RewardScorer(byte_model, byte_tok, normalize=True, reward_mean=0.0,
                                reward_std=1.0), src, out, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"input_row": 3, "x": 1}) + "\n")
    with pytest.raises(ValueError, match="not the first 1 input rows"):
        score_file(RewardScorer(byte_model, byte_tok), src, other, progress=False)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"input_row": 1, "prompt": "q", "response": "a"}])
    with pytest.raises(ValueError, match="'input_row' column"):
        score_file(RewardScorer(byte_model, byte_tok), bad, tmp_path / "o2.jsonl", progress=False)


def test_parquet_in_and_out(byte_model, byte_tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"question {i}", "response": "answer " * i, "n": i} for i in range(7)]
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out.parquet"
    score_file(RewardScorer(byte_model, byte_tok), src, out, progress=False)
    got = pq.read_table(out).to_pylist()
    ref = RewardScorer(byte_model, byte_tok).score(rows)
    assert [r["n"] for r in got] == list(range(7))
    assert [r["reward"] for r in got] == pytest.approx([r["reward"] for r in ref], abs=1e-5)


def test_parquet_of_mixed_formats_in_and_out(byte_model, byte_tok, tmp_path):
    """Rows of the three formats in one Parquet file (every column in every row, null where a
    row's format has none) score as the JSON rows do, and a Parquet output keeps every row's
    columns and rewards (not only the first row's columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "question 0", "response": "answer", "n": 0},
            {"messages": [{"role": "user", "content": "question 1"},
                          {"role": "assistant", "content": "answer one"}], "n": 1},
            {"prompt": "question 2", "responses": ["a", "bb", ""], "n": 2},
            {"prompt": "question 3", "response": "", "n": 3}]
    ref = RewardScorer(byte_model, byte_tok).score(rows)
    cols = ["prompt", "response", "messages", "responses", "n"]
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in cols}), src)
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        score_file(RewardScorer(byte_model, byte_tok), src, out, progress=False)
    src_jsonl = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "from_jsonl.parquet"
    score_file(RewardScorer(byte_model, byte_tok), src_jsonl, out, progress=False)
    got = pq.read_table(out).to_pylist()
    assert [r["n"] for r in got] == [0, 1, 2, 3]
    for g, r in zip(got, ref):
        for k, v in r.items():
            if k in ("reward", "rewards"):
                assert g[k] == pytest.approx(v, abs=1e-5)
            else:
                assert g[k] == v
    from_parquet = list(iter_jsonl(tmp_path / "out.jsonl"))
    for g, r in zip(from_parquet, ref):
        key = "rewards" if "rewards" in r else "reward"
        assert g[key] == pytest.approx(r[key], abs=1e-5)
