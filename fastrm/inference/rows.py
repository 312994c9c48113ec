"""Rows to score -> tokenized scoring groups (one :class:`PreferenceGroup` per row).

Three row formats (detected per row by their columns; every other column is kept untouched):

* ``{"prompt", "response"}``: one response; the output row gets ``"reward": float``.
  ``prompt`` is a string (one user turn) or a message list, or absent for prompt-free text;
  ``response`` is a string (one assistant turn) or a message list.
* ``{"messages": [...]}``: a conversation whose **last** message is the assistant turn that is
  scored; the messages before it are the prompt. Output: ``"reward": float``.
* ``{"prompt", "responses": [...]}``: best-of-N, ``K >= 1`` responses of one prompt. Output:
  ``"rewards": [K floats]``, in the responses' order. The prompt is computed once for all ``K``.

Texts must be strings: numbers, booleans and nulls are a ``ValueError`` naming the row and the
column (the rule of :mod:`fastrm.data.formats`). A row's null ``response`` / ``responses`` /
``messages`` cell beside a non-null one counts as absent, and so does a null ``prompt`` in a
``messages`` row (a Parquet file of mixed formats has every column in every row). An empty
response (``""``) is legal and scored (the chat template still closes its turn, so there is a
token to read the reward at).

Tokenization is the data path's (:func:`fastrm.data.dataset.tokenize_group`): each response's
full conversation ``prompt + response`` is tokenized with the model's tokenizer exactly as an
unshared scorer would, and the prompt tokens are their common prefix; so packing the prompt
once changes nothing about the tokens a response's reward is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fastrm.data.dataset import tokenize_group
from fastrm.data.formats import RawGroup, is_null, messages_text, to_messages
from fastrm.data.group import PreferenceGroup

__all__ = ["ScoreRow", "parse_row", "tokenize_row", "text_tokens", "REWARD_FIELD",
           "REWARDS_FIELD"]

#: output field of a one-response row (``response`` or ``messages``)
REWARD_FIELD = "reward"
#: output field of a best-of-N row (``responses``)
REWARDS_FIELD = "rewards"

_FORMATS = ("{'prompt', 'response'}, {'messages'} (last turn: assistant) or "
            "{'prompt', 'responses': [...]}")


@dataclass
class ScoreRow:
    """One input row parsed: prompt messages, the responses to score, where rewards go."""

    index: int
    prompt: list
    responses: list[list]
    best_of_n: bool  # True: ``rewards`` list; False: one ``reward``
    columns: tuple[str, ...]

    @property
    def output_field(self) -> str:
        return REWARDS_FIELD if self.best_of_n else REWARD_FIELD


def _prompt(row: Mapping[str, Any], index: int) -> list:
    if "prompt" not in row:
        return []
    if is_null(row["prompt"]):
        raise ValueError(f"row {index}, column 'prompt' is null; give the prompt text (or drop the "
                         "column for prompt-free rows)")
    return to_messages(row["prompt"], "user", index, "prompt")


def _response(value: Any, index: int, column: str) -> list:
    msgs = to_messages(value, "assistant", index, column)
    if not msgs:
        raise ValueError(f"row {index}, column {column!r}: no response message; give the "
                         "response, '' if it is empty")
    return msgs


def parse_row(row: Mapping[str, Any], index: int) -> ScoreRow:
    """Parses one input row (see the module docstring); ``ValueError`` names the row, the
    column and the fix."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} is a {type(row).__name__}, not an object; rows look like "
                         f"{_FORMATS}")
    # a null cell is an absent column: a Parquet file (or DataFrame) of mixed formats has every
    # column in every row, null where the row's format has none
    cols = [c for c in ("response", "responses", "messages") if c in row]
    present = [c for c in cols if not is_null(row[c])]
    if not present and len(cols) == 1:
        present = cols  # the only one is null: its own error below names the column
    if len(present) != 1:
        what = f"{present}, more than one of" if present else "none of"
        nulls = f" ({', '.join(repr(c) for c in cols)} null)" if cols and not present else ""
        raise ValueError(f"row {index} has {what} 'response', 'responses', 'messages'{nulls}; "
                         f"rows look like {_FORMATS}")
    for out in (REWARD_FIELD, REWARDS_FIELD):
        if out in row:
            raise ValueError(f"row {index} already has a {out!r} column, which scoring writes; "
                             "rename or drop it first")
    col = present[0]
    if col == "messages":
        if "prompt" in row and not is_null(row["prompt"]):
            raise ValueError(f"row {index} has both 'messages' and 'prompt'; a messages row holds "
                             "the whole conversation (drop 'prompt')")
        msgs = to_messages(row["messages"], "user", index, "messages") if not is_null(
            row["messages"]) else None
        if not msgs:
            raise ValueError(f"row {index}, column 'messages' is empty or null; give the "
                             "conversation, ending with the assistant turn to score")
        if msgs[-1].role != "assistant":
            raise ValueError(f"row {index}, column 'messages': the last message has role "
                             f"{msgs[-1].role!r}; the scored turn must be the last one and an "
                             "'assistant' turn")
        return ScoreRow(index, msgs[:-1], [msgs[-1:]], False, ("messages",))
    prompt = _prompt(row, index)
    if col == "response":
        return ScoreRow(index, prompt, [_response(row["response"], index, "response")], False,
                        ("response",))
    value = row["responses"]
    if isinstance(value, str) or not isinstance(value, Sequence) or not len(value):
        raise ValueError(f"row {index}, column 'responses' must be a non-empty list of responses "
                         f"(strings or message lists), got {str(value)[:60]!r}")
    cols = tuple(f"responses[{k}]" for k in range(len(value)))
    return ScoreRow(index, prompt, [_response(v, index, c) for v, c in zip(value, cols)], True,
                    cols)


