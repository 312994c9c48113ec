"""A torchtune ``ModelTokenizer`` over any HF model directory, with the model's own chat template.

Token-id convention (the ecosystem's: TRL, OpenRLHF, vLLM, RewardBench)
    A conversation's tokens are ``apply_chat_template(messages, tokenize=True)``'s: the model's
    chat template (:class:`~fastrm.models.tokenizer_files.TokenizerFiles`) rendered as
    transformers renders it (:mod:`fastrm.models.chat_template`), no generation prompt, then
    ``tokenizer.json`` encodes the text with ``add_special_tokens=False`` (the template writes
    its own BOS; special tokens in the text become their ids). The reward is read at the **last
    token** of that sequence (SmolLM2 / Qwen2.5: the ``\\n`` after ``<|im_end|>``; Llama 3.x:
    ``<|eot_id|>``), which is where an HF ``*ForSequenceClassification`` model reads it (the
    rightmost token that is not ``pad_token_id``) as long as the pad token differs from it.

Plain mode (a model without a chat template, or ``chat=False``)
    The message texts are concatenated, ``eos_token`` is appended as text unless the text
    already ends with it, and ``tokenizer.json`` encodes the result *with* its post-processor
    (``add_special_tokens=True``: e.g. Llama's BOS), exactly what TRL's ``RewardTrainer`` does
    for non-conversational rows (``tokenizer(prompt + chosen + eos_token)``). The reward is read
    at that final EOS, so an empty response still has a token to score.

Prefix sharing (fastrm's datasets)
    ``tokenize_messages(prompt, add_generation_prompt=True)`` is the prompt as a generation
    prompt (``...<|im_start|>assistant\\n``; plain mode: the prompt text without EOS). The
    datasets take the longest common prefix of it and of the full conversations' tokens as
    ``prompt_tokens`` (:func:`fastrm.data.dataset.tokenize_group`), so ``prompt_tokens +
    responses[k]`` is always this tokenizer's sequence for response ``k``, token for token.
"""

from __future__ import annotations

import bisect
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tokenizers import Tokenizer
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from fastrm.models.chat_template import ChatTemplate, message_to_dict
from fastrm.models.tokenizer_files import TokenizerFiles

__all__ = ["HFChatTokenizer", "SMOLLM2_DEFAULT_SYSTEM_PROMPT", "hf_tokenizer", "smollm2_tokenizer"]

log = logging.getLogger(__name__)

#: The system turn SmolLM2's chat template inserts when a conversation does not start with one.
SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TRUNCATION = ("right", "error")
_PROBE = "fastrm probe 7f3a"  # a response text to find where a template closes a turn


def _looks_like_template(s: str) -> bool:
    return "{{" in s or "{%" in s


