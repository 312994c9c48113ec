"""The tokenized unit of preference data, :class:`PreferenceGroup`, and the grouping logic.

A *group* is one prompt, its distinct responses and the comparisons among them:

* a plain pair is a group with 2 responses and one comparison ``(0, 1, margin)``;
* a prompt-free pair has ``prompt_tokens == []``;
* grouped responses (several pairs or scored completions of one prompt) are one group with
  ``K`` responses and any number of comparisons;
* unpaired data (a pool of desirable and a pool of undesirable responses, TRL's "unpaired
  preference" format) is a group with one response, no comparison and ``labels == [+1]`` or
  ``[-1]``.

Invariant (checked by the builders and tests): the unshared sequence of response ``k`` is exactly
``prompt_tokens + responses[k]``, ending with the token where the reward is read, so the prefix
shared layout (prompt once, responses attend to it) and the plain layout compute the same thing.

Grouping rows (:func:`merge_comparisons`) and turning scores or rankings into comparisons
(:func:`comparisons_from_scores`, :func:`comparisons_from_ranking`) report what they drop in a
:class:`GroupingStats`: ties, duplicate comparisons (kept once; margins must agree), contradictory
comparisons (both ``i > j`` and ``j > i`` labelled: both dropped, counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Optional, Sequence

Comparison = tuple[int, int, Optional[float]]


@dataclass
class PreferenceGroup:
    """One prompt, its ``K`` responses and ``P`` comparisons among them (token ids).

    Attributes:
        prompt_tokens: tokens of the prompt (system/user turns and the assistant header);
            empty for prompt-free data.
        responses: ``K`` token lists; ``prompt_tokens + responses[k]`` is the full sequence of
            response ``k`` and its last token is where the reward is read.
        comparisons: ``P`` triples ``(i, j, margin)``: response ``i`` preferred over ``j``;
            ``margin`` is ``None`` when the data has none.
        prompt_id: dataset-wide id of the prompt (equal prompts share it); ``-1`` when unknown.
        source_index: row(s) of the source dataset this group came from (provenance).
        labels: optional per-response labels for unpaired data (``+1`` desirable, ``-1``
            undesirable); ``None`` for paired data.
        prompt_text: the prompt as text (cross-prompt embedders, debugging); may be ``""``.
        category: optional label of the group (RewardBench subset, synthetic category) for
            per-category evaluation.
    """

    prompt_tokens: list[int]
    responses: list[list[int]]
    comparisons: list[Comparison]
    prompt_id: int = -1
    source_index: Any = None
    labels: Optional[list[int]] = None
    prompt_text: str = ""
    category: str = ""

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def num_comparisons(self) -> int:
        return len(self.comparisons)

    def sequence(self, k: int) -> list[int]:
        """Full unshared token sequence of response ``k``: ``prompt_tokens + responses[k]``."""
        return self.prompt_tokens + self.responses[k]

    def num_tokens(self, prefix_sharing: bool) -> int:
        """Tokens this group occupies in a packed row.

        ``prefix_sharing``: ``len(prompt) + sum_k len(r_k)`` (prompt once); otherwise
        ``sum_k (len(prompt) + len(r_k))``. A group with an empty prompt is the same either way.
        """
        resp = sum(len(r) for r in self.responses)
        p = len(self.prompt_tokens)
        return p + resp if prefix_sharing else p * len(self.responses) + resp

    def validate(self) -> None:
        """Raises ``ValueError`` naming the group (``source_index``) and the field at fault."""
        where = f"group from row {self.source_index!r}"
        if not self.responses:
            raise ValueError(f"{where}: responses is empty")
        for k, r in enumerate(self.responses):
            if len(r) == 0:
                raise ValueError(f"{where}: response {k} has no tokens (every response must end "
                                 "with the token where the reward is read)")
        k = len(self.responses)
        for c in self.comparisons:
            i, j, m = c
            if not (0 <= i < k and 0 <= j < k) or i == j:
                raise ValueError(f"{where}: comparison {c} must name two different responses in "
                                 f"[0, {k})")
            if m is not None and not math.isfinite(m):
                raise ValueError(f"{where}: comparison {c} has a non-finite margin")
        if self.labels is not None and len(self.labels) != k:
            raise ValueError(f"{where}: labels has {len(self.labels)} entries for {k} responses")

    def to_pairs(self) -> list["PreferenceGroup"]:
        """Expands the group into independent pairs (the baseline of grouped responses): one
        2-response group per comparison, the prompt repeated in each."""
        out = []
        for i, j, m in self.comparisons:
            out.append(PreferenceGroup(
                prompt_tokens=list(self.prompt_tokens),
                responses=[list(self.responses[i]), list(self.responses[j])],
                comparisons=[(0, 1, m)], prompt_id=self.prompt_id,
                source_index=self.source_index, prompt_text=self.prompt_text,
                category=self.category))
        return out

    def subset(self, response_ids: Sequence[int]) -> "PreferenceGroup":
        """The group restricted to ``response_ids`` (renumbered); comparisons with an endpoint
        outside the subset are dropped (callers count them)."""
        remap = {old: new for new, old in enumerate(response_ids)}
        comps = [(remap[i], remap[j], m) for i, j, m in self.comparisons
                 if i in remap and j in remap]
        labels = None if self.labels is None else [self.labels[k] for k in response_ids]
        return PreferenceGroup(
            prompt_tokens=self.prompt_tokens, responses=[self.responses[k] for k in response_ids],
            comparisons=comps, prompt_id=self.prompt_id, source_index=self.source_index,
            labels=labels, prompt_text=self.prompt_text, category=self.category)


def expand_to_pairs(groups: Iterable[PreferenceGroup]) -> list[PreferenceGroup]:
    """Every comparison of every group as an independent pair (baseline for grouping)."""
    return [p for g in groups for p in g.to_pairs()]


@dataclass
class GroupingStats:
    """What grouping and score/ranking conversion dropped or merged, for the log."""

    rows: int = 0
    groups: int = 0
    comparisons: int = 0
    duplicates: int = 0  # the same labelled comparison seen again: kept once
    contradictions: int = 0  # i > j and j > i both labelled: both dropped
    ties: int = 0  # equal scores / equal rank: no comparison
    dropped_identical: int = 0  # chosen == rejected text
    cross_subgroup_dropped: int = 0  # comparisons too long for a row even alone (dropped)
    repeated_responses: int = 0  # responses repeated so a split group serves every comparison
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


def merge_comparisons(
    comparisons: Iterable[tuple[Hashable, Hashable, Optional[float]]],
    stats: Optional[GroupingStats] = None,
    where: str = "",
) -> tuple[list[Hashable], list[Comparison]]:
    """Deduplicates labelled comparisons among response *keys* (e.g. response texts).

    Returns ``(responses, comparisons)``: distinct keys in first-seen order and ``(i, j, margin)``
    indices into them. A repeated ``(a, b)`` is kept once (its margins must agree, else
    ``ValueError``); when both ``(a, b)`` and ``(b, a)`` appear the pair is contradictory and
    both are dropped. Counts go to ``stats``.
    """
    stats = stats if stats is not None else GroupingStats()
    keys: dict[Hashable, int] = {}
    seen: dict[tuple[int, int], Optional[float]] = {}
    order: list[tuple[int, int]] = []
    for a, b, m in comparisons:
        i = keys.setdefault(a, len(keys))
        j = keys.setdefault(b, len(keys))
        if (i, j) in seen:
            stats.duplicates += 1
            prev = seen[(i, j)]
            if (prev is None) != (m is None) or (prev is not None and abs(prev - m) > 1e-6):
                raise ValueError(f"{where}: the comparison {a!r} > {b!r} appears twice with "
                                 f"different margins ({prev} and {m}); fix the data")
            continue
        seen[(i, j)] = m
        order.append((i, j))
    contradictory = {(i, j) for (i, j) in order if (j, i) in seen}
    stats.contradictions += len(contradictory) // 2
    out = [(i, j, seen[(i, j)]) for (i, j) in order if (i, j) not in contradictory]
    return list(keys), out


def comparisons_from_scores(
    scores: Sequence[float],
    scale: float = 1.0,
    stats: Optional[GroupingStats] = None,
    with_margin: bool = True,
    tie_tolerance: float = 0.0,
) -> list[Comparison]:
    """All pairs ``(i, j)`` with ``scores[i] > scores[j]``; margin ``scale * (s_i - s_j)``.

    Ties (``|s_i - s_j| <= tie_tolerance``) give no comparison and are counted in
    ``stats.ties``. Comparisons are listed by ``i`` then ``j`` ascending (deterministic).
    """
    stats = stats if stats is not None else GroupingStats()
    out: list[Comparison] = []
    for i, si in enumerate(scores):
        for j, sj in enumerate(scores):
            if j <= i:
                continue
            d = float(si) - float(sj)
            if abs(d) <= tie_tolerance:
                stats.ties += 1
                continue
            a, b = (i, j) if d > 0 else (j, i)
            out.append((a, b, scale * abs(d) if with_margin else None))
    return out


def comparisons_from_ranking(
    ranks: Sequence[float],
    stats: Optional[GroupingStats] = None,
) -> list[Comparison]:
    """Comparisons from ranks (``ranks[k]`` = position of response ``k``, 1 = best; equal ranks
    are ties, counted). No margins: a rank difference is not a calibrated score gap."""
    return comparisons_from_scores([-float(r) for r in ranks], stats=stats, with_margin=False)


def split_group(
    group: PreferenceGroup, capacity: int, prefix_sharing: bool,
    stats: Optional[GroupingStats] = None,
) -> list[PreferenceGroup]:
    """Splits a group that does not fit ``capacity`` tokens into subgroups that do.

    Every subgroup keeps the prompt. Comparisons are placed one by one (in the group's order)
    into the first subgroup that already holds both responses, else one that holds one of them
    and has room for the other, else one with room for both, else a new subgroup. So every
    comparison stays inside one subgroup; a comparison that must cross is **served by repeating
    a response** in a second subgroup (its reward is computed twice; counted in
    ``stats.repeated_responses``). Responses in no comparison are dropped unless the group has
    ``labels``. A comparison whose two responses cannot fit one row even alone is dropped and
    counted in ``stats.cross_subgroup_dropped``; for a plain pair that is a ``ValueError``.
    """
    stats = stats if stats is not None else GroupingStats()
    if group.num_tokens(prefix_sharing) <= capacity:
        return [group]
    p = len(group.prompt_tokens)
    where = f"group from row {group.source_index!r}"
    if group.num_responses <= 2 and group.comparisons:
        raise ValueError(
            f"{where}: the pair needs {group.num_tokens(prefix_sharing)} tokens, more than a row "
            f"of max_seq_len={capacity}; raise the packing max_seq_len or lower the dataset's "
            "max_seq_len (per-sequence truncation) so a whole pair fits in one row")
    cost = [len(r) + (0 if prefix_sharing else p) for r in group.responses]
    base = p if prefix_sharing else 0
    if group.labels is not None and not group.comparisons:  # unpaired pool: one per subgroup
        subs = [[k] for k in range(group.num_responses)]
        for k in range(group.num_responses):
            if base + cost[k] > capacity:
                raise ValueError(f"{where}: response {k} with its prompt needs "
                                 f"{base + cost[k]} tokens, more than max_seq_len={capacity}")
        return [group.subset(ks) for ks in subs]
    members: list[list[int]] = []  # responses of each subgroup (original indices)
    used: list[int] = []
    comps: list[list] = []
    for c in group.comparisons:
        i, j, m = c
        if base + cost[i] + cost[j] > capacity:
            stats.cross_subgroup_dropped += 1
            continue
        target = None
        for b, ks in enumerate(members):  # 1. holds both
            if i in ks and j in ks:
                target = b
                break
        if target is None:  # 2. holds one, room for the other
            for b, ks in enumerate(members):
                if (i in ks and used[b] + cost[j] <= capacity) or (
                        j in ks and used[b] + cost[i] <= capacity):
                    target = b
                    break
        if target is None:  # 3. room for both
            for b in range(len(members)):
                if used[b] + cost[i] + cost[j] <= capacity:
                    target = b
                    break
        if target is None:
            members.append([])
            used.append(base)
            comps.append([])
            target = len(members) - 1
        for k in (i, j):
            if k not in members[target]:
                members[target].append(k)
                used[target] += cost[k]
        comps[target].append(c)
    seen: dict[int, int] = {}
    for ks in members:
        for k in ks:
            seen[k] = seen.get(k, 0) + 1
    stats.repeated_responses += sum(v - 1 for v in seen.values())
    out = []
    for ks, cs in zip(members, comps):
        ks = sorted(ks)
        remap = {old: new for new, old in enumerate(ks)}
        labels = None if group.labels is None else [group.labels[k] for k in ks]
        out.append(PreferenceGroup(
            prompt_tokens=group.prompt_tokens, responses=[group.responses[k] for k in ks],
            comparisons=[(remap[i], remap[j], m) for i, j, m in cs], prompt_id=group.prompt_id,
            source_index=group.source_index, labels=labels, prompt_text=group.prompt_text,
            category=group.category))
    return out


def accuracy_by_category(
    categories: Sequence[str], chosen_rewards, rejected_rewards,
) -> dict[str, float]:
    """RewardBench-style scoring: accuracy (``r_chosen > r_rejected``, ties count as half) per
    category, plus ``"mean"``, the unweighted mean over categories (each category counts the
    same however many pairs it has), and ``"overall"``, the plain accuracy over all pairs."""
    import torch

    rc = torch.as_tensor(chosen_rewards, dtype=torch.float64).flatten()
    rr = torch.as_tensor(rejected_rewards, dtype=torch.float64).flatten()
    if not (len(categories) == rc.numel() == rr.numel()):
        raise ValueError(f"categories ({len(categories)}), chosen_rewards ({rc.numel()}) and "
                         f"rejected_rewards ({rr.numel()}) must have one entry per comparison")
    win = (rc > rr).double() + 0.5 * (rc == rr).double()
    out: dict[str, float] = {}
    for c in sorted(set(categories)):
        mask = torch.tensor([x == c for x in categories])
        out[c] = float(win[mask].mean())
    out["mean"] = sum(out.values()) / max(1, len(out))
    out["overall"] = float(win.mean()) if win.numel() else float("nan")
    return out