def tokenize_row(parsed: ScoreRow, tokenizer: Any) -> PreferenceGroup:
    """The row as a :class:`PreferenceGroup` (no comparisons): ``prompt_tokens + responses[k]``
    is the tokenizer's sequence of response ``k``, token for token."""
    raw = RawGroup(prompt=parsed.prompt, responses=parsed.responses, comparisons=[],
                   row=parsed.index, response_columns=parsed.columns,
                   prompt_text=messages_text(parsed.prompt))
    prompt, responses = tokenize_group(raw, tokenizer)
    return PreferenceGroup(prompt_tokens=prompt, responses=responses, comparisons=[],
                           source_index=parsed.index, prompt_text=raw.prompt_text)


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """Tokens of an already rendered conversation text (OpenRLHF's remote reward protocol sends
    ``prompt + response`` as one decoded string), as the tokenizer's ``tokenize_messages`` gives
    them for the conversation that renders to ``text``:

    * :class:`~fastrm.models.tokenizer.HFChatTokenizer` (``encode_rendered``): chat mode encodes
      the text as it is (the template's special tokens written in it become their ids); plain
      mode appends EOS unless present and applies the post-processor (BOS).
    * other tokenizers: ``encode(text)`` plus EOS unless the ids already end with it.

    Padding (OpenRLHF decodes padded sequences): leading pad ids are dropped, and trailing ones
    when the pad id is neither the EOS nor the end-of-turn id (otherwise padding cannot be told
    from the sequence's own end: send unpadded texts).
    """
    if hasattr(tokenizer, "encode_rendered"):
        ids = list(tokenizer.encode_rendered(text))
    else:
        ids = list(tokenizer.encode(text))
        eos = getattr(tokenizer, "eos_id", None)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None:
        lo, hi = 0, len(ids)
        while lo < hi and ids[lo] == pad:
            lo += 1
        if pad not in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "end_token_id", None)):
            while hi > lo and ids[hi - 1] == pad:
                hi -= 1
        ids = ids[lo:hi]
    if not ids:
        raise ValueError("the query has no token once padding is removed")
    return ids