class HFChatTokenizer(ModelTokenizer, Transform):
    """torchtune ``ModelTokenizer`` over an HF model directory (see the module docstring).

    Args:
        path: the model directory (``tokenizer.json``, ``tokenizer_config.json`` and the optional
            ``chat_template.jinja``, ``special_tokens_map.json``, ``generation_config.json``) or
            its ``tokenizer.json``.
        max_seq_len: bound on sequences returned by :meth:`tokenize_messages` (None: no bound).
            fastrm's datasets apply their own length policy: leave it None there.
        chat: True: use the chat template (error if the directory has none); False: plain mode;
            None (default): the chat template if the directory has one, else plain mode.
        chat_template: the name of one of the directory's templates (``"default"``,
            ``"tool_use"``...) or a Jinja template string to use instead; None: the directory's
            default.
        template_kwargs: extra template variables, as keyword arguments of
            ``apply_chat_template`` (``{"enable_thinking": False}``, ``{"date_string": ...}``).
        truncation: over ``max_seq_len``: ``"right"`` keeps the first tokens and the sequence's
            closing tokens (the end of the last turn, or the generation prompt), so the reward
            token stays last; counted in :attr:`num_truncated`. ``"error"`` raises ValueError.

    Attributes:
        files (TokenizerFiles): what was read from the directory.
        chat (bool): chat-template mode (else plain mode).
        special_tokens (Dict[str, int]): every special added token -> id.
        bos_id, eos_id (Optional[int]): from the named tokens of ``tokenizer_config.json``, else
            ``generation_config.json``; ``bos_id`` is None for models without one (Qwen2.5).
        pad_id (int): the pad token, else ``eos_id`` (fastrm packs rows and never pads; the
            checkpoint export picks a pad that differs from the reward token).
        end_token_id (Optional[int]): the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``;
            ``eos_id`` in plain mode): generation stops there.
        stop_tokens (List[int]): ``end_token_id``, ``eos_id`` and ``generation_config``'s EOS ids.
        num_truncated (int): sequences cut to ``max_seq_len`` so far.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        max_seq_len: Optional[int] = None,
        chat: Optional[bool] = None,
        chat_template: Optional[str] = None,
        template_kwargs: Optional[Mapping[str, Any]] = None,
        truncation: str = "right",
    ) -> None:
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}; must be >= 2 or None")
        if truncation not in _TRUNCATION:
            raise ValueError(f"truncation={truncation!r}; choose one of {_TRUNCATION}")
        self.files = TokenizerFiles.read(path)
        self._tok = Tokenizer.from_file(str(self.files.tokenizer_json))
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.num_truncated = 0

        if chat_template is not None and _looks_like_template(chat_template):
            source: Optional[str] = chat_template
        else:
            source = self.files.chat_template(chat_template)
        if chat is None:
            chat = source is not None
            if not chat:
                log.info("%s has no chat template: plain mode (texts concatenated, then EOS)",
                         self.files.directory)
        if chat and source is None:
            raise ValueError(f"chat=True but {self.files.directory} has no chat template (no "
                             "chat_template in tokenizer_config.json, no chat_template.jinja); pass "
                             "chat_template='<jinja text>' or chat=False for plain text")
        if not chat and template_kwargs:
            raise ValueError("template_kwargs needs chat mode (plain mode renders no template)")
        self.chat = bool(chat)
        self.template = ChatTemplate(source, self.files.special_tokens, template_kwargs) if self.chat else None

        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._added_ids = set(self._tok.get_added_tokens_decoder())
        named = self.files.special_tokens
        gen = self.files.generation_config
        self.bos_id: Optional[int] = self._id_of(named.get("bos_token"), gen.get("bos_token_id"))
        eos_fallback = (self.files.generation_eos_ids() or [None])[0]
        self.eos_id: Optional[int] = self._id_of(named.get("eos_token"), eos_fallback)
        pad = self._id_of(named.get("pad_token"), gen.get("pad_token_id"))
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.eos_token: Optional[str] = named.get("eos_token")
        if self.eos_token is None and self.eos_id is not None:
            self.eos_token = self._tok.id_to_token(self.eos_id)
        if not self.chat and self.eos_token is None:
            raise ValueError(f"plain mode reads the reward at the EOS token, but {self.files.directory} "
                             "names none (eos_token in tokenizer_config.json or eos_token_id in "
                             "generation_config.json)")
        self._end_ids, self._gen_ids = self._closing_tokens()
        self._warn_if_transformers_differs()
        added_end = [i for i in self._end_ids if i in self._added_ids]
        self.end_token_id: Optional[int] = added_end[0] if added_end else self.eos_id
        stops = {self.end_token_id, self.eos_id, *self.files.generation_eos_ids()}
        self.stop_tokens: List[int] = sorted(i for i in stops if i is not None)

    def _warn_if_transformers_differs(self) -> None:
        """transformers 5 rebuilds the pipeline of model-specific tokenizer classes instead of
        loading ``tokenizer.json`` as it is; ``GPT2Tokenizer`` keeps only a ``ByteLevel``
        pre-tokenizer, so a ``tokenizer.json`` with more steps (SmolLM2's ``Digits``) tokenizes
        differently there. fastrm follows ``tokenizer.json`` (what the model was trained with)."""
        if self.files.config.get("tokenizer_class") != "GPT2Tokenizer":
            return
        pre = self._tok.pre_tokenizer
        if pre is not None and type(pre).__name__ != "ByteLevel":
            log.warning(
                "%s declares tokenizer_class GPT2Tokenizer, but its tokenizer.json pre-tokenizer is "
                "%s: transformers 5's AutoTokenizer replaces it by ByteLevel and will tokenize some "
                "texts differently from fastrm (which follows tokenizer.json); set tokenizer_class "
                "to PreTrainedTokenizerFast in tokenizer_config.json to make them agree",
                self.files.directory, type(pre).__name__)

    def _id_of(self, token: Optional[str], fallback: Any) -> Optional[int]:
        if token is not None:
            i = self._tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{self.files.directory}: special token {token!r} is not in the "
                                 "vocabulary of tokenizer.json")
            return int(i)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return None if fallback is None else int(fallback)

    def _closing_tokens(self) -> Tuple[List[int], List[int]]:
        """Token ids a full conversation ends with after the last message's text (``<|im_end|>\\n``)
        and those of the generation prompt (``<|im_start|>assistant\\n``), from a probe
        conversation; ``[]`` when the template refuses the probe."""
        if not self.chat:
            return self._tok.encode(self.eos_token, add_special_tokens=False).ids, []
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
        try:
            full = self.template.render(probe)
            base = self.template.render(probe[:1])
            gen = self.template.render(probe[:1], add_generation_prompt=True)
        except ValueError:
            return [], []
        at = full.rfind(_PROBE)
        end_text = full[at + len(_PROBE):] if at >= 0 else ""
        gen_text = gen[len(base):] if gen.startswith(base) else ""
        enc = lambda s: self._tok.encode(s, add_special_tokens=False).ids if s else []  # noqa: E731
        return enc(end_text), enc(gen_text)

    # ---------------------------------------------------------------- plain encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """``tokenizer.json``'s encoding of ``text`` without its post-processor; special tokens
        written in the text become their ids (as in transformers). BOS/EOS only when asked."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but {self.files.directory} has no BOS token")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise ValueError(f"add_eos=True but {self.files.directory} has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def encode_rendered(self, text: str) -> List[int]:
        """Tokens of an already rendered conversation (``render(messages)``'s text, e.g. what
        OpenRLHF's remote reward client sends): :meth:`tokenize_messages`'s tokens for the
        conversation that renders to ``text``. Chat mode: the text encoded as it is; plain
        mode: ``eos_token`` appended unless present, with the post-processor (BOS)."""
        if self.chat:
            return self._tok.encode(text, add_special_tokens=False).ids
        if not text.endswith(self.eos_token):
            text += self.eos_token
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids back to text."""
        return self._tok.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- conversations

    @staticmethod
    def _dicts(messages: Sequence[Any]) -> List[dict]:
        """Messages as the plain dicts a template sees; text content only."""
        if not messages:
            raise ValueError("messages is empty; pass at least one message")
        out = [message_to_dict(m) for m in messages]
        for d in out:
            if not isinstance(d.get("content", ""), str):
                raise ValueError(f"message with role {d.get('role')!r}: content must be text, got "
                                 f"{type(d['content']).__name__}")
        return out

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
        """The text that is tokenized: the chat template's rendering (``apply_chat_template(...,
        tokenize=False)``), or in plain mode the concatenated texts (+ ``eos_token`` unless
        ``add_generation_prompt``)."""
        return self._render(self._dicts(messages), add_generation_prompt)

    def _render(self, dicts: List[dict], add_generation_prompt: bool) -> str:
        if self.chat:
            return self.template.render(dicts, add_generation_prompt=add_generation_prompt)
        text = "".join(d.get("content", "") for d in dicts)
        if not add_generation_prompt and not text.endswith(self.eos_token):
            text += self.eos_token
        return text

    def tokenize_messages(
        self, messages: Sequence[Any], *, add_generation_prompt: bool = False
    ) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation (torchtune ``Message`` objects or ``{"role", "content"}`` dicts).

        Returns ``(tokens, mask)``: ``tokens`` as in the module docstring (the reward is read at
        ``tokens[-1]``); ``mask[i]`` is True where token ``i`` belongs to a masked message
        (torchtune's convention), the generation prompt is masked. A token is assigned to the
        message whose text it starts in (the boundaries come from rendering each prefix of the
        conversation; when a template cannot render a prefix alone, every token takes the last
        message's mask).

        Args:
            messages: the conversation.
            add_generation_prompt: end with the template's generation prompt (the next turn
                opened for the assistant) instead of a closed conversation; plain mode: no EOS.

        Raises:
            ValueError: empty ``messages``, non-text content, a template error, or a too-long
                sequence with ``truncation="error"``.
        """
        dicts = self._dicts(messages)
        text = self._render(dicts, add_generation_prompt)
        enc = self._tok.encode(text, add_special_tokens=not self.chat)
        tokens = list(enc.ids)
        flags = [bool(m.get("masked", False) if isinstance(m, Mapping) else getattr(m, "masked", False))
                 for m in messages]
        mask = self._mask(dicts, flags, text, tokens, enc.offsets, add_generation_prompt)
        return self._truncate(tokens, mask, add_generation_prompt)

    def _mask(self, dicts: List[dict], flags: List[bool], text: str, tokens: List[int],
              offsets: Sequence[Tuple[int, int]], add_generation_prompt: bool) -> List[bool]:
        if len(set(flags)) == 1:
            if not add_generation_prompt:
                return [flags[0]] * len(tokens)
            g = len(self._gen_ids)
            if g and tokens[-g:] == self._gen_ids:  # the generation prompt is masked
                return [flags[0]] * (len(tokens) - g) + [True] * g
        ends = self._message_ends(dicts, text, add_generation_prompt)
        if ends is None:
            return [flags[-1]] * len(offsets)
        out = []
        for start, _ in offsets:
            k = bisect.bisect_right(ends, start)
            out.append(flags[k] if k < len(flags) else True)  # past the last message: generation prompt
        return out

    def _message_ends(self, messages: List[dict], text: str,
                      add_generation_prompt: bool) -> Optional[List[int]]:
        """Character offset in ``text`` where each message's rendering ends."""
        if not self.chat:
            ends, n = [], 0
            for d in messages:
                n += len(d.get("content", ""))
                ends.append(n)
            if not add_generation_prompt:
                ends[-1] = len(text)  # the EOS closes the last message
            return ends
        ends = []
        last = len(messages) if add_generation_prompt else len(messages) - 1
        for i in range(last):
            try:
                part = self.template.render(messages[: i + 1])
            except ValueError:
                return None
            ends.append(len(os.path.commonprefix([part, text])))
        if not add_generation_prompt:
            ends.append(len(text))
        return ends

    def _truncate(self, tokens: List[int], mask: List[bool],
                  add_generation_prompt: bool) -> Tuple[List[int], List[bool]]:
        L = self.max_seq_len
        if L is None or len(tokens) <= L:
            return tokens, mask
        if self.truncation == "error":
            raise ValueError(f"sequence of {len(tokens)} tokens exceeds max_seq_len={L} (raise "
                             "max_seq_len, filter long samples, or use truncation='right')")
        self.num_truncated += 1
        tail = self._gen_ids if add_generation_prompt else self._end_ids
        k = len(tail) if tail and len(tail) < L and tokens[-len(tail):] == tail else 1
        return tokens[: L - k] + tokens[-k:], mask[: L - k] + mask[-k:]

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune transform: replaces ``sample["messages"]`` by ``"tokens"`` and ``"mask"``.

        ``inference=True`` with a conversation not ending on an assistant turn: the generation
        prompt is appended (the model's turn is opened).
        """
        sample = dict(sample)
        messages = sample.pop("messages")
        last = message_to_dict(messages[-1]).get("role") if messages else None
        tokens, mask = self.tokenize_messages(
            messages, add_generation_prompt=inference and last != "assistant")
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def hf_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    chat: Optional[bool] = None,
    chat_template: Optional[str] = None,
    template_kwargs: Optional[Mapping[str, Any]] = None,
    truncation: str = "right",
) -> HFChatTokenizer:
    """The tokenizer of any HF model directory (YAML builder of :class:`HFChatTokenizer`).

    Example YAML::

        tokenizer:
          _component_: fastrm.models.tokenizer.hf_tokenizer
          path: /models/Qwen2.5-0.5B-Instruct
    """
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        from omegaconf import OmegaConf  # a YAML mapping arrives as a DictConfig
        template_kwargs = OmegaConf.to_container(template_kwargs, resolve=True)
    return HFChatTokenizer(path, max_seq_len=max_seq_len, chat=chat, chat_template=chat_template,
                           template_kwargs=template_kwargs, truncation=truncation)


def smollm2_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    chat: bool = True,
    truncation: str = "right",
) -> HFChatTokenizer:
    """SmolLM2's tokenizer from a prepared checkpoint directory (``fastrm prepare smollm2``; its
    ``tokenizer_config.json`` carries SmolLM2's chat template from the GGUF).

    Args:
        path: the checkpoint directory (or its ``tokenizer.json``).
        max_seq_len: maximum tokens per sequence (None: no limit).
        chat: the chat template (True) or plain text (False).
        truncation: ``"right"`` or ``"error"`` (see :class:`HFChatTokenizer`).

    Example YAML::

        tokenizer:
          _component_: fastrm.models.tokenizer.smollm2_tokenizer
          path: ~/.cache/fastrm/smollm2-135m-instruct
    """
    return HFChatTokenizer(path, max_seq_len=max_seq_len, chat=chat, truncation=truncation)
