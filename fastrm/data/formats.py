"""Row formats -> :class:`RawGroup` (messages, before tokenization).

Every transform is a callable ``transform(row: Mapping, index: int) -> RawGroup``. A
``column_map`` maps the names the transform expects (keys) to the dataset's column names
(values), as in torchtune. Bad rows raise ``ValueError`` naming the row and the column.

Cells: texts (``prompt``, ``chosen``, ``rejected``, message ``content``...) must be strings;
there is no silent conversion: a number, a boolean, a null (``None``) or a NaN (pandas' missing
value) is a ``ValueError`` naming the row, the column (and the message) and the fix. An empty
string is a legal, *empty* response (a model that produced nothing): it is kept and counted by
the dataset (``stats["empty_responses"]``). A present-but-null ``prompt`` is an error too (an
absent ``prompt`` column means prompt-free or implicit-prompt rows).

Formats:

* :class:`PairTransform` (default): ``chosen`` / ``rejected`` as strings or message lists, with
  or without a ``prompt`` column.

  - no prompt, strings: a *prompt-free* pair; each text is one assistant message.
  - no prompt, message lists (TRL "implicit prompt", torchtune ``ChosenRejectedToMessages``):
    the longest common run of leading messages is the prompt, the rest the responses.
  - ``prompt`` column (TRL "explicit prompt"): a string (one user turn) or a message list; the
    responses are strings (one assistant turn) or message lists.
  - optional ``margin`` (float per pair) or a ``margin_fn(row) -> float``; optional
    ``prompt_id`` (the grouping key, e.g. a question id) and ``category`` (e.g. a RewardBench
    subset).
* :class:`HHRLHFTransform`: Anthropic HH-RLHF strings ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  parsed into turns; the shared leading turns are the prompt.
* :func:`ultrafeedback_margin`, :func:`shp_margin`: margins from scores (formulas in their
  docstrings); used by the presets in :mod:`fastrm.data.dataset`.
* :class:`ScoredResponsesTransform`: one prompt with ``K`` responses and per-response scores
  (UltraFeedback ``completions`` style) or ranks; comparisons from score differences.
* :class:`UnpairedTransform`: TRL's unpaired format (``prompt``, ``completion``, boolean
  ``label``): a pool of desirable and a pool of undesirable responses.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

from torchtune.data import Message

from fastrm.data.group import Comparison, GroupingStats, comparisons_from_ranking, \
    comparisons_from_scores

ROLES = ("system", "user", "assistant", "ipython", "tool")


@dataclass
class RawGroup:
    """A group before tokenization: prompt messages, response message lists, comparisons."""

    prompt: list[Message]
    responses: list[list[Message]]
    comparisons: list[Comparison]
    row: int
    key: Hashable = None  # grouping key: prompt_id column value, else the prompt text
    prompt_text: str = ""
    labels: Optional[list[int]] = None
    category: str = ""
    response_columns: tuple[str, ...] = ()


def _where(row: int, column: str) -> str:
    return f"row {row}, column {column!r}"


def _col(row: Mapping[str, Any], name: str, column_map: Mapping[str, str]) -> str:
    return column_map.get(name, name)


def is_null(value: Any) -> bool:
    """``None`` or a float NaN (how pandas / Parquet spell a missing cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str:
    """What a non-text cell is, for error messages."""
    if value is None:
        return "null (None)"
    if isinstance(value, float) and math.isnan(value):
        return "NaN (a missing value)"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return f"a boolean ({value!r})"
    if isinstance(value, numbers.Number):
        return f"a number ({value!r})"
    return f"a {type(value).__name__} ({str(value)[:40]!r})"


_TEXT_FIX = ("text cells must be strings: convert the column to text, write '' for an empty "
             "response, or drop the row (filter_fn)")


def check_text(value: Any, idx: int, column: str, what: str = "") -> str:
    """``value`` if it is a string, else ``ValueError`` naming the row, column (and ``what``,
    e.g. ``"message 2 content"``) and the fix."""
    where = f"{_where(idx, column)}{': ' + what if what else ''}"
    if isinstance(value, str):
        try:  # JSON allows lone surrogate escapes ("\ud800"), which no tokenizer can encode
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where} holds text that is not valid Unicode ({err.reason} at "
                             f"character {err.start}: {value[err.start:err.end]!a}); repair or "
                             "drop that character in the source file") from None
        return value
    raise ValueError(f"{where} is {_kind(value)}, not text; {_TEXT_FIX}")


