"""Diverse multi-model response generation, written incrementally and resumable.

For every prompt and every :class:`ModelEntry` (a backend + sampling settings + ``n``), the
driver produces ``n`` responses and writes one row per response::

    {"key", "prompt_id", "prompt", "model", "sample_index", "seed", "sampling",
     "response", "finish_reason", "num_tokens", "attempts"}

``key = json.dumps([prompt_id, model, sample_index])`` is deterministic, and so is each row's
``seed`` (a hash of the base seed, prompt id, model name and sample index). Rows go to an
append-only JSONL journal (:class:`~fastrm.judge.store.JsonlStore`, fsync per batch); a rerun
reads the keys on disk and generates only the missing rows, so an interrupted run loses nothing
already written and a resumed run neither duplicates nor skips rows. Requests that fail (after
the backend's retries) are written to ``<output>.errors.jsonl`` with the error and are *not*
marked done, so the next run retries them. For a ``.parquet`` output the journal is
``<output>.journal.jsonl`` and the Parquet file is written from it when every row is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from fastrm.judge.store import JsonlStore, journal_path, jsonl_to_parquet, read_rows, sidecar
from fastrm.judge.types import GenerationBackend, GenerationRequest, SamplingParams, as_messages

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One generating model: a backend, its sampling settings, and how strong it is.

    Args:
        name: the ``model`` field of its rows (unique across entries; part of the row key).
        backend: a :class:`~fastrm.judge.types.GenerationBackend`. Several entries may share
            one backend (e.g. one checkpoint at several temperatures).
        sampling: temperature / top_p / top_k / max_new_tokens / n / seed.
        strength: larger = stronger; used by the ``strong_vs_weak`` pairing strategy.
        system_prompt: a system message put before every prompt of this entry.
    """

    name: str
    backend: GenerationBackend
    sampling: SamplingParams = field(default_factory=SamplingParams)
    strength: Optional[float] = None
    system_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"model entry name must be a non-empty string, got {self.name!r}")
        if isinstance(self.sampling, Mapping):
            self.sampling = SamplingParams.from_dict(self.sampling)


def row_key(prompt_id: str, model: str, sample_index: int) -> str:
    """Deterministic, unambiguous row key (JSON, so ids may hold any character)."""
    return json.dumps([str(prompt_id), model, int(sample_index)], ensure_ascii=False)


