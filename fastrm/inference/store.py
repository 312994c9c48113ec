"""``fastrm score``'s file job: input rows -> scored rows, journaled and resumable.

Output rows are appended chunk by chunk, in input order, through the judge's crash-safe
:class:`~fastrm.judge.store.JsonlStore` (whole lines, flushed and fsync-ed; a torn last line is
cut off on reopen). Each output row carries ``input_row``, its index in the input, which is the
store's key: a rerun with the same arguments skips the rows already on disk and continues, so
after a crash (or Ctrl-C) no row is lost or written twice. A ``.parquet`` output is journaled to
``<output>.journal.jsonl`` and written to Parquet when the job finishes.

``<output>.meta.json`` records the input, the checkpoint and ``normalize``; resuming with
different ones is an error (the journal would mix two jobs).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tqdm.auto import tqdm

from fastrm._io import atomic_path
from fastrm.judge.store import JsonlStore, journal_path, jsonl_to_parquet, read_rows

log = logging.getLogger(__name__)

__all__ = ["score_file", "KEY_FIELD"]

#: the output column holding each row's input index (the journal's resume key)
KEY_FIELD = "input_row"


def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def _check_meta(output: Path, meta: Mapping[str, Any], resuming: bool) -> None:
    path = _meta_path(output)
    if resuming and path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{output} was written by another scoring job ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                "remove it (and its .meta.json) or choose another --output")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dict(meta), indent=1))


def score_file(scorer, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
               rows: Optional[Sequence[Mapping[str, Any]]] = None, progress: bool = True,
               checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Scores ``input_path`` (``.jsonl`` / ``.json`` lines or ``.parquet``) into ``output_path``
    (``.jsonl`` or ``.parquet``) with ``scorer`` (:class:`~fastrm.inference.RewardScorer`),
    resuming a journal left by an earlier run. ``rows`` overrides reading ``input_path``.

    Returns a summary: ``rows``, ``resumed`` (rows found on disk), ``scored`` (rows scored now),
    ``responses``, ``seconds``, ``rows_per_s``, ``output``.
    """
    import time

    output = Path(output_path)
    if rows is None:
        rows = read_rows(input_path)
    for i, r in enumerate(rows):
        if isinstance(r, Mapping) and KEY_FIELD in r:
            raise ValueError(f"row {i} has a {KEY_FIELD!r} column, which the output uses as its "
                             "resume key; rename it first")
    journal = journal_path(output)
    resuming = journal.exists() and journal.stat().st_size > 0
    _check_meta(output, {"input": str(Path(input_path).resolve()), "checkpoint": checkpoint,
                         "normalize": scorer.normalize, "rows": len(rows)}, resuming)
    t0 = time.perf_counter()
    scored = 0
    with JsonlStore(journal, key_field=KEY_FIELD) as store:
        done = len(store.keys)
        if store.keys != set(range(done)):
            raise ValueError(f"{journal} holds rows {sorted(store.keys)[:5]}... that are not the "
                             f"first {done} input rows; it was not written by `fastrm score` on "
                             "this input: remove it or choose another --output")
        if done > len(rows):
            raise ValueError(f"{journal} has {done} rows but the input has {len(rows)}")
        if done:
            log.info("%s: resuming after %d rows already scored", journal, done)
        bar = tqdm(total=len(rows), initial=done, unit="row", desc="scoring",
                   disable=not progress, dynamic_ncols=True)
        at = done
        for chunk in scorer.iter_score(rows[done:], start=done):
            for r in chunk:
                r[KEY_FIELD] = at
                at += 1
            store.append(chunk)
            scored += len(chunk)
            bar.update(len(chunk))
        bar.close()
    if output != journal:
        jsonl_to_parquet(journal, output)
    seconds = time.perf_counter() - t0
    return {"rows": len(rows), "resumed": done, "scored": scored,
            "responses": scorer.stats["responses"], "seconds": seconds,
            "rows_per_s": scored / seconds if seconds > 0 else float("nan"),
            "output": str(output)}
