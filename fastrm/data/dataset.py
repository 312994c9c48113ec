"""Reward-modeling datasets: rows -> :class:`PreferenceGroup` (token ids), torchtune style.

:class:`PreferenceDataset` loads a ``source`` with ``datasets.load_dataset`` (a local
``"json"`` / ``"parquet"`` / ``"csv"`` with ``data_files=...``, or a hub name), or takes rows
directly (``data=``), applies a row transform (:mod:`fastrm.data.formats`), optionally merges
rows of one prompt into one group, tokenizes with any torchtune ``ModelTokenizer`` and applies
the length policy. Everything is tokenized eagerly (the packer needs every length up front); a
summary of what was dropped or truncated is logged and kept in ``dataset.stats``.

Tokenization (exact prefix sharing)
    Each response's full conversation ``prompt + response`` is tokenized with
    ``tokenizer.tokenize_messages`` (what an unshared pipeline does; with
    :class:`fastrm.models.tokenizer.HFChatTokenizer` that is ``apply_chat_template``'s ids).
    ``prompt_tokens`` is the longest common prefix of those sequences and of the prompt tokenized
    alone (as a generation prompt when the tokenizer's ``tokenize_messages`` takes
    ``add_generation_prompt``, e.g. ``...<|im_start|>assistant\n``), capped so each response
    keeps at least one token. So ``prompt_tokens + responses[k]`` *is* the unshared sequence,
    token for token, whatever the chat template; its last token is where the reward is read.
    When the generation prompt is not a prefix of a full sequence (BPE merged the assistant
    header with the response's first characters, e.g. a response starting with newlines), the
    shorter common prefix is shared and ``stats["prompt_not_generation_prefix"]`` counts it.
    Prompt-free pairs get ``prompt_tokens = []``.

Empty responses are legal (a model that produced nothing should simply lose): they are kept,
trained on and scored, and counted in ``stats["empty_responses"]`` (empty or whitespace-only
text). With a chat template an empty assistant turn still has its template tokens; a tokenizer
that gives no token at all for a response (nothing to read a reward at) is an error naming the
row: use one that ends sequences with an end token (``HFChatTokenizer``'s plain mode appends
EOS).

Length policy (``max_seq_len`` bounds every full sequence ``prompt + response``)
    * ``truncation="left_prompt"``: drop prompt tokens from the left until the longest response
      fits; responses that alone exceed ``max_seq_len`` are dropped with their comparisons
      (the group too when none remains).
    * ``truncation="drop"``: drop every response whose full sequence is too long (and its
      comparisons): a pair is dropped whole, as TRL's ``RewardTrainer`` does.
    Counts are logged. Pass the tokenizer without its own ``max_seq_len`` (torchtune tokenizers
    truncate from the right, which would cut the reward token).

Identical responses (``chosen`` text equal to ``rejected``): ``on_identical="error"`` raises a
ValueError naming the row; ``"drop"`` drops the pair and counts it.

Grouping (``group_by_prompt=True``): rows with the same ``prompt_id`` column value (else the
same prompt messages) become one group with their distinct responses and deduplicated
comparisons (duplicates kept once, contradictions dropped; both counted).
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fastrm.data.formats import RawGroup, from_torchtune_messages, message_key
from fastrm.data.group import GroupingStats, PreferenceGroup, merge_comparisons

log = logging.getLogger(__name__)

TRUNCATION = ("left_prompt", "drop")
ON_IDENTICAL = ("error", "drop")


def _lcp(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@functools.lru_cache(maxsize=None)
def _takes_generation_prompt(tokenizer_type: type) -> bool:
    """Whether ``tokenize_messages`` of this tokenizer class names ``add_generation_prompt``."""
    try:
        params = inspect.signature(tokenizer_type.tokenize_messages).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    p = params.get("add_generation_prompt")
    return p is not None and p.kind is not inspect.Parameter.VAR_KEYWORD


def tokenize_group(raw: RawGroup, tokenizer: Any,
                   stats: Optional[dict[str, int]] = None) -> tuple[list[int], list[list[int]]]:
    """``(prompt_tokens, responses)`` with ``prompt_tokens + responses[k] ==
    tokenizer.tokenize_messages(raw.prompt + raw.responses[k])[0]`` exactly (see the module
    docstring); ``stats["prompt_not_generation_prefix"]`` is incremented when the generation
    prompt was not a prefix of every full sequence.

    Raises:
        ValueError: a response whose full sequence has no token (naming row and column).
    """
    full = [list(tokenizer.tokenize_messages(raw.prompt + r)[0]) for r in raw.responses]
    for k, f in enumerate(full):
        if not f:
            col = raw.response_columns[k] if k < len(raw.response_columns) else f"response {k}"
            raise ValueError(
                f"row {raw.row}, column {col!r}: the tokenizer gives no token for this (empty) "
                "response, so there is no token to read its reward at; use a tokenizer that ends "
                "every sequence with an end token (HFChatTokenizer: a chat template, or plain "
                "mode, which appends EOS)")
    if not raw.prompt:
        return [], full
    limit = min(len(f) for f in full) - 1
    gen = _takes_generation_prompt(type(tokenizer))
    kw = {"add_generation_prompt": True} if gen else {}
    alone = list(tokenizer.tokenize_messages(raw.prompt, **kw)[0])
    n = _lcp(alone, full[0], min(limit, len(alone)))
    for f in full[1:]:
        n = _lcp(full[0], f, n)
    if gen and n < len(alone) and stats is not None:
        stats["prompt_not_generation_prefix"] = stats.get("prompt_not_generation_prefix", 0) + 1
    return full[0][:n], [f[n:] for f in full]


def _is_empty(response: Sequence[Any]) -> bool:
    return not any(m.text_content.strip() for m in response)


class PreferenceDataset(Dataset):
    """Map-style dataset of :class:`PreferenceGroup` (see the module docstring).

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` (``tokenize_messages(messages) -> (tokens,
            mask)``).
        source: ``datasets.load_dataset`` path (``"json"``, ``"parquet"``, ``"csv"`` with
            ``data_files``, or a hub name). Ignored when ``data`` is given.
        transform: ``(row, index) -> RawGroup`` (:mod:`fastrm.data.formats`; default
            :class:`~fastrm.data.formats.PairTransform` with ``column_map``). A torchtune message
            transform (``row -> {"chosen": [...], "rejected": [...]}``) is accepted through
            ``message_transform``.
        column_map: expected column -> dataset column (used by the default transform).
        split: ``load_dataset`` split (``"train"``, ``"train[:10%]"``) .
        max_seq_len: bound on each full sequence; ``None`` keeps every length.
        truncation: ``"left_prompt"`` or ``"drop"``.
        on_identical: ``"error"`` or ``"drop"``.
        group_by_prompt: merge the rows of one prompt into one group.
        filter_fn: row predicate applied before anything else (rows it rejects are counted).
        data: rows (list of dicts or a ``datasets.Dataset``) instead of ``source``.
        progress: show a tqdm bar while tokenizing.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``data_files``, ``name``...).
    """

    def __init__(
        self,
        tokenizer: Any,
        source: Optional[str] = None,
        *,
        transform: Optional[Callable[[Mapping[str, Any], int], RawGroup]] = None,
        message_transform: Optional[Callable[[Mapping[str, Any]], Mapping[str, Any]]] = None,
        column_map: Optional[Mapping[str, str]] = None,
        split: str = "train",
        max_seq_len: Optional[int] = None,
        truncation: str = "left_prompt",
        on_identical: str = "error",
        group_by_prompt: bool = False,
        filter_fn: Optional[Callable[[Mapping[str, Any]], bool]] = None,
        new_system_prompt: Optional[str] = None,
        data: Optional[Sequence[Mapping[str, Any]]] = None,
        progress: bool = True,
        **load_dataset_kwargs: Any,
    ) -> None:
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}; choose one of {TRUNCATION}")
        if on_identical not in ON_IDENTICAL:
            raise ValueError(f"on_identical={on_identical!r}; choose one of {ON_IDENTICAL}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if data is None:
            if source is None:
                raise ValueError("give a source (datasets.load_dataset path) or data (rows)")
            from datasets import load_dataset
            data = load_dataset(source, split=split, **load_dataset_kwargs)
        if transform is None:
            if message_transform is not None:
                mt = message_transform
                transform = lambda row, i: from_torchtune_messages(mt(row), i)  # noqa: E731
            else:
                from fastrm.data.formats import PairTransform
                transform = PairTransform(column_map, new_system_prompt=new_system_prompt)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.grouping = GroupingStats()
        self.stats: dict[str, int] = {
            "rows": 0, "filtered": 0, "identical_dropped": 0, "truncated_prompts": 0,
            "responses_dropped_too_long": 0, "comparisons_dropped_too_long": 0,
            "groups_dropped": 0, "empty_responses": 0, "prompt_not_generation_prefix": 0}

        raws: list[RawGroup] = []
        for i in range(len(data)):
            row = data[i]
            self.stats["rows"] += 1
            if filter_fn is not None and not filter_fn(row):
                self.stats["filtered"] += 1
                continue
            raw = transform(row, i)
            self.stats["empty_responses"] += sum(_is_empty(r) for r in raw.responses)
            if self._identical(raw, on_identical):
                continue
            raws.append(raw)
        if group_by_prompt:
            raws = self._group(raws)
        # dense dataset-wide prompt ids by grouping key, in first-seen order
        ids: dict[Hashable, int] = {}
        groups: list[PreferenceGroup] = []
        for raw in tqdm(raws, desc="tokenizing preference data", disable=not progress,
                        mininterval=2.0):
            pid = ids.setdefault(raw.key, len(ids))
            prompt, responses = tokenize_group(raw, tokenizer, self.stats)
            g = PreferenceGroup(prompt_tokens=prompt, responses=responses,
                                comparisons=list(raw.comparisons), prompt_id=pid,
                                source_index=raw.row, labels=raw.labels,
                                prompt_text=raw.prompt_text, category=raw.category)
            g = self._apply_length_policy(g)
            if g is None:
                self.stats["groups_dropped"] += 1
                continue
            g.validate()
            groups.append(g)
        self._check_margins(groups)
        self.groups = groups
        self.num_prompts = len(ids)
        self.stats.update({f"grouping_{k}": v for k, v in self.grouping.as_dict().items()})
        self.stats["groups"] = len(groups)
        self.stats["comparisons"] = sum(len(g.comparisons) for g in groups)
        counted = ("empty_responses", "prompt_not_generation_prefix")
        dropped = {k: v for k, v in self.stats.items() if v and k not in (
            "rows", "groups", "comparisons", "grouping_rows", "grouping_groups",
            "grouping_comparisons", *counted)}
        (log.warning if dropped else log.info)(
            "preference data: %d rows -> %d groups, %d comparisons; %s; %s", self.stats["rows"],
            len(groups), self.stats["comparisons"], dropped or "nothing dropped or truncated",
            ", ".join(f"{k}={self.stats[k]}" for k in counted))

    @staticmethod
    def _check_margins(groups: list[PreferenceGroup]) -> None:
        # a batch needs margins on all comparisons or none: catch a mix here, not mid-training
        with_m = [g for g in groups if any(m is not None for _, _, m in g.comparisons)]
        without = [g for g in groups if any(m is None for _, _, m in g.comparisons)]
        if with_m and without:
            few = without if len(without) <= len(with_m) else with_m
            raise ValueError(
                f"{len(with_m)} groups have margins and {len(without)} lack them (first: row "
                f"{few[0].source_index!r}); every comparison needs a margin or none does: fill "
                "the missing 'margin' values or drop the margin column (column_map)")

    # ------------------------------------------------------------------ row checks / grouping
    def _identical(self, raw: RawGroup, on_identical: str) -> bool:
        keep = []
        for i, j, m in raw.comparisons:
            if message_key(raw.responses[i]) == message_key(raw.responses[j]):
                if on_identical == "error":
                    cols = raw.response_columns
                    names = f"{cols[i]!r} and {cols[j]!r}" if len(cols) > max(i, j) else "responses"
                    raise ValueError(
                        f"row {raw.row}: columns {names} hold the same response; fix the data or "
                        "pass on_identical='drop' to drop such pairs (they are counted)")
                self.stats["identical_dropped"] += 1
                continue
            keep.append((i, j, m))
        if len(keep) == len(raw.comparisons):
            return False
        raw.comparisons = keep
        return not keep and raw.labels is None

    def _group(self, raws: list[RawGroup]) -> list[RawGroup]:
        by_key: dict[Hashable, list[RawGroup]] = {}
        for r in raws:
            by_key.setdefault(r.key, []).append(r)
        out = []
        for key, members in by_key.items():
            first = members[0]
            pk = message_key(first.prompt)
            for m in members[1:]:
                if message_key(m.prompt) != pk:
                    raise ValueError(
                        f"rows {first.row} and {m.row} share the group key {key[1]!r} but their "
                        "prompts differ; fix the prompt_id column or group by prompt text "
                        "(column_map without 'prompt_id')")
            if any(m.labels is not None for m in members):
                out.extend(members)  # unpaired rows are not merged (no comparisons to merge)
                continue
            triples = []
            resp_of: dict[tuple, list] = {}
            for m in members:
                for i, j, mg in m.comparisons:
                    a, b = message_key(m.responses[i]), message_key(m.responses[j])
                    resp_of.setdefault(a, m.responses[i])
                    resp_of.setdefault(b, m.responses[j])
                    triples.append((a, b, mg))
            where = f"group {key[1]!r} (rows {[m.row for m in members][:5]}...)"
            keys, comps = merge_comparisons(triples, self.grouping, where)
            self.grouping.rows += len(members)
            self.grouping.groups += 1
            self.grouping.comparisons += len(comps)
            # a response all of whose comparisons were contradictory still appears: keep it
            # (costs tokens, trains nothing) only if some comparison uses it
            used = sorted({k for i, j, _ in comps for k in (i, j)})
            remap = {old: new for new, old in enumerate(used)}
            if not comps:
                continue
            out.append(RawGroup(
                prompt=first.prompt, responses=[resp_of[keys[k]] for k in used],
                comparisons=[(remap[i], remap[j], m) for i, j, m in comps],
                row=tuple(m.row for m in members) if len(members) > 1 else first.row,
                key=key, prompt_text=first.prompt_text, category=first.category))
        return out

    # ------------------------------------------------------------------ length policy
    def _apply_length_policy(self, g: PreferenceGroup) -> Optional[PreferenceGroup]:
        L = self.max_seq_len
        if L is None:
            return g
        p = len(g.prompt_tokens)
        if p + max(len(r) for r in g.responses) <= L:
            return g
        keep = [k for k, r in enumerate(g.responses) if
                (len(r) <= L if self.truncation == "left_prompt" else p + len(r) <= L)]
        dropped = len(g.responses) - len(keep)
        if dropped:
            self.stats["responses_dropped_too_long"] += dropped
            before = len(g.comparisons)
            g = g.subset(keep)
            self.stats["comparisons_dropped_too_long"] += before - len(g.comparisons)
            if not g.responses or (not g.comparisons and g.labels is None):
                return None
        longest = max(len(r) for r in g.responses)
        if p + longest > L:  # left_prompt: cut the prompt from the left
            cut = p + longest - L
            g.prompt_tokens = g.prompt_tokens[cut:]
            self.stats["truncated_prompts"] += 1
        return g

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> PreferenceGroup:
        return self.groups[index]


# ---------------------------------------------------------------------------------------------
# builders (YAML: ``dataset: {_component_: fastrm.datasets.<builder>, ...}``)
# ---------------------------------------------------------------------------------------------

def preference_dataset(
    tokenizer: Any,
    *,
    source: str,
    column_map: Optional[Mapping[str, str]] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    truncation: str = "left_prompt",
    on_identical: str = "error",
    group_by_prompt: bool = False,
    format: str = "pairs",
    margin_scale: float = 1.0,
    response_key: str = "response",
    score_key: str = "score",
    new_system_prompt: Optional[str] = None,
    filter_fn: Optional[Callable[[Mapping[str, Any]], bool]] = None,
    **load_dataset_kwargs: Any,
) -> PreferenceDataset:
    """Generic reward-modeling dataset (torchtune ``preference_dataset`` conventions).

    ``format``:

    * ``"pairs"``: ``chosen`` / ``rejected`` (strings or message lists), optional ``prompt``
      (TRL explicit prompt; else the implicit prompt is split off message lists, and string
      pairs are prompt-free), optional ``margin``, ``prompt_id``, ``category`` columns.
    * ``"scored"``: ``prompt`` + ``completions`` (``[{"response", "score"}]``) or
      ``responses`` + ``scores`` / ``ranks``: one group per row, comparisons from score
      differences (``margin = margin_scale * (s_i - s_j)``; ties dropped and counted);
      ``response_key`` / ``score_key`` name the fields of each completion (UltraFeedback raw:
      ``score_key="overall_score"``).
    * ``"unpaired"``: TRL unpaired ``prompt`` / ``completion`` / ``label``.

    Example (YAML)::

        dataset:
          _component_: fastrm.datasets.preference_dataset
          source: json
          data_files: data/my_pairs.jsonl
          column_map: {chosen: good, rejected: bad}
          max_seq_len: 2048
    """
    from fastrm.data.formats import PairTransform, ScoredResponsesTransform, UnpairedTransform

    if format == "pairs":
        transform = PairTransform(column_map, new_system_prompt=new_system_prompt)
    elif format == "scored":
        transform = ScoredResponsesTransform(column_map, response_key, score_key, margin_scale)
    elif format == "unpaired":
        transform = UnpairedTransform(column_map)
    else:
        raise ValueError(f"format={format!r}; choose 'pairs', 'scored' or 'unpaired'")
    ds = PreferenceDataset(
        tokenizer, source, transform=transform, split=split, max_seq_len=max_seq_len,
        truncation=truncation, on_identical=on_identical, group_by_prompt=group_by_prompt,
        filter_fn=filter_fn, **load_dataset_kwargs)
    if format == "scored":
        ds.stats["ties"] = transform.stats.ties
    return ds


def hh_rlhf_dataset(
    tokenizer: Any, *, source: str = "Anthropic/hh-rlhf", split: str = "train",
    max_seq_len: Optional[int] = None, truncation: str = "left_prompt",
    on_identical: str = "drop", **kw: Any,
) -> PreferenceDataset:
    """Anthropic HH-RLHF: dialogue strings ``"\\n\\nHuman: ..\\n\\nAssistant: .."``; the turns
    chosen and rejected share become the prompt. HH has a few pairs with identical texts, so
    they are dropped (counted) by default."""
    from fastrm.data.formats import HHRLHFTransform
    return PreferenceDataset(tokenizer, source, transform=HHRLHFTransform(kw.pop("column_map", None)),
                             split=split, max_seq_len=max_seq_len, truncation=truncation,
                             on_identical=on_identical, **kw)


def ultrafeedback_dataset(
    tokenizer: Any, *, source: str = "HuggingFaceH4/ultrafeedback_binarized",
    split: str = "train_prefs", max_seq_len: Optional[int] = None,
    truncation: str = "left_prompt", with_margin: bool = True, margin_scale: float = 1.0,
    on_identical: str = "drop", **kw: Any,
) -> PreferenceDataset:
    """UltraFeedback-binarized: ``prompt``, ``chosen`` / ``rejected`` message lists (which repeat
    the prompt: stripped), ``score_chosen`` / ``score_rejected`` -> ``margin = margin_scale *
    (score_chosen - score_rejected)`` (:func:`fastrm.data.formats.ultrafeedback_margin`);
    ``prompt_id`` groups the pairs of one prompt."""
    from fastrm.data.formats import PairTransform, ultrafeedback_margin
    t = PairTransform(kw.pop("column_map", None),
                      margin_fn=ultrafeedback_margin(margin_scale) if with_margin else None,
                      margin_column_name="score_chosen/score_rejected")
    return PreferenceDataset(tokenizer, source, transform=t, split=split, max_seq_len=max_seq_len,
                             truncation=truncation, on_identical=on_identical, **kw)


def shp_dataset(
    tokenizer: Any, *, source: str = "stanfordnlp/SHP", split: str = "train",
    max_seq_len: Optional[int] = None, truncation: str = "left_prompt",
    with_margin: bool = True, margin_scale: float = 1.0, on_identical: str = "drop",
    **kw: Any,
) -> PreferenceDataset:
    """Stanford SHP: ``history`` is the prompt; ``labels == 1`` means ``human_ref_A`` is
    preferred; ``margin = margin_scale * ln(score_ratio)`` (:func:`fastrm.data.formats.shp_margin`);
    ``post_id`` groups the pairs of one post."""
    from fastrm.data.formats import SHPTransform
    cm = {"prompt_id": "post_id", **(kw.pop("column_map", None) or {})}
    t = SHPTransform(with_margin=with_margin, scale=margin_scale, column_map=cm)
    return PreferenceDataset(tokenizer, source, transform=t, split=split, max_seq_len=max_seq_len,
                             truncation=truncation, on_identical=on_identical, **kw)


def rewardbench_dataset(
    tokenizer: Any, *, source: str = "allenai/reward-bench", split: str = "filtered",
    max_seq_len: Optional[int] = None, truncation: str = "left_prompt", **kw: Any,
) -> PreferenceDataset:
    """RewardBench (``prompt``, ``chosen``, ``rejected`` strings, ``subset``): an evaluation
    set; ``PreferenceGroup.category`` holds the subset for per-category accuracy."""
    from fastrm.data.formats import PairTransform
    cm = {"category": "subset", **(kw.pop("column_map", None) or {})}
    return PreferenceDataset(tokenizer, source, transform=PairTransform(cm), split=split,
                             max_seq_len=max_seq_len, truncation=truncation, **kw)


def unpaired_preference_dataset(
    tokenizer: Any, *, source: str, split: str = "train", max_seq_len: Optional[int] = None,
    truncation: str = "left_prompt", **kw: Any,
) -> PreferenceDataset:
    """TRL unpaired preference data (``prompt``, ``completion``, ``label``): pools of desirable
    and undesirable responses for cross-prompt (RPO) training; ``labels`` in batches."""
    from fastrm.data.formats import UnpairedTransform
    return PreferenceDataset(tokenizer, source, transform=UnpairedTransform(kw.pop("column_map", None)),
                             split=split, max_seq_len=max_seq_len, truncation=truncation, **kw)


def default_shared_data_dir() -> Path:
    """``$FASTRM_SHARED_DATA`` or ``../shared/data`` beside the repository checkout."""
    import os
    from pathlib import Path
    env = os.environ.get("FASTRM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def qa_feedback_dataset(
    tokenizer: Any, *, split: str = "train", data_files: Optional[str] = None,
    max_seq_len: Optional[int] = None, truncation: str = "left_prompt",
    group_by_prompt: bool = False, on_identical: str = "drop", **kw: Any,
) -> PreferenceDataset:
    """qa-feedback human preference pairs (arXiv 2306.01693, dev set; TRL explicit-prompt rows
    with ``id``, ``question_id``, ``split`` in ``train`` / ``validation``).

    ``data_files`` defaults to ``<shared data>/qa_feedback/pairs.jsonl`` (see
    :func:`default_shared_data_dir`); ``question_id`` is the prompt id, so
    ``group_by_prompt=True`` gives one group per question."""
    path = data_files or str(default_shared_data_dir() / "qa_feedback" / "pairs.jsonl")
    from pathlib import Path
    if not Path(path).is_file():
        raise ValueError(f"qa_feedback data not found at {path}; pass data_files= or set "
                         "FASTRM_SHARED_DATA to the folder holding qa_feedback/")
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}; qa_feedback has 'train' and 'validation'")
    from fastrm.data.formats import PairTransform
    user_filter = kw.pop("filter_fn", None)
    return PreferenceDataset(
        tokenizer, "json", data_files=path, split="train",
        transform=PairTransform({"prompt_id": "question_id", **(kw.pop("column_map", None) or {})}),
        filter_fn=lambda r: r["split"] == split and (user_filter is None or user_filter(r)),
        max_seq_len=max_seq_len, truncation=truncation, group_by_prompt=group_by_prompt,
        on_identical=on_identical, **kw)


def _qa_feedback_inputs(data_files: Optional[str] = None, **_: Any) -> list[str]:
    return [data_files or str(default_shared_data_dir() / "qa_feedback" / "pairs.jsonl")]


#: the file the data cache must hash (:func:`fastrm.data.cache.cache_inputs`): the default data
#: file is not among the arguments
qa_feedback_dataset.cache_inputs = _qa_feedback_inputs


def synthetic_preference_dataset(
    tokenizer: Any, *, split: str = "train", num_prompts: int = 10_000, seed: int = 0,
    responses_per_prompt: int = 2, with_margin: bool = True,
    held_out_categories: Sequence[str] = ("refusal",), categories: Optional[Sequence[str]] = None,
    validation_fraction: float = 0.1, length_scale: float = 1.0,
    max_seq_len: Optional[int] = None, truncation: str = "left_prompt", **kw: Any,
) -> PreferenceDataset:
    """The SYNTHETIC verifiable preference set (:mod:`fastrm.data.synthetic`): ``split`` in
    ``train`` / ``validation`` / ``test`` (held-out categories). ``responses_per_prompt > 2``
    gives grouped responses with score-difference margins."""
    from fastrm.data.formats import PairTransform, ScoredResponsesTransform
    from fastrm.data.synthetic import CATEGORIES, generate_rows
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r}; choose 'train', 'validation' or 'test'")
    rows = generate_rows(num_prompts, seed, tuple(categories or CATEGORIES), responses_per_prompt,
                         with_margin, held_out_categories, validation_fraction, length_scale)
    rows = [r for r in rows if r["split"] == split]
    if responses_per_prompt == 2:
        t = PairTransform()
        if not with_margin:
            t.column_map["margin"] = "__no_margin__"
    else:
        t = ScoredResponsesTransform(with_margin=with_margin)
    ds = PreferenceDataset(tokenizer, data=rows, transform=t, max_seq_len=max_seq_len,
                           truncation=truncation, **kw)
    if responses_per_prompt > 2:
        ds.stats["ties"] = t.stats.ties
    return ds