def _get(row: Mapping[str, Any], idx: int, name: str, column_map: Mapping[str, str],
         required: bool = True) -> Any:
    """The cell of expected column ``name``; ``None`` when an optional column is absent or null.
    A required column that is absent or null is a ``ValueError`` naming row and column."""
    col = _col(row, name, column_map)
    if col not in row:
        if required:
            have = ", ".join(sorted(row.keys()))
            raise ValueError(f"{_where(idx, col)}: missing (columns present: {have}); map it with "
                             f"column_map={{'{name}': '<your column>'}}")
        return None
    if is_null(row[col]):
        if required:
            raise ValueError(f"{_where(idx, col)} is {_kind(row[col])}; {_TEXT_FIX}")
        return None
    return row[col]


def _get_prompt(row: Mapping[str, Any], idx: int, column_map: Mapping[str, str]) -> Any:
    """The optional ``prompt`` cell: ``None`` when the column is absent; a null cell in a present
    column is an error (it would silently turn the row prompt-free)."""
    col = _col(row, "prompt", column_map)
    if col in row and is_null(row[col]):
        raise ValueError(f"{_where(idx, col)} is {_kind(row[col])}; {_TEXT_FIX} (an absent "
                         "prompt column, not a null prompt, means prompt-free rows)")
    return row.get(col)


def to_messages(value: Any, default_role: str, idx: int, column: str) -> list[Message]:
    """A string (one message of ``default_role``) or a list of ``{"role", "content"}`` dicts /
    :class:`Message` objects -> list of Message. Anything else (numbers, booleans, nulls, NaN,
    non-text content) is a ``ValueError`` naming the row, the column and the message."""
    if isinstance(value, str):
        return [Message(role=default_role, content=check_text(value, idx, column))]
    if isinstance(value, Message):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        out = []
        for k, m in enumerate(value):
            if isinstance(m, Message):
                out.append(m)
                continue
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"{_where(idx, column)}: message {k} must be a string or have "
                                 f"'role' and 'content', got {str(m)[:80]!r}")
            if m["role"] not in ROLES:
                raise ValueError(f"{_where(idx, column)}: message {k} has role {m['role']!r}; "
                                 f"expected one of {ROLES}")
            content = check_text(m["content"], idx, column, f"message {k} content")
            out.append(Message(role=m["role"], content=content))
        return out
    check_text(value, idx, column)  # raises with the cell's kind
    raise AssertionError("unreachable")


def message_key(msgs: Sequence[Message]) -> tuple:
    """Hashable identity of a message list (role and text of every message)."""
    return tuple((m.role, m.text_content) for m in msgs)


def messages_text(msgs: Sequence[Message]) -> str:
    return "\n".join(m.text_content for m in msgs)


def _check_response(msgs: list[Message], idx: int, column: str) -> None:
    # an empty *text* is a legal response; a response without any message is a malformed row
    if not msgs:
        raise ValueError(f"{_where(idx, column)}: no response message (the conversation has "
                         "nothing after the prompt); give the response turn, '' if it is empty")


def parse_margin(value: Any, idx: int, column: str) -> float:
    """A finite float, else ``ValueError`` naming row and column."""
    if isinstance(value, bool):
        raise ValueError(f"{_where(idx, column)}: margin must be a number, got a bool")
    try:
        m = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_where(idx, column)}: margin must be a number, got {value!r}") from None
    if not math.isfinite(m):
        raise ValueError(f"{_where(idx, column)}: margin is {m}; give a finite number or drop "
                         "the row (filter_fn)")
    return m


def split_common_prefix(a: list[Message], b: list[Message]) -> int:
    """Number of leading messages ``a`` and ``b`` share, leaving each at least its last message."""
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and (a[n].role, a[n].text_content) == (b[n].role, b[n].text_content):
        n += 1
    return n