def row_seed(base_seed: int, prompt_id: str, model: str, sample_index: int) -> int:
    """A 31-bit seed from ``(base_seed, prompt_id, model, sample_index)`` (blake2b), so each
    response is reproducible on its own, whatever batch it lands in."""
    h = hashlib.blake2b(row_key(prompt_id, model, sample_index).encode() + b"#" + str(base_seed).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % (2**31 - 1)


def load_prompts(
    source: Union[str, os.PathLike, Iterable[Mapping[str, Any]]],
    *,
    prompt_key: str = "prompt",
    id_key: Optional[str] = "prompt_id",
    limit: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Read prompts as ``[{"prompt_id": str, "prompt": str | messages}]``.

    Args:
        source: a ``.jsonl`` / ``.parquet`` path or an iterable of rows.
        prompt_key: field holding the prompt (a string or a list of chat messages).
        id_key: field holding a unique id; if ``None`` or absent from a row, the id is the
            first 16 hex digits of the sha1 of the prompt's JSON (stable across runs).
        limit: keep the first ``limit`` distinct prompts.

    Identical prompts (same id and text) are kept once; the count is logged. Two different
    prompts with the same id raise ``ValueError``.
    """
    rows = read_rows(source) if isinstance(source, (str, os.PathLike)) else list(source)
    out: Dict[str, Dict[str, Any]] = {}
    dup = 0
    for n, r in enumerate(rows):
        if prompt_key not in r:
            raise ValueError(f"prompt row {n} has no field {prompt_key!r} (fields: {sorted(r)}); set prompts.prompt_key")
        prompt = r[prompt_key]
        as_messages(prompt)  # validate early, with the row number in the traceback context
        pid = r.get(id_key) if id_key else None
        if pid is None:
            pid = hashlib.sha1(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        pid = str(pid)
        if pid in out:
            if out[pid]["prompt"] != prompt:
                raise ValueError(f"prompt id {pid!r} is used by two different prompts (row {n}); ids must be unique")
            dup += 1
            continue
        out[pid] = {"prompt_id": pid, "prompt": prompt}
        if limit is not None and len(out) >= limit:
            break
    if dup:
        log.info("load_prompts: %d duplicate prompt rows kept once", dup)
    return list(out.values())


@dataclass
class GenerateStats:
    """Counts of one :func:`generate_responses` run (per model and total)."""

    total_rows: int = 0
    resumed: int = 0
    written: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    per_model: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["rows_per_s"] = self.written / self.seconds if self.seconds > 0 else None
        d["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else None
        return d


def generate_responses(
    prompts: Sequence[Mapping[str, Any]],
    models: Sequence[ModelEntry],
    output: Union[str, os.PathLike],
    *,
    batch_size: int = 32,
    progress: bool = True,
    max_rows: Optional[int] = None,
) -> GenerateStats:
    """Generate ``n`` responses per prompt per model entry; write rows incrementally.

    Args:
        prompts: ``[{"prompt_id", "prompt"}]`` (see :func:`load_prompts`).
        models: the model entries (names must be unique).
        output: ``.jsonl`` (the journal itself) or ``.parquet`` (written from the journal at the end).
        batch_size: requests handed to a backend at once (the local backend batches them on
            the model, the HTTP backend keeps up to its ``max_concurrency`` in flight); also the
            unit of fsync, so at most one batch is lost on a crash.
        progress: show a tqdm bar (rows, rows/s, errors).
        max_rows: stop after writing this many new rows (for smoke runs; the rest resumes later).

    Returns:
        :class:`GenerateStats`. Raises ``ValueError`` on duplicate model names.
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model entry names must be unique, got {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    journal = journal_path(output)
    stats = GenerateStats()
    t0 = time.perf_counter()
    with JsonlStore(journal) as store, JsonlStore(sidecar(journal, "errors"), key_field="error_id") as errors:
        todo: List[Tuple[ModelEntry, Mapping[str, Any], int]] = []
        for m in models:
            stats.per_model[m.name] = {"resumed": 0, "written": 0, "errors": 0, "tokens": 0}
            for p in prompts:
                for i in range(m.sampling.n):
                    stats.total_rows += 1
                    if row_key(p["prompt_id"], m.name, i) in store:
                        stats.resumed += 1
                        stats.per_model[m.name]["resumed"] += 1
                    else:
                        todo.append((m, p, i))
        if store.num_torn:
            log.warning("generation: cut off a torn last line in %s (that row is regenerated)", journal)
        if stats.resumed:
            log.info("generation: resuming; %d of %d rows already in %s", stats.resumed, stats.total_rows, journal)
        if max_rows is not None:
            todo = todo[:max_rows]
        bar = tqdm(total=stats.total_rows, initial=stats.resumed, disable=not progress, unit="row", desc="generate", dynamic_ncols=True)
        try:
            # group by entry, so a backend batch shares one sampling setting
            for m in models:
                mine = [t for t in todo if t[0] is m]
                for s in range(0, len(mine), batch_size):
                    chunk = mine[s:s + batch_size]
                    reqs = []
                    for _, p, i in chunk:
                        seed = row_seed(m.sampling.seed, p["prompt_id"], m.name, i)
                        reqs.append(GenerationRequest(as_messages(p["prompt"], m.system_prompt), m.sampling, seed))
                    comps = m.backend.generate(reqs)
                    if len(comps) != len(reqs):
                        raise RuntimeError(f"backend {m.backend!r} returned {len(comps)} completions for {len(reqs)} requests")
                    good, bad = [], []
                    for (_, p, i), r, c in zip(chunk, reqs, comps):
                        base = {
                            "key": row_key(p["prompt_id"], m.name, i),
                            "prompt_id": p["prompt_id"],
                            "prompt": p["prompt"],
                            "model": m.name,
                            "sample_index": i,
                            "seed": r.seed,
                            "sampling": m.sampling.to_dict(),
                        }
                        if c.ok:
                            good.append({**base, "response": c.text, "finish_reason": c.finish_reason,
                                         "num_tokens": c.num_tokens, "attempts": c.attempts})
                            stats.tokens += c.num_tokens
                            stats.per_model[m.name]["tokens"] += c.num_tokens
                        else:
                            bad.append({**base, "error_id": f"{base['key']}@{time.time_ns()}", "error": c.error,
                                        "attempts": c.attempts})
                    store.append(good)
                    errors.append(bad)
                    stats.written += len(good)
                    stats.errors += len(bad)
                    stats.per_model[m.name]["written"] += len(good)
                    stats.per_model[m.name]["errors"] += len(bad)
                    bar.update(len(good))
                    bar.set_postfix(errors=stats.errors, tokens=stats.tokens, refresh=False)
        finally:
            bar.close()
            stats.seconds = time.perf_counter() - t0
    if stats.errors:
        log.warning("generation: %d requests failed (see %s); rerun to retry them", stats.errors, sidecar(journal, "errors"))
    out = Path(output)
    if out.suffix == ".parquet":
        if stats.resumed + stats.written == stats.total_rows:
            n = jsonl_to_parquet(journal, out)
            log.info("generation: wrote %d rows to %s", n, out)
        else:
            log.warning("generation: %d rows missing; %s not written (rerun to finish)",
                        stats.total_rows - stats.resumed - stats.written, out)
    log.info("generation: %s", json.dumps(stats.as_dict()))
    return stats
