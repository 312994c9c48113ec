"""Append-only, crash-safe JSONL row store used by the generation and labelling jobs.

Contract:

* every row carries a deterministic ``key`` (e.g. ``prompt_id|model|sample_index``);
* rows are appended as whole lines, then the file is flushed and ``fsync``-ed, so after a crash
  or Ctrl-C every row whose ``append`` returned is on disk;
* on reopen, the keys already on disk are read back and the job skips them; a torn last line
  (the process died mid-write) is cut off and reported, never parsed into a half row;
* Parquet is written from the finished JSONL (:func:`jsonl_to_parquet`): Parquet files cannot
  be appended to safely, the JSONL journal can.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Set, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def iter_jsonl(path: PathLike) -> Iterator[Dict[str, Any]]:
    """Yield the rows of a JSONL file (blank lines skipped); a bad line raises ``ValueError``
    naming the file and line number."""
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}); fix or remove that line") from None


def read_rows(path: PathLike) -> List[Dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    return list(iter_jsonl(p))


class JsonlStore:
    """Append-only JSONL file with resume by key.

    Args:
        path: the JSONL file (created with its parent folders if absent).
        key_field: the field holding each row's unique key.

    Attributes:
        keys (Set[str]): keys on disk (read at open, extended by :meth:`append`).
        num_resumed (int): rows found on disk at open.
        num_torn (int): 1 if a torn last line was cut off at open, else 0.
    """

    def __init__(self, path: PathLike, key_field: str = "key") -> None:
        self.path = Path(path)
        self.key_field = key_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: Set[str] = set()
        self.num_torn = 0
        self._repair_and_load()
        self.num_resumed = len(self.keys)
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            data = f.read()
        good_end = 0
        lines = data.split(b"\n")
        offset = 0
        for i, raw in enumerate(lines):
            end = offset + len(raw)
            last = i == len(lines) - 1  # no newline after it: written partly or not at all
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                    if last:
                        raise ValueError("no trailing newline")
                except (ValueError, UnicodeDecodeError) as e:
                    if last:
                        self.num_torn = 1
                        log.warning("%s: cutting off a torn last line (%d bytes): %s", self.path, len(raw), e)
                        break
                    raise ValueError(
                        f"{self.path}:{i + 1}: corrupt line in the middle of the file ({e}); "
                        "remove it by hand, the store only repairs a torn last line"
                    ) from None
                k = row.get(self.key_field)
                if k is None:
                    raise ValueError(f"{self.path}:{i + 1}: row has no '{self.key_field}' field; is this the right file?")
                if k in self.keys:
                    raise ValueError(f"{self.path}:{i + 1}: duplicate key {k!r}; the file was written by another tool")
                self.keys.add(k)
            good_end = end + (0 if last else 1)
            offset = end + 1
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def append(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Write ``rows`` (whole lines), flush and fsync; return how many were written.
        A row whose key is already stored raises ``ValueError`` (the caller should have skipped it)."""
        lines = []
        new_keys = []
        for r in rows:
            k = r[self.key_field]
            if k in self.keys or k in new_keys:
                raise ValueError(f"row key {k!r} already in {self.path}; skip done keys before appending")
            lines.append(json.dumps(r, ensure_ascii=False) + "\n")
            new_keys.append(k)
        if not lines:
            return 0
        self._f.write("".join(lines))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.keys.update(new_keys)
        return len(lines)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "JsonlStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def jsonl_to_parquet(jsonl_path: PathLike, parquet_path: PathLike) -> int:
    """Write the rows of a finished JSONL journal to Parquet (atomic rename); returns the row count.
    The columns are those of all rows (first seen first); a row lacking one has null there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(iter_jsonl(jsonl_path))
    # every column of every row (Table.from_pylist takes the columns of the first row only and
    # would silently drop the others); a row without a column gets null there
    columns = dict.fromkeys(k for r in rows for k in r)
    try:
        table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in columns})
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise ValueError(
            f"{jsonl_path}: rows cannot form one Parquet table ({e}); a field holds values of different "
            "types (e.g. string prompts mixed with message lists): use a .jsonl output"
        ) from None
    tmp = Path(str(parquet_path) + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, parquet_path)
    return len(rows)


def journal_path(output: PathLike) -> Path:
    """The JSONL journal behind an output path: the path itself for ``.jsonl``, and
    ``<output>.journal.jsonl`` for ``.parquet`` (written to Parquet when the job finishes)."""
    p = Path(output)
    if p.suffix == ".parquet":
        return p.with_name(p.name + ".journal.jsonl")
    if p.suffix not in (".jsonl", ".json"):
        raise ValueError(f"output must end in .jsonl or .parquet, got {str(p)!r}")
    return p


def sidecar(output: PathLike, what: str) -> Path:
    """``out.jsonl`` -> ``out.<what>.jsonl`` (errors, dropped pairs, ...)."""
    p = Path(output)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{what}.jsonl")
