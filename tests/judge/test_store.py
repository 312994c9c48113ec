"""JsonlStore: crash safety (torn last line), resume by key, Parquet export."""

from __future__ import annotations

import json

import pytest

from fastrm.judge.store import JsonlStore, journal_path, jsonl_to_parquet, read_rows, sidecar


def test_append_resume_and_torn_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlStore(p) as s:
        assert s.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}]) == 2
        with pytest.raises(ValueError, match="already"):
            s.append([{"key": "a", "v": 3}])
    # simulate a crash in the middle of writing the third row
    with open(p, "a") as f:
        f.write('{"key": "c", "v": 3, "resp')
    with JsonlStore(p) as s:
        assert s.keys == {"a", "b"} and s.num_resumed == 2 and s.num_torn == 1
        s.append([{"key": "c", "v": 33}])
    rows = read_rows(p)
    assert [r["key"] for r in rows] == ["a", "b", "c"] and rows[2]["v"] == 33
    # a complete JSON line without its newline is also cut (it may be a truncated number)
    with open(p, "a") as f:
        f.write('{"key": "d", "v": 4')
        f.write("}")
    with JsonlStore(p) as s:
        assert "d" not in s and s.num_torn == 1


def test_corrupt_middle_line_and_duplicates_raise(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=":2: corrupt"):
        JsonlStore(p)
    p.write_text('{"key": "a"}\n{"key": "a"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        JsonlStore(p)


def test_parquet_and_paths(tmp_path):
    p = tmp_path / "g.jsonl"
    rows = [{"key": str(i), "sampling": {"temperature": 0.5 * i}, "text": f"t{i}"} for i in range(5)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert jsonl_to_parquet(p, tmp_path / "g.parquet") == 5
    assert read_rows(tmp_path / "g.parquet") == rows
    # rows with different columns: every column is kept, null where a row has none
    mixed = [{"key": "a", "x": 1}, {"key": "b", "y": [1.5]}, {"key": "c", "x": 3, "z": "t"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert jsonl_to_parquet(p, tmp_path / "m.parquet") == 3
    assert read_rows(tmp_path / "m.parquet") == [
        {"key": "a", "x": 1, "y": None, "z": None}, {"key": "b", "x": None, "y": [1.5], "z": None},
        {"key": "c", "x": 3, "y": None, "z": "t"}]
    assert journal_path(tmp_path / "g.parquet").name == "g.parquet.journal.jsonl"
    assert sidecar(tmp_path / "g.jsonl", "errors").name == "g.errors.jsonl"
    with pytest.raises(ValueError, match="jsonl or .parquet"):
        journal_path(tmp_path / "g.csv")
