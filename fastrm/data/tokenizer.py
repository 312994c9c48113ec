"""A tiny byte-level chat tokenizer that follows torchtune's ``ModelTokenizer`` protocol.

It needs no files, so tests, benchmarks and the synthetic data set run anywhere. It is not a
model's tokenizer: train real models with the model's own (``fastrm.models.tokenizer``).

Template (ChatML-like, one token per byte)::

    <bos> (<im_start> role "\\n" content <im_end> "\\n")* <eos>

so a conversation's token list is the concatenation of its messages' token lists (plus BOS in
front and EOS at the end): the reward is read at ``<eos>``. For generation (``fastrm generate`` /
``judge`` smoke runs with :func:`fastrm.models.tiny_llama3`) ``add_generation_prompt=True`` leaves
an assistant turn open (``<im_start> assistant "\\n"``) and a response ends at ``<im_end>`` or
``<eos>`` (:attr:`ByteChatTokenizer.stop_tokens`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3, 4
_OFFSET = 5  # byte b is token b + 5


def _role_content(m: Any) -> tuple[str, str, bool]:
    if isinstance(m, Mapping):
        return m["role"], m["content"], bool(m.get("masked", False))
    return m.role, m.text_content, bool(getattr(m, "masked", False))


class ByteChatTokenizer:
    """Byte-level ``ModelTokenizer``: ``tokenize_messages(messages) -> (tokens, mask)``.

    Args:
        max_seq_len: if set, ``tokenize_messages`` truncates from the right (torchtune's
            behaviour); fastrm's datasets apply their own policy, so leave it ``None``.
    """

    vocab_size = 256 + _OFFSET
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    im_start_id, im_end_id = IM_START_ID, IM_END_ID
    #: ids that end a generated response: the end of the assistant turn, or of the sequence
    stop_tokens = [IM_END_ID, EOS_ID]

    def __init__(self, max_seq_len: int | None = None) -> None:
        self.max_seq_len = max_seq_len

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + _OFFSET for b in text.encode("utf-8")]
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        names = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", IM_START_ID: "<im_start>",
                 IM_END_ID: "<im_end>"}
        out, buf = [], bytearray()
        for t in ids:
            t = int(t)
            if t >= _OFFSET:
                buf.append(t - _OFFSET)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if not skip_special_tokens:
                out.append(names[t])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def tokenize_message(self, message: Any) -> list[int]:
        role, content, _ = _role_content(message)
        return [IM_START_ID] + self.encode(f"{role}\n{content}") + [IM_END_ID] + self.encode("\n")

    def tokenize_messages(
        self, messages: Sequence[Any], add_end_tokens: bool = True,
        add_generation_prompt: bool = False, **kwargs: Any
    ) -> tuple[list[int], list[bool]]:
        """``(tokens, mask)`` of a conversation; ``add_generation_prompt`` appends an open
        assistant turn (the prompt a model generates the reply after) and no end token, as
        ``HFChatTokenizer`` does: it is then a prefix of the conversation with the reply."""
        tokens, mask = [BOS_ID], [True]
        for m in messages:
            t = self.tokenize_message(m)
            tokens.extend(t)
            mask.extend([_role_content(m)[2]] * len(t))
        if add_generation_prompt:
            t = [IM_START_ID] + self.encode("assistant\n")
            tokens.extend(t)
            mask.extend([True] * len(t))
        if add_end_tokens and not add_generation_prompt:
            tokens.append(EOS_ID)
            mask.append(True)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"])
        return {**sample, "tokens": tokens, "mask": mask}