class PairTransform:
    """Chosen/rejected pairs in any of the layouts above -> :class:`RawGroup`.

    Args:
        column_map: expected name -> dataset column, for ``prompt``, ``chosen``, ``rejected``,
            ``margin``, ``prompt_id``, ``category``.
        new_system_prompt: prepended as a system message to every prompt (replacing any).
        margin_fn: ``row -> float`` margin (overrides the margin column); its output is
            checked like a column.
        margin_column_name: the name errors report for ``margin_fn`` margins.
    """

    def __init__(
        self,
        column_map: Optional[Mapping[str, str]] = None,
        new_system_prompt: Optional[str] = None,
        margin_fn: Optional[Callable[[Mapping[str, Any], int], float]] = None,
        margin_column_name: str = "margin",
    ) -> None:
        self.column_map = dict(column_map or {})
        self.new_system_prompt = new_system_prompt
        self.margin_fn = margin_fn
        self.margin_column_name = margin_column_name

    def _prompt(self, row: Mapping[str, Any], idx: int) -> Optional[list[Message]]:
        value = _get_prompt(row, idx, self.column_map)
        if value is None:
            return None
        return to_messages(value, "user", idx, _col(row, "prompt", self.column_map))

    def _responses(self, row, idx) -> tuple[Any, Any, str, str]:
        c_col, r_col = _col(row, "chosen", self.column_map), _col(row, "rejected", self.column_map)
        chosen = _get(row, idx, "chosen", self.column_map)
        rejected = _get(row, idx, "rejected", self.column_map)
        return chosen, rejected, c_col, r_col

    def _split(self, chosen, rejected, idx, c_col, r_col, prompt):
        c = to_messages(chosen, "assistant", idx, c_col)
        r = to_messages(rejected, "assistant", idx, r_col)
        if prompt is None and not isinstance(chosen, str):
            n = split_common_prefix(c, r)  # implicit prompt: shared leading turns
            prompt, c, r = c[:n], c[n:], r[n:]
        elif prompt:
            # explicit prompt whose responses repeat it (UltraFeedback-binarized stores the
            # whole conversation in chosen/rejected): strip the repeated leading turns
            pk = message_key(prompt)
            if message_key(c[:len(prompt)]) == pk and message_key(r[:len(prompt)]) == pk:
                c, r = c[len(prompt):], r[len(prompt):]
        return prompt or [], c, r

    def __call__(self, row: Mapping[str, Any], idx: int) -> RawGroup:
        prompt = self._prompt(row, idx)
        chosen, rejected, c_col, r_col = self._responses(row, idx)
        prompt, c, r = self._split(chosen, rejected, idx, c_col, r_col, prompt)
        _check_response(c, idx, c_col)
        _check_response(r, idx, r_col)
        if self.new_system_prompt is not None:
            prompt = [Message(role="system", content=self.new_system_prompt)] + [
                m for m in prompt if m.role != "system"]
        if self.margin_fn is not None:
            margin = parse_margin(self.margin_fn(row, idx), idx, self.margin_column_name)
        else:
            mv = _get(row, idx, "margin", self.column_map, required=False)
            margin = None if mv is None else parse_margin(
                mv, idx, _col(row, "margin", self.column_map))
        pid = _get(row, idx, "prompt_id", self.column_map, required=False)
        cat = _get(row, idx, "category", self.column_map, required=False)
        ptext = messages_text(prompt)
        return RawGroup(
            prompt=prompt, responses=[c, r], comparisons=[(0, 1, margin)], row=idx,
            key=("id", pid) if pid is not None else ("text", message_key(prompt)),
            prompt_text=ptext, category="" if cat is None else str(cat),
            response_columns=(c_col, r_col))


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str, idx: int, column: str) -> list[Message]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` -> user/assistant messages."""
    parts = _HH_TURN.split(check_text(text, idx, column))
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"{_where(idx, column)}: not an HH-RLHF dialogue (expected "
                         "'\\n\\nHuman: ...\\n\\nAssistant: ...'), starts with "
                         f"{text[:40]!r}")
    msgs = []
    for who, content in zip(parts[1::2], parts[2::2]):
        msgs.append(Message(role="user" if who == "Human" else "assistant", content=content))
    return msgs


class HHRLHFTransform(PairTransform):
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` are whole dialogues as text; the turns they
    share are the prompt (every turn up to the last ``Assistant:``)."""

    def _split(self, chosen, rejected, idx, c_col, r_col, prompt):
        c = parse_hh_dialogue(chosen, idx, c_col)
        r = parse_hh_dialogue(rejected, idx, r_col)
        n = split_common_prefix(c, r)
        return c[:n], c[n:], r[n:]


def ultrafeedback_margin(scale: float = 1.0) -> Callable[[Mapping[str, Any], int], float]:
    """UltraFeedback-binarized: ``margin = scale * (score_chosen - score_rejected)`` (GPT-4
    ratings on a 1-10 scale, so ``scale = 1`` gives margins in [0, 9])."""

    def fn(row: Mapping[str, Any], idx: int) -> float:
        a = parse_margin(row.get("score_chosen"), idx, "score_chosen")
        b = parse_margin(row.get("score_rejected"), idx, "score_rejected")
        return scale * (a - b)

    return fn


def shp_margin(scale: float = 1.0) -> Callable[[Mapping[str, Any], int], float]:
    """Stanford SHP: ``margin = scale * ln(score_ratio)`` where ``score_ratio`` is the column
    (``score_preferred / score_dispreferred``, net upvotes, >= 1), or when absent
    ``max(score_A, score_B) / min(score_A, score_B)``. A ratio of 2 gives ``ln 2 = 0.69``: the
    Bradley-Terry probability ``sigmoid(delta - margin)`` then asks the preferred reply to win by
    the log-odds its upvote ratio implies."""

    def fn(row: Mapping[str, Any], idx: int) -> float:
        if row.get("score_ratio") is not None:
            ratio = parse_margin(row["score_ratio"], idx, "score_ratio")
        else:
            a = parse_margin(row.get("score_A"), idx, "score_A")
            b = parse_margin(row.get("score_B"), idx, "score_B")
            if min(a, b) <= 0:
                raise ValueError(f"{_where(idx, 'score_A/score_B')}: scores must be > 0 for a "
                                 "log ratio")
            ratio = max(a, b) / min(a, b)
        if ratio <= 0:
            raise ValueError(f"{_where(idx, 'score_ratio')}: must be > 0, got {ratio}")
        return scale * math.log(ratio)

    return fn


def shp_to_pair(row: Mapping[str, Any], idx: int) -> dict:
    """SHP columns (``history``, ``human_ref_A``, ``human_ref_B``, ``labels`` = 1 when A is
    preferred) -> ``prompt`` / ``chosen`` / ``rejected``."""
    for c in ("history", "human_ref_A", "human_ref_B", "labels"):
        if c not in row:
            raise ValueError(f"{_where(idx, c)}: missing (Stanford SHP format)")
    for c in ("history", "human_ref_A", "human_ref_B"):
        check_text(row[c], idx, c)
    if is_null(row["labels"]) or row["labels"] not in (0, 1):
        raise ValueError(f"{_where(idx, 'labels')}: must be 1 (A preferred) or 0, got "
                         f"{_kind(row['labels'])}")
    a_wins = int(row["labels"]) == 1
    return {**row, "prompt": row["history"],
            "chosen": row["human_ref_A"] if a_wins else row["human_ref_B"],
            "rejected": row["human_ref_B"] if a_wins else row["human_ref_A"]}


class SHPTransform(PairTransform):
    """Stanford SHP (``history``, ``human_ref_A/B``, ``labels``, ``score_ratio``): margin from
    :func:`shp_margin` (set ``margin_fn=None`` by ``with_margin=False``)."""

    def __init__(self, with_margin: bool = True, scale: float = 1.0, **kw: Any) -> None:
        super().__init__(margin_fn=shp_margin(scale) if with_margin else None,
                         margin_column_name="score_ratio", **kw)

    def __call__(self, row: Mapping[str, Any], idx: int) -> RawGroup:
        return super().__call__(shp_to_pair(row, idx), idx)


class ScoredResponsesTransform:
    """One prompt with ``K`` scored (or ranked) responses -> a group.

    Accepted layouts (expected names, remap with ``column_map``):

    * ``completions``: list of ``{"response": text | messages, "score": float}`` (keys
      ``response_key`` / ``score_key``; UltraFeedback raw uses ``response`` and
      ``overall_score``);
    * ``responses`` (list of texts / message lists) with ``scores`` (floats) or ``ranks``
      (1 = best).

    Comparisons: every pair with different scores, ``margin = scale * (s_i - s_j)`` (``None``
    with ``with_margin=False`` or with ranks); ties are counted in ``stats.ties``.
    """

    def __init__(
        self,
        column_map: Optional[Mapping[str, str]] = None,
        response_key: str = "response",
        score_key: str = "score",
        scale: float = 1.0,
        with_margin: bool = True,
        stats: Optional[GroupingStats] = None,
    ) -> None:
        self.column_map = dict(column_map or {})
        self.response_key, self.score_key = response_key, score_key
        self.scale, self.with_margin = scale, with_margin
        self.stats = stats if stats is not None else GroupingStats()

    def __call__(self, row: Mapping[str, Any], idx: int) -> RawGroup:
        cm = self.column_map
        prompt_v = _get_prompt(row, idx, cm)
        prompt = [] if prompt_v is None else to_messages(prompt_v, "user", idx, _col(row, "prompt", cm))
        comps_v = _get(row, idx, "completions", cm, required=False)
        ranks = None
        if comps_v is not None:
            col = _col(row, "completions", cm)
            texts, scores = [], []
            for k, c in enumerate(comps_v):
                if not isinstance(c, Mapping) or self.response_key not in c or self.score_key not in c:
                    raise ValueError(f"{_where(idx, col)}: completion {k} needs keys "
                                     f"{self.response_key!r} and {self.score_key!r}")
                texts.append(c[self.response_key])
                scores.append(parse_margin(c[self.score_key], idx, f"{col}[{k}].{self.score_key}"))
        else:
            col = _col(row, "responses", cm)
            texts = _get(row, idx, "responses", cm)
            if isinstance(texts, (str, Mapping)) or not isinstance(texts, Sequence):
                raise ValueError(f"{_where(idx, col)}: expected a list of responses, got "
                                 f"{_kind(texts)}")
            scores_v = _get(row, idx, "scores", cm, required=False)
            if scores_v is None:
                ranks = _get(row, idx, "ranks", cm)
                if len(ranks) != len(texts):
                    raise ValueError(f"{_where(idx, _col(row, 'ranks', cm))}: {len(ranks)} ranks "
                                     f"for {len(texts)} responses")
                scores = None
            else:
                scol = _col(row, "scores", cm)
                if len(scores_v) != len(texts):
                    raise ValueError(f"{_where(idx, scol)}: {len(scores_v)} scores for "
                                     f"{len(texts)} responses")
                scores = [parse_margin(s, idx, f"{scol}[{k}]") for k, s in enumerate(scores_v)]
        responses = [to_messages(t, "assistant", idx, f"{col}[{k}]") for k, t in enumerate(texts)]
        for k, r in enumerate(responses):
            _check_response(r, idx, f"{col}[{k}]")
        if ranks is not None:
            comps = comparisons_from_ranking(ranks, self.stats)
        else:
            comps = comparisons_from_scores(scores, self.scale, self.stats, self.with_margin)
        pid = _get(row, idx, "prompt_id", cm, required=False)
        cat = _get(row, idx, "category", cm, required=False)
        return RawGroup(prompt=prompt, responses=responses, comparisons=comps, row=idx,
                        key=("id", pid) if pid is not None else ("text", message_key(prompt)),
                        prompt_text=messages_text(prompt), category="" if cat is None else str(cat),
                        response_columns=tuple(f"{col}[{k}]" for k in range(len(responses))))


class UnpairedTransform:
    """TRL unpaired preference rows (``prompt``, ``completion``, ``label``: True = desirable)
    -> a one-response group with ``labels = [+1]`` or ``[-1]`` and no comparison."""

    def __init__(self, column_map: Optional[Mapping[str, str]] = None) -> None:
        self.column_map = dict(column_map or {})

    def __call__(self, row: Mapping[str, Any], idx: int) -> RawGroup:
        cm = self.column_map
        pv = _get_prompt(row, idx, cm)
        prompt = [] if pv is None else to_messages(pv, "user", idx, _col(row, "prompt", cm))
        ccol = _col(row, "completion", cm)
        resp = to_messages(_get(row, idx, "completion", cm), "assistant", idx, ccol)
        _check_response(resp, idx, ccol)
        label = _get(row, idx, "label", cm)
        if not isinstance(label, (bool, int)) or label not in (0, 1, True, False):
            raise ValueError(f"{_where(idx, _col(row, 'label', cm))}: label must be a bool, got "
                             f"{label!r}")
        pid = _get(row, idx, "prompt_id", cm, required=False)
        return RawGroup(prompt=prompt, responses=[resp], comparisons=[], row=idx,
                        key=("id", pid) if pid is not None else ("text", message_key(prompt)),
                        prompt_text=messages_text(prompt), labels=[1 if label else -1],
                        response_columns=(ccol,))


def from_torchtune_messages(sample: Mapping[str, Any], idx: int) -> RawGroup:
    """Output of a torchtune preference message transform (``{"chosen": [Message...],
    "rejected": [Message...]}``, e.g. ``ChosenRejectedToMessages``) -> RawGroup (the shared
    leading messages are the prompt)."""
    c, r = list(sample["chosen"]), list(sample["rejected"])
    n = split_common_prefix(c, r)
    prompt = c[:n]
    return RawGroup(prompt=prompt, responses=[c[n:], r[n:]], comparisons=[(0, 1, None)], row=idx,
                    key=("text", message_key(prompt)), prompt_text=messages_text(prompt),
                    response_columns=("chosen", "rejected"))
