"""Plain data types shared by the generation backends, the generation driver and the judge.

A backend turns a list of :class:`GenerationRequest` (chat messages + :class:`SamplingParams` +
a per-request seed) into one :class:`Completion` per request, in order. The two backends are
:class:`~fastrm.judge.local.LocalBackend` (a torchtune decoder in this process) and
:class:`~fastrm.judge.openai_compat.OpenAIBackend` (any OpenAI-compatible HTTP server).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

# A chat prompt: OpenAI-style messages ``[{"role": "user", "content": "..."}]``.
Messages = List[Dict[str, str]]

FINISH_STOP = "stop"  # a stop token / stop string ended the response
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ERROR = "error"  # the request failed (see ``Completion.error``); no response text


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one model entry (the fields every OpenAI-compatible server knows).

    Args:
        temperature (float): softmax temperature; ``0`` means greedy decoding.
        top_p (float): nucleus sampling: keep the smallest set of tokens whose probability mass
            is ``>= top_p`` (``1.0`` disables it).
        top_k (Optional[int]): keep only the ``top_k`` most likely tokens (``None`` disables it;
            sent to HTTP servers as the non-standard ``top_k`` field that vLLM, SGLang, TGI and
            llama.cpp accept).
        max_new_tokens (int): most tokens generated per response.
        n (int): responses per prompt (the generation driver issues ``n`` requests with seeds
            ``seed_for(prompt_id, model, i)``, so each sample is resumable on its own).
        seed (int): base seed from which every row's seed is derived.
        logprobs (bool): return the log-probability of each generated token.
        top_logprobs (int): also return the ``top_logprobs`` most likely alternatives at each
            position (``0``: none).
        stop (Sequence[str]): stop strings; the response ends before the first one (both
            backends also stop on the model's end-of-turn token).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling.temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be >= 1 or null, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.top_logprobs < 0:
            raise ValueError(f"sampling.top_logprobs must be >= 0, got {self.top_logprobs}")
        # OmegaConf lists arrive as ListConfig; store a plain tuple so the dataclass stays hashable.
        object.__setattr__(self, "stop", tuple(self.stop or ()))

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "SamplingParams":
        """Build from a config mapping, rejecting unknown keys with a clear message."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class GenerationRequest:
    """One response to produce: ``messages`` sampled with ``params``; ``seed`` makes it reproducible."""

    messages: Messages
    params: SamplingParams
    seed: Optional[int] = None


@dataclass
class TokenLogprob:
    """One generated token: its text, its log-probability under the model (raw distribution,
    before temperature / top-k / top-p), and the ``top`` alternatives ``{token_text: logprob}``."""

    token: str
    logprob: float
    top: Dict[str, float] = field(default_factory=dict)


@dataclass
class Completion:
    """The result of one :class:`GenerationRequest`.

    ``text`` is ``None`` exactly when ``finish_reason == "error"``; ``error`` then says why.
    ``num_tokens`` counts generated tokens (the stop token included, as ``usage.completion_tokens``
    does). ``logprobs`` is filled when the request asked for it and the backend provides it.
    """

    text: Optional[str]
    finish_reason: str
    num_tokens: int = 0
    logprobs: Optional[List[TokenLogprob]] = None
    error: Optional[str] = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.finish_reason != FINISH_ERROR


@runtime_checkable
class GenerationBackend(Protocol):
    """What the generation driver and the judge need from a backend."""

    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Completion]:
        """Return one :class:`Completion` per request, in order. Must not raise for a failed
        request: failures come back as ``finish_reason="error"`` completions."""
        ...


def as_messages(prompt: Union[str, Sequence[Mapping[str, str]]], system: Optional[str] = None) -> Messages:
    """Normalise a prompt (a string or a list of ``{"role", "content"}`` dicts) to messages."""
    if isinstance(prompt, str):
        msgs: Messages = [{"role": "user", "content": prompt}]
    else:
        msgs = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(
                    f"prompt message {i} must be a mapping with 'role' and 'content', got {m!r}"
                )
            msgs.append({"role": str(m["role"]), "content": str(m["content"])})
        if not msgs:
            raise ValueError("prompt is an empty message list; give at least one user message")
    if system is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs
