"""Pairs to judge, drawn from generation output.

Strategies (per prompt, over that prompt's responses):

* ``all``: every unordered pair, ``n (n - 1) / 2`` per prompt.
* ``strong_vs_weak``: every pair whose two models have different ``strength``; the stronger
  model's response is ``response_a`` (the judge still decides who wins).
* ``random_k``: ``k`` pairs drawn uniformly without replacement from ``all`` (fewer if the
  prompt has fewer), with a per-prompt RNG seeded from ``(seed, prompt_id)``, so the draw does
  not depend on the other prompts or on row order.

``strong_vs_weak`` also takes ``k`` (then ``k`` of its pairs are drawn the same way). Pairs whose
two responses are identical text are dropped (nothing to compare) and counted; so are rows with
an empty response and, if ``drop_truncated``, rows that hit ``max_new_tokens``.
Every pair gets a deterministic ``pair_id`` from its two row keys.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

STRATEGIES = ("all", "strong_vs_weak", "random_k")


def pair_id(key_a: str, key_b: str) -> str:
    """Deterministic id of the pair of rows ``(key_a, key_b)`` (order matters: a is listed first)."""
    return hashlib.sha1(json.dumps([key_a, key_b], ensure_ascii=False).encode()).hexdigest()[:20]


def _prompt_rng(seed: int, prompt_id: str) -> random.Random:
    h = hashlib.blake2b(f"{seed}#{prompt_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def make_pairs(
    rows: Iterable[Mapping[str, Any]],
    strategy: str = "all",
    *,
    k: Optional[int] = None,
    strengths: Optional[Mapping[str, float]] = None,
    seed: int = 0,
    drop_truncated: bool = False,
) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Build judge input pairs from generation rows.

    Args:
        rows: generation rows (``key, prompt_id, prompt, model, response, finish_reason``).
        strategy: one of ``all``, ``strong_vs_weak``, ``random_k``.
        k: pairs per prompt for ``random_k`` (required) or ``strong_vs_weak`` (optional cap).
        strengths: ``{model: strength}`` for ``strong_vs_weak`` (larger = stronger); every
            model in ``rows`` must be listed.
        seed: seed of the per-prompt draws.
        drop_truncated: drop responses with ``finish_reason == "length"``.

    Returns:
        ``(pairs, counts)``: pairs as ``{pair_id, prompt_id, prompt, response_a, response_b,
        model_a, model_b, key_a, key_b}``, and counts of what was built and dropped.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pairing.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random_k" and (k is None or k < 1):
        raise ValueError("pairing.k must be an integer >= 1 for strategy random_k")
    if k is not None and k < 1:
        raise ValueError(f"pairing.k must be >= 1 or null, got {k}")
    counts = {"rows": 0, "dropped_empty": 0, "dropped_truncated": 0, "prompts": 0,
              "candidate_pairs": 0, "dropped_identical": 0, "pairs": 0}
    by_prompt: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        counts["rows"] += 1
        for f in ("key", "prompt_id", "prompt", "model", "response"):
            if f not in r:
                raise ValueError(f"generation row {r.get('key', counts['rows'])!r} has no field {f!r}; is this a `fastrm generate` output?")
        if not isinstance(r["response"], str) or not r["response"].strip():
            counts["dropped_empty"] += 1
            continue
        if drop_truncated and r.get("finish_reason") == "length":
            counts["dropped_truncated"] += 1
            continue
        by_prompt[str(r["prompt_id"])].append(r)
    if strategy == "strong_vs_weak":
        if not strengths:
            raise ValueError("pairing.strengths ({model: strength}) is required for strong_vs_weak")
        missing = sorted({r["model"] for rs in by_prompt.values() for r in rs} - set(strengths))
        if missing:
            raise ValueError(f"pairing.strengths has no entry for model(s) {missing}")
    pairs: List[Dict[str, Any]] = []
    for pid in sorted(by_prompt):
        rs = sorted(by_prompt[pid], key=lambda r: r["key"])
        counts["prompts"] += 1
        cands = []
        for a, b in itertools.combinations(rs, 2):
            if strategy == "strong_vs_weak":
                sa, sb = strengths[a["model"]], strengths[b["model"]]  # type: ignore[index]
                if sa == sb:
                    continue
                if sb > sa:
                    a, b = b, a
            cands.append((a, b))
        counts["candidate_pairs"] += len(cands)
        kept = []
        for a, b in cands:
            if a["response"].strip() == b["response"].strip():
                counts["dropped_identical"] += 1
            else:
                kept.append((a, b))
        if k is not None and len(kept) > k:
            kept = _prompt_rng(seed, pid).sample(kept, k)
        for a, b in kept:
            pairs.append({
                "pair_id": pair_id(a["key"], b["key"]),
                "prompt_id": pid,
                "prompt": a["prompt"],
                "response_a": a["response"],
                "response_b": b["response"],
                "model_a": a["model"],
                "model_b": b["model"],
                "key_a": a["key"],
                "key_b": b["key"],
            })
    counts["pairs"] = len(pairs)
    log.info("pairing (%s): %s", strategy, counts)
    return pairs, counts
