"""Turn judged pairs into preference rows: ``chosen``, ``rejected``, ``margin`` (+ prompt, provenance).

* :class:`PreferenceTransform` is a torchtune ``Transform`` (``sample -> sample``): a dataset
  builder can label ``(prompt, response1, response2)`` rows on the fly, one at a time or with
  :meth:`PreferenceTransform.label_batch` (``datasets.Dataset.map(..., batched=True)``).
* :func:`label_pairs` is the batch job: it judges pairs in batches and writes a resumable JSONL
  (or Parquet) file that ``datasets.load_dataset("json", data_files=...)`` and the data
  builders read directly.

Margin (Bradley-Terry, :mod:`fastrm.judge.bt`): ``chosen`` is the response the judge prefers and
``margin = |logit(p)| / beta >= 0``, where ``p`` is the judge's ``P(a > b)``.

Rows whose judgement is not ``ok`` (contradiction, tie, failure) have no label. On the fly they
come back with ``chosen = rejected = margin = None`` and ``label_status`` saying why (filter them
with ``label_status == "ok"``); the batch job writes them to side files instead:
``<out>.dropped.jsonl`` (contradictions and ties, final) and ``<out>.failures.jsonl`` (failed
requests / unparseable replies with the raw replies; retried on the next run).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from fastrm.judge.bt import margin_from_prob
from fastrm.judge.judge import STATUS_FAILED, STATUS_OK, JudgeStats, PairJudgement
from fastrm.judge.pairing import pair_id as make_pair_id
from fastrm.judge.store import JsonlStore, journal_path, jsonl_to_parquet, sidecar

log = logging.getLogger(__name__)


def _judgement_fields(j: PairJudgement, judge_name: str) -> Dict[str, Any]:
    return {
        "label_status": j.status,
        "judge": judge_name,
        "judge_p_a": j.p,
        "judge_logit": j.logit,
        "judge_p_order1": j.p_order1,
        "judge_p_order2": j.p_order2,
        "judge_source": j.source,
        "judge_scores": list(j.scores) if j.scores else None,
    }


def preference_row(
    pair: Mapping[str, Any], j: PairJudgement, *, beta: float, judge_name: str, eps: float = 1e-6
) -> Dict[str, Any]:
    """One output row from a pair (``prompt, response_a, response_b`` + anything else, kept as
    provenance) and its judgement. ``chosen/rejected/margin`` are None unless ``j.status == "ok"``."""
    row = dict(pair)
    a, b = pair["response_a"], pair["response_b"]
    row.update(_judgement_fields(j, judge_name))
    if j.status == STATUS_OK:
        a_wins = j.logit > 0  # type: ignore[operator]
        p_win = j.p if a_wins else 1.0 - j.p  # type: ignore[operator]
        row["chosen"], row["rejected"] = (a, b) if a_wins else (b, a)
        row["p_chosen"] = p_win
        row["margin"] = margin_from_prob(p_win, beta, eps)
        row["beta"] = beta
        if "model_a" in pair and "model_b" in pair:
            row["model_chosen"], row["model_rejected"] = (
                (pair["model_a"], pair["model_b"]) if a_wins else (pair["model_b"], pair["model_a"])
            )
    else:
        row["chosen"] = row["rejected"] = row["margin"] = row["p_chosen"] = None
    if j.status != STATUS_OK:
        row["judge_replies"] = j.replies
        row["judge_errors"] = j.errors
    return row


class PreferenceTransform:
    """torchtune-style transform labelling ``(prompt, response1, response2)`` samples.

    Args:
        judge: a :class:`~fastrm.judge.judge.PairwiseJudge` or
            :class:`~fastrm.judge.judge.MeanLogprobJudge` (or a config node).
        beta: Bradley-Terry scale; ``margin = |logit(p)| / beta``.
        prompt_key / response_keys: field names of the input sample.
        eps: probabilities are clamped to ``[eps, 1 - eps]`` before the logit.

    ``transform(sample)`` returns the sample plus ``prompt``, ``chosen``, ``rejected``,
    ``margin``, ``p_chosen`` (the judge's probability that chosen beats rejected), ``label_status``
    and ``judge_*`` provenance (``judge_p_a`` is ``P(response1 > response2)``). ``transform.stats`` holds the
    running counts (contradictions, failures, position bias).
    """

    def __init__(
        self,
        judge: Any,
        *,
        beta: float = 1.0,
        prompt_key: str = "prompt",
        response_keys: Tuple[str, str] = ("response1", "response2"),
        eps: float = 1e-6,
    ) -> None:
        from fastrm.judge.local import _maybe_instantiate

        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.judge = _maybe_instantiate(judge)
        self.beta = float(beta)
        self.prompt_key = prompt_key
        self.response_keys = tuple(response_keys)
        self.eps = eps

    @property
    def stats(self) -> JudgeStats:
        return self.judge.stats

    def _pair(self, s: Mapping[str, Any]) -> Dict[str, Any]:
        for k in (self.prompt_key, *self.response_keys):
            if k not in s:
                raise ValueError(f"sample has no field {k!r} (fields: {sorted(s)}); set prompt_key / response_keys")
        return {"prompt": s[self.prompt_key], "response_a": s[self.response_keys[0]], "response_b": s[self.response_keys[1]]}

    def label_batch(self, samples: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """Label many samples with one judge call (batched / concurrent requests)."""
        pairs = [self._pair(s) for s in samples]
        js = self.judge.judge(pairs)
        out = []
        for s, p, j in zip(samples, pairs, js):
            row = preference_row(p, j, beta=self.beta, judge_name=self.judge.name, eps=self.eps)
            for k in ("response_a", "response_b"):
                row.pop(k)
            out.append({**dict(s), **row})
        return out

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        return self.label_batch([sample])[0]

    def map_batched(self, batch: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """For ``datasets.Dataset.map(transform.map_batched, batched=True)`` (columns in, columns out)."""
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        rows = self.label_batch([{k: batch[k][i] for k in keys} for i in range(n)])
        cols = sorted({k for r in rows for k in r})
        return {k: [r.get(k) for r in rows] for k in cols}


def load_pairs(
    rows: Iterable[Mapping[str, Any]],
    *,
    prompt_key: str = "prompt",
    response_keys: Tuple[str, str] = ("response1", "response2"),
) -> List[Dict[str, Any]]:
    """Explicit ``(prompt, response1, response2)`` rows as judge pairs with a ``pair_id``
    (the row's ``pair_id``/``id`` if present, else a hash of the three texts)."""
    out = []
    seen = set()
    for n, r in enumerate(rows):
        for k in (prompt_key, *response_keys):
            if k not in r:
                raise ValueError(f"pair row {n} has no field {k!r} (fields: {sorted(r)}); set pairs.prompt_key / response_keys")
        pid = r.get("pair_id", r.get("id"))
        if pid is None:
            pid = make_pair_id(json.dumps([r[prompt_key], r[response_keys[0]]]), r[response_keys[1]])
        pid = str(pid)
        if pid in seen:
            raise ValueError(f"pair row {n}: duplicate pair id {pid!r}")
        seen.add(pid)
        extra = {k: v for k, v in r.items() if k not in (prompt_key, *response_keys)}
        out.append({**extra, "pair_id": pid, "prompt": r[prompt_key],
                    "response_a": r[response_keys[0]], "response_b": r[response_keys[1]]})
    return out


def label_pairs(
    pairs: Sequence[Mapping[str, Any]],
    judge: Any,
    output: Union[str, os.PathLike],
    *,
    beta: float = 1.0,
    batch_size: int = 16,
    eps: float = 1e-6,
    progress: bool = True,
    keep_responses: bool = False,
    extra_stats: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Judge ``pairs`` and write preference rows, resumably.

    Args:
        pairs: ``{pair_id, prompt, response_a, response_b, ...}`` (from
            :func:`~fastrm.judge.pairing.make_pairs` or :func:`load_pairs`).
        judge: a judge object (``judge(pairs) -> [PairJudgement]``, ``name``, ``stats``).
        output: ``.jsonl`` or ``.parquet`` (written from the journal once every pair is settled).
        beta: Bradley-Terry scale of the margin.
        batch_size: pairs per judge call (2 requests each per attempt); also the fsync unit.
        keep_responses: keep ``response_a/response_b`` in the output rows (they duplicate
            ``chosen/rejected``).
        extra_stats: merged into the stats file (e.g. the beta fit).

    Returns:
        stats dict (also written to ``<out>.stats.json``): counts of labelled / dropped / failed
        / resumed pairs, the judge's contradiction rate and position bias, ``beta``.
    """
    journal = journal_path(output)
    pairs = list(pairs)
    ids = [str(p["pair_id"]) for p in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("label_pairs: pair_id values must be unique")
    t0 = time.perf_counter()
    counts = {"pairs": len(pairs), "resumed_labelled": 0, "resumed_dropped": 0, "labelled": 0, "dropped": 0, "failed": 0}
    with JsonlStore(journal) as store, JsonlStore(sidecar(journal, "dropped")) as dropped, \
            JsonlStore(sidecar(journal, "failures"), key_field="failure_id") as failures:
        todo = []
        for p in pairs:
            k = str(p["pair_id"])
            if k in store:
                counts["resumed_labelled"] += 1
            elif k in dropped:
                counts["resumed_dropped"] += 1
            else:
                todo.append(p)
        done0 = counts["resumed_labelled"] + counts["resumed_dropped"]
        if done0:
            log.info("labelling: resuming; %d of %d pairs already settled", done0, len(pairs))
        bar = tqdm(total=len(pairs), initial=done0, disable=not progress, unit="pair", desc="judge", dynamic_ncols=True)
        try:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s:s + batch_size]
                js = judge.judge(chunk)
                good, bad, fail = [], [], []
                for p, j in zip(chunk, js):
                    row = preference_row(p, j, beta=beta, judge_name=judge.name, eps=eps)
                    row["key"] = str(p["pair_id"])
                    if j.status == STATUS_OK:
                        if not keep_responses:
                            row.pop("response_a")
                            row.pop("response_b")
                        good.append(row)
                    elif j.status == STATUS_FAILED:
                        row["failure_id"] = f"{row['key']}@{time.time_ns()}"
                        fail.append(row)
                    else:
                        bad.append(row)
                store.append(good)
                dropped.append(bad)
                failures.append(fail)
                counts["labelled"] += len(good)
                counts["dropped"] += len(bad)
                counts["failed"] += len(fail)
                bar.update(len(good) + len(bad))
                st = judge.stats.as_dict()
                bar.set_postfix(contra=st["contradictions"], failed=st["failures"],
                                first_win=None if st["first_win_rate"] is None else round(st["first_win_rate"], 3),
                                refresh=False)
        finally:
            bar.close()
    stats: Dict[str, Any] = {**counts, "beta": beta, "judge": judge.name, "judge_stats": judge.stats.as_dict(),
                             "seconds": time.perf_counter() - t0, **(extra_stats or {})}
    out = Path(output)
    settled = counts["resumed_labelled"] + counts["resumed_dropped"] + counts["labelled"] + counts["dropped"]
    if out.suffix == ".parquet":
        if settled == len(pairs):
            jsonl_to_parquet(journal, out)
        else:
            log.warning("labelling: %d pairs failed; %s not written (rerun to retry them)", len(pairs) - settled, out)
    with open(sidecar(journal, "stats").with_suffix(".json"), "w") as f:
        json.dump(stats, f, indent=2)
    js = stats["judge_stats"]
    log.info(
        "labelling: %d labelled, %d dropped (contradictions %s, ties %s), %d failed; first-position win rate "
        "order1=%s order2=%s, position bias %s (log-odds)",
        counts["labelled"], counts["dropped"], js["contradictions"], js["ties"], counts["failed"],
        js["first_win_rate_order1"], js["first_win_rate_order2"], js["position_bias_logit"],
    )
    return stats
