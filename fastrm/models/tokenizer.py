"""A torchtune ``ModelTokenizer`` over an HF ``tokenizer.json``, with ChatML conversations.

SmolLM2 (and Qwen, and many others) format a conversation in ChatML::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

:class:`HFChatTokenizer` produces exactly the token ids that transformers'
``apply_chat_template`` + ``tokenizer.json`` give for that text (the special tokens split the text,
and each stretch between them is BPE-encoded on its own), with one deliberate difference: with
``add_end_tokens=True`` the sequence ends *on* the final ``<|im_end|>`` (the chat template would
add a ``\\n`` after it). That end-of-turn token is where a reward model reads its score.

The invariant fastrm's packer relies on (prefix sharing, grouped responses): because every turn
starts and ends on a special token, a conversation's tokens are the concatenation of its turns'
tokens, so ::

    prompt, _ = tok.tokenize_messages(prompt_msgs, add_end_tokens=False)
    resp, _ = tok.tokenize_messages([response_msg], add_default_system=False)
    full, _ = tok.tokenize_messages(prompt_msgs + [response_msg])
    assert prompt + resp == full

A *plain* mode (``chat=False``) encodes prompt-free text: message contents are encoded one after
the other with no template and the sequence ends on ``eos_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

__all__ = ["HFChatTokenizer", "SMOLLM2_DEFAULT_SYSTEM_PROMPT", "smollm2_tokenizer"]

#: The system turn SmolLM2's chat template inserts when a conversation does not start with one.
SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TRUNCATION = ("right", "error")


def _resolve_files(path: Union[str, Path]) -> Tuple[Path, Optional[Path], Optional[Path]]:
    """``tokenizer.json`` (a directory or the file itself) and its sibling config files."""
    p = Path(path).expanduser()
    tok = p / "tokenizer.json" if p.is_dir() else p
    if not tok.is_file():
        raise ValueError(
            f"path={path}: no tokenizer.json there; pass the checkpoint directory written by "
            "`fastrm prepare smollm2` (or any HF checkpoint directory) or the tokenizer.json file"
        )
    cfg = tok.parent / "tokenizer_config.json"
    gen = tok.parent / "generation_config.json"
    return tok, (cfg if cfg.is_file() else None), (gen if gen.is_file() else None)


class HFChatTokenizer(ModelTokenizer, Transform):
    """ChatML (or plain-text) tokenizer over an HF ``tokenizer.json``, for torchtune recipes.

    Args:
        tokenizer_json_path: ``tokenizer.json``.
        tokenizer_config_json_path: ``tokenizer_config.json`` (bos/eos/pad tokens). Default: the
            file beside ``tokenizer.json`` if present.
        generation_config_path: ``generation_config.json`` (fallback for bos/eos ids). Default:
            the file beside ``tokenizer.json`` if present. One of the two configs must exist.
        max_seq_len: truncate (or reject, see ``truncation``) sequences longer than this.
        chat: ChatML formatting (True) or plain concatenation of message texts (False).
        default_system_prompt: system turn inserted when a conversation does not begin with one
            (as SmolLM2's chat template does); None inserts nothing.
        truncation: ``"right"`` keeps the first ``max_seq_len`` tokens and, when the sequence was
            to end on its end token, puts that token last again (torchtune's ``truncate``), counting
            every cut in :attr:`num_truncated`; ``"error"`` raises ``ValueError`` instead.
        im_start, im_end: the ChatML turn delimiters (special tokens of the vocabulary).

    Attributes:
        special_tokens (Dict[str, int]): every special (added) token -> id.
        bos_id, eos_id, pad_id (int): from the config files (pad falls back to eos).
        end_token_id (int): the token a conversation ends on when ``add_end_tokens=True``:
            ``<|im_end|>`` in chat mode, ``eos_id`` in plain mode. Rewards are read there.
        num_truncated (int): sequences cut to ``max_seq_len`` so far.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: Optional[str] = None,
        generation_config_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        chat: bool = True,
        default_system_prompt: Optional[str] = None,
        truncation: str = "right",
        im_start: str = "<|im_start|>",
        im_end: str = "<|im_end|>",
    ) -> None:
        tok_path, cfg_path, gen_path = _resolve_files(tokenizer_json_path)
        cfg_path = Path(tokenizer_config_json_path) if tokenizer_config_json_path else cfg_path
        gen_path = Path(generation_config_path) if generation_config_path else gen_path
        if cfg_path is None and gen_path is None:
            raise ValueError(
                f"tokenizer_config_json_path: neither tokenizer_config.json nor generation_config.json "
                f"found beside {tok_path}; pass one of them (they give the bos/eos tokens)"
            )
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}; must be >= 2 or None")
        if truncation not in _TRUNCATION:
            raise ValueError(f"truncation={truncation!r}; choose one of {_TRUNCATION}")
        self.base = HuggingFaceBaseTokenizer(
            str(tok_path),
            tokenizer_config_json_path=str(cfg_path) if cfg_path else None,
            generation_config_path=str(gen_path) if gen_path else None,
        )
        self.max_seq_len = max_seq_len
        self.chat = chat
        self.default_system_prompt = default_system_prompt
        self.truncation = truncation
        self.num_truncated = 0

        hf = self.base.tokenizer
        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special
        }
        self.bos_id: int = self.base.bos_id
        self.eos_id: int = self.base.eos_id
        pad = None
        config = self.base.config or {}
        if config.get("pad_token") is not None:
            pad_tok = config["pad_token"]
            pad = hf.token_to_id(pad_tok["content"] if isinstance(pad_tok, dict) else pad_tok)
        self.pad_id: int = self.eos_id if pad is None else pad

        if chat:
            for name, tok in (("im_start", im_start), ("im_end", im_end)):
                if tok not in self.special_tokens:
                    raise ValueError(
                        f"{name}={tok!r} is not a special token of {tok_path}; ChatML needs it "
                        "(use chat=False for plain text)"
                    )
            self.im_start_id = self.special_tokens[im_start]
            self.im_end_id = self.special_tokens[im_end]
            self._newline = self.encode("\n")
        self.end_token_id: int = self.im_end_id if chat else self.eos_id

    # ---------------------------------------------------------------- plain encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.base.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """BPE-encode ``text``. Special tokens written in the text (``<|im_end|>``) become their
        single ids, as in transformers. BOS/EOS are off by default: SmolLM2 uses neither around
        plain text (``add_bos_token`` is false in its tokenizer config)."""
        return self.base.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = False) -> str:
        """Ids back to text (byte-level BPE round-trips any string exactly)."""
        return self.base.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- conversations

    @staticmethod
    def _text(message: Message) -> str:
        if message.contains_media:
            raise ValueError(f"message with role {message.role!r} contains media; only text is supported")
        return message.text_content

    def tokenize_messages(
        self,
        messages: List[Message],
        *,
        add_end_tokens: bool = True,
        add_generation_prompt: bool = False,
        add_default_system: bool = True,
    ) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation; ``mask[i]`` is True where token ``i`` belongs to a masked
        message (torchtune's convention: masked tokens carry no training signal).

        Chat mode, turn by turn: ``<|im_start|>`` + encode(``"{role}\\n{content}"``) +
        ``<|im_end|>`` + encode(``"\\n"``) (the chat template's text, encoded between the special
        tokens exactly as transformers does), except:

        - ``add_end_tokens=True``: the last turn stops on its ``<|im_end|>`` (:attr:`end_token_id`),
          without the newline: the position a reward model reads.
        - ``add_end_tokens=False``: every turn is closed in full, ready for the next one, so
          ``tokenize_messages(a, add_end_tokens=False) + tokenize_messages(b,
          add_default_system=False) == tokenize_messages(a + b)`` for any split.
        - ``add_generation_prompt=True`` (needs ``add_end_tokens=False``) then appends
          ``<|im_start|>assistant\\n`` (masked), as ``apply_chat_template`` does.

        If ``default_system_prompt`` is set, ``add_default_system`` is True and the first message
        is not a system message, a masked system turn is put first (SmolLM2's template does so).
        Pass ``add_default_system=False`` when tokenizing the continuation of a conversation.

        Plain mode: the messages' texts, encoded one by one and concatenated, then ``eos_id`` if
        ``add_end_tokens``.

        Returns:
            (tokens, mask), two lists of equal length.

        Raises:
            ValueError: empty ``messages``, media content, ``add_generation_prompt`` together with
                ``add_end_tokens`` (or in plain mode), or a too-long sequence with
                ``truncation="error"``.
        """
        if not messages:
            raise ValueError("messages is empty; pass at least one torchtune.data.Message")
        if add_generation_prompt and (add_end_tokens or not self.chat):
            raise ValueError(
                "add_generation_prompt=True needs chat mode and add_end_tokens=False "
                "(a generation prompt opens a turn, end tokens close the sequence)"
            )
        tokens: List[int] = []
        mask: List[bool] = []

        if not self.chat:
            for m in messages:
                ids = self.encode(self._text(m))
                tokens += ids
                mask += [m.masked] * len(ids)
            if add_end_tokens:
                tokens.append(self.eos_id)
                mask.append(mask[-1] if mask else False)
            return self._truncate(tokens, mask, add_end_tokens)

        if self.default_system_prompt is not None and add_default_system and messages[0].role != "system":
            messages = [Message(role="system", content=self.default_system_prompt, masked=True)] + list(messages)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            ids = [self.im_start_id] + self.encode(f"{m.role}\n{self._text(m)}") + [self.im_end_id]
            if not (i == last and add_end_tokens):
                ids += self._newline
            tokens += ids
            mask += [m.masked] * len(ids)
        if add_generation_prompt:
            ids = [self.im_start_id] + self.encode("assistant\n")
            tokens += ids
            mask += [True] * len(ids)
        return self._truncate(tokens, mask, add_end_tokens)

    def _truncate(self, tokens: List[int], mask: List[bool], add_end_tokens: bool) -> Tuple[List[int], List[bool]]:
        if self.max_seq_len is None or len(tokens) <= self.max_seq_len:
            return tokens, mask
        if self.truncation == "error":
            raise ValueError(
                f"sequence of {len(tokens)} tokens exceeds max_seq_len={self.max_seq_len} "
                "(raise max_seq_len, filter long samples, or use truncation='right')"
            )
        self.num_truncated += 1
        tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        if add_end_tokens:
            # keep the sequence ending on the token the reward is read at
            tokens[-1] = self.end_token_id
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune transform: replaces ``sample["messages"]`` by ``"tokens"`` and ``"mask"``.

        ``inference=True``: all turns closed, then a generation prompt (``<|im_start|>assistant\\n``)
        when the last turn is not the assistant's.
        """
        sample = dict(sample)
        messages = sample.pop("messages")
        gen = inference and self.chat and messages[-1].role != "assistant"
        tokens, mask = self.tokenize_messages(
            messages, add_end_tokens=not inference, add_generation_prompt=gen
        )
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def smollm2_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    default_system_prompt: Optional[str] = SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    chat: bool = True,
    truncation: str = "right",
) -> HFChatTokenizer:
    """SmolLM2's tokenizer from a prepared checkpoint directory (``fastrm prepare smollm2``).

    Args:
        path: the checkpoint directory (or its ``tokenizer.json``).
        max_seq_len: maximum tokens per sequence (None: no limit).
        default_system_prompt: SmolLM2's template default, so that token ids equal
            ``apply_chat_template``'s (what TRL trains on); None to add no system turn.
        chat: ChatML (True) or plain text (False).
        truncation: ``"right"`` or ``"error"`` (see :class:`HFChatTokenizer`).

    Example YAML::

        tokenizer:
          _component_: fastrm.models.tokenizer.smollm2_tokenizer
          path: ~/.cache/fastrm/smollm2-135m-instruct
          max_seq_len: 1024
    """
    return HFChatTokenizer(
        path,
        max_seq_len=max_seq_len,
        chat=chat,
        default_system_prompt=default_system_prompt,
        truncation=truncation,
    )
