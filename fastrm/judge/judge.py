"""LLM-as-judge: a probability that response ``a`` beats response ``b`` for a prompt.

Two judging modes, one output type (:class:`PairJudgement`):

:class:`PairwiseJudge` ("answer A or B"). The judge model is asked twice, once per order:
order 1 shows ``(a, b)`` as ``(A, B)``, order 2 shows ``(b, a)``. Each order gives the log-odds
``z_first`` that the response shown first wins:

* from logprobs, when the backend returns them: at the first generated token that is an answer
  label, ``z_first = log P(label_1) - log P(label_2)`` over the ``top_logprobs`` alternatives
  (tokens equal after stripping whitespace are merged by log-sum-exp; a label absent from the
  top list is bounded by the smallest listed log-probability, which pulls ``p`` toward 1/2);
* otherwise from the parsed answer: with ``n_votes`` replies of which ``w`` pick the first
  position, ``p_first = (w + 1) / (n + 2)`` (Laplace; one vote gives 2/3 or 1/3).

Then ``z1 = z_first(order 1)`` and ``z2 = -z_first(order 2)`` both estimate ``logit P(a > b)``.
If they disagree in sign the pair is a *contradiction* and is dropped (counted); otherwise the
combined log-odds is their mean ``z = (z1 + z2) / 2``, which cancels an additive position bias
``b`` exactly (``z1 = z + b``, ``z2 = z - b``). :class:`JudgeStats` reports the position bias: the
fraction of first-position wins in each order (1/2 for an unbiased judge) and the mean ``b``.

Unparseable replies and failed requests are retried (``max_attempts``, at ``retry_temperature``
so a retry can answer differently), then the pair is recorded as ``failed`` with every raw
reply and error, never turned into a label.

:class:`MeanLogprobJudge` (order-independent). Each response is scored alone by its mean token
log-probability under the judge model given the prompt, ``s = (1/T) sum_t log p(y_t | x, y_<t)``;
``z = scale * (s_a - s_b)``. Both "orders" are the same computation, so it never contradicts
itself; it needs a backend with ``score`` (:class:`~fastrm.judge.local.LocalBackend`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from fastrm.judge.types import (
    Completion,
    GenerationBackend,
    GenerationRequest,
    Messages,
    SamplingParams,
    as_messages,
)

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_CONTRADICTION = "contradiction"
STATUS_TIE = "tie"
STATUS_FAILED = "failed"

DEFAULT_JUDGE_SYSTEM = "You are an impartial judge who compares two answers to a question."
DEFAULT_JUDGE_TEMPLATE = (
    "Which response answers the question better? Consider correctness, helpfulness and clarity. "
    "Do not let the order of the responses or their length influence you.\n\n"
    "[Question]\n{prompt}\n\n"
    "[Response {label_a}]\n{response_a}\n\n"
    "[Response {label_b}]\n{response_b}\n\n"
    "Reply with a single letter: {label_a} or {label_b}."
)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def render_prompt(prompt: Union[str, Sequence[Mapping[str, str]]]) -> str:
    """A prompt as judge-readable text: a string as is; chat messages as ``role: content`` lines
    (a single user message as its content)."""
    if isinstance(prompt, str):
        return prompt
    msgs = as_messages(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def parse_verdict(text: str, labels: Tuple[str, str] = ("A", "B")) -> Optional[int]:
    """Which label a free-text judge reply picks: 0 (first label), 1 (second) or ``None``.

    Accepted, in this order: ``[[A]]``; a reply that starts with a label followed by a
    non-word character (``"A"``, ``"B."``, ``"**A**"``); otherwise exactly one of the two labels
    occurring as a whole word (``"The answer is B"``). A reply naming both labels or neither is
    unparseable (``None``)."""
    la, lb = (re.escape(x) for x in labels)
    m = re.search(rf"\[\[\s*({la}|{lb})\s*\]\]", text)
    if m:
        return 0 if m.group(1) == labels[0] else 1
    m = re.match(rf"^[\s\*\"'\(\[:]*(?:answer\s*:?\s*|response\s+)?({la}|{lb})(?![\w])", text, flags=re.IGNORECASE)
    if m and m.group(1) in labels:
        return 0 if m.group(1) == labels[0] else 1
    found = set(re.findall(rf"(?<![\w])({la}|{lb})(?![\w])", text))
    if len(found) == 1:
        return 0 if found.pop() == labels[0] else 1
    return None


def label_logit(c: Completion, labels: Tuple[str, str] = ("A", "B")) -> Optional[float]:
    """``log P(label_1) - log P(label_2)`` at the first generated token that is a label, from
    the completion's ``top_logprobs``; ``None`` if no generated token is a label or the
    completion has no top-logprob lists."""
    if not c.logprobs:
        return None
    for tok in c.logprobs:
        if tok.token.strip() not in labels:
            continue
        cands = dict(tok.top)
        cands.setdefault(tok.token, tok.logprob)
        if len(cands) < 2:
            return None  # no alternatives returned: nothing to compare against
        vals = [[v for t, v in cands.items() if t.strip() == lab] for lab in labels]
        floor = min(cands.values())
        la = _logsumexp(vals[0]) if vals[0] else floor
        lb = _logsumexp(vals[1]) if vals[1] else floor
        return la - lb
    return None


@dataclass
class PairJudgement:
    """The judge's verdict on one pair ``(a, b)``.

    Attributes:
        status: ``ok`` | ``contradiction`` (the orders disagree) | ``tie`` | ``failed``.
        logit: combined log-odds that ``a`` beats ``b`` (``(z1 + z2) / 2``); None if failed.
        p: ``sigmoid(logit)``.
        logit_order1 / logit_order2: ``z1`` (a shown first), ``z2`` (b shown first), both as
            log-odds that ``a`` wins.
        source: ``logprobs``, ``parsed``, ``mixed`` (one order each) or ``mean_logprob``.
        replies: raw judge replies per order (all attempts).
        errors: request errors and unparseable-reply notes.
        attempts: requests made for this pair.
        scores: ``(s_a, s_b)`` in mean-logprob mode.
    """

    status: str
    logit: Optional[float] = None
    logit_order1: Optional[float] = None
    logit_order2: Optional[float] = None
    source: Optional[str] = None
    replies: List[List[str]] = field(default_factory=lambda: [[], []])
    errors: List[str] = field(default_factory=list)
    attempts: int = 0
    scores: Optional[Tuple[float, float]] = None

    @property
    def p(self) -> Optional[float]:
        return None if self.logit is None else _sigmoid(self.logit)

    @property
    def p_order1(self) -> Optional[float]:
        return None if self.logit_order1 is None else _sigmoid(self.logit_order1)

    @property
    def p_order2(self) -> Optional[float]:
        return None if self.logit_order2 is None else _sigmoid(self.logit_order2)


def combine_orders(z1: float, z2: float) -> Tuple[str, float]:
    """``(status, logit)`` from the two orders' log-odds that ``a`` wins (see module doc)."""
    if z1 == 0 and z2 == 0:
        return STATUS_TIE, 0.0
    if z1 * z2 <= 0:
        return STATUS_CONTRADICTION, 0.5 * (z1 + z2)
    return STATUS_OK, 0.5 * (z1 + z2)


@dataclass
class JudgeStats:
    """Running counts over judged pairs, with position-bias measurements.

    ``first_win_rate_order1`` is the fraction of pairs where the response shown first won in
    order 1 (``z1 > 0``), ``first_win_rate_order2`` the same in order 2 (``z2 < 0``); an
    unbiased judge gives about 1/2 on both. ``position_bias_logit`` is the mean of
    ``(z1 - z2) / 2``, the judge's additive preference (log-odds) for the first position.
    """

    pairs: int = 0
    ok: int = 0
    contradictions: int = 0
    ties: int = 0
    failures: int = 0
    requests: int = 0
    from_logprobs: int = 0
    from_parsed: int = 0
    _first1: int = 0
    _first2: int = 0
    _read: int = 0
    _bias_sum: float = 0.0

    def add(self, js: Sequence[PairJudgement]) -> None:
        for j in js:
            self.pairs += 1
            self.requests += j.attempts
            if j.status == STATUS_FAILED:
                self.failures += 1
                continue
            self.ok += j.status == STATUS_OK
            self.contradictions += j.status == STATUS_CONTRADICTION
            self.ties += j.status == STATUS_TIE
            self.from_logprobs += j.source == "logprobs"
            self.from_parsed += j.source == "parsed"
            if j.source != "mean_logprob" and j.logit_order1 is not None and j.logit_order2 is not None:
                self._read += 1
                self._first1 += j.logit_order1 > 0
                self._first2 += j.logit_order2 < 0
                self._bias_sum += 0.5 * (j.logit_order1 - j.logit_order2)

    def as_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        decided = self.ok + self.contradictions
        d["contradiction_rate"] = self.contradictions / decided if decided else None
        d["first_win_rate_order1"] = self._first1 / self._read if self._read else None
        d["first_win_rate_order2"] = self._first2 / self._read if self._read else None
        d["first_win_rate"] = (self._first1 + self._first2) / (2 * self._read) if self._read else None
        d["position_bias_logit"] = self._bias_sum / self._read if self._read else None
        return d


def _seed(*parts: Any) -> int:
    h = hashlib.blake2b("#".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**31 - 1)


@dataclass
class _Slot:
    """One order of one pair while it is being judged."""

    logit_first: Optional[float] = None  # from logprobs
    votes: List[int] = field(default_factory=list)  # parsed: 1 = first position won
    requests: int = 0


class PairwiseJudge:
    """Ask a judge model "A or B?" in both orders (see module docstring for the formulas).

    Args:
        backend: any generation backend (local or HTTP).
        name: judge name recorded in the output (default: the backend's name).
        template: user message with ``{prompt}``, ``{response_a}``, ``{response_b}``,
            ``{label_a}``, ``{label_b}`` placeholders.
        system_prompt: system message (None: none).
        labels: the two answer labels.
        use_logprobs: read answer-token probabilities when the backend returns logprobs
            (``supports_logprobs``); False: always parse the answer.
        top_logprobs: alternatives requested per position (OpenAI allows at most 20).
        max_new_tokens: reply length; a few tokens suffice for "A"/"B".
        temperature: sampling temperature of the first attempt (0: greedy).
        n_votes: parsed replies per order when logprobs are not used (needs temperature > 0
            if > 1, or every vote would be the same).
        max_attempts: attempts per order (first try + retries) before the pair fails.
        retry_temperature: temperature of retries (at least ``temperature``).
        seed: base seed of the judge's requests (each request's seed hashes the pair, order,
            attempt and vote).
    """

    def __init__(
        self,
        backend: GenerationBackend,
        *,
        name: Optional[str] = None,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        system_prompt: Optional[str] = DEFAULT_JUDGE_SYSTEM,
        labels: Sequence[str] = ("A", "B"),
        use_logprobs: bool = True,
        top_logprobs: int = 20,
        max_new_tokens: int = 8,
        temperature: float = 0.0,
        n_votes: int = 1,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
        seed: int = 0,
    ) -> None:
        labels = tuple(labels)
        if len(labels) != 2 or labels[0] == labels[1] or not all(isinstance(x, str) and x.strip() == x and x for x in labels):
            raise ValueError(f"labels must be two distinct non-empty strings without spaces, got {labels}")
        for ph in ("{prompt}", "{response_a}", "{response_b}"):
            if ph not in template:
                raise ValueError(f"judge template must contain {ph}")
        if n_votes < 1:
            raise ValueError(f"n_votes must be >= 1, got {n_votes}")
        if n_votes > 1 and temperature == 0:
            raise ValueError("n_votes > 1 needs temperature > 0 (greedy votes are all identical)")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        from fastrm.judge.local import _maybe_instantiate

        backend = _maybe_instantiate(backend)  # a nested config node (PreferenceTransform in a dataset config)
        self.backend = backend
        self.name = name or getattr(backend, "name", "judge")
        self.template = template
        self.system_prompt = system_prompt
        self.labels: Tuple[str, str] = labels  # type: ignore[assignment]
        self.use_logprobs = bool(use_logprobs and getattr(backend, "supports_logprobs", False))
        self.n_votes = 1 if self.use_logprobs else n_votes
        self.max_attempts = max_attempts
        self.seed = seed
        lp = dict(logprobs=True, top_logprobs=top_logprobs) if self.use_logprobs else {}
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, **lp)
        self.retry_params = SamplingParams(
            temperature=max(temperature, retry_temperature), max_new_tokens=max_new_tokens, **lp
        )
        self.stats = JudgeStats()

    def messages(self, prompt: Any, first: str, second: str) -> Messages:
        """The judge conversation showing ``first`` as label 1 and ``second`` as label 2."""
        user = self.template.format(
            prompt=render_prompt(prompt), response_a=first, response_b=second,
            label_a=self.labels[0], label_b=self.labels[1],
        )
        msgs: Messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def judge(self, pairs: Sequence[Mapping[str, Any]]) -> List[PairJudgement]:
        """Judge ``pairs`` (``{prompt, response_a, response_b}``, optional ``pair_id``) in both
        orders; all requests of one round go to the backend together (one batch / concurrent)."""
        n = len(pairs)
        slots = [[_Slot(), _Slot()] for _ in range(n)]
        out = [PairJudgement(status=STATUS_FAILED) for _ in range(n)]
        convs = []
        for p in pairs:
            for f in ("prompt", "response_a", "response_b"):
                if f not in p:
                    raise ValueError(f"judge input row has no field {f!r} (fields: {sorted(p)})")
            convs.append((self.messages(p["prompt"], p["response_a"], p["response_b"]),
                          self.messages(p["prompt"], p["response_b"], p["response_a"])))

        def done(s: _Slot) -> bool:
            return s.logit_first is not None or len(s.votes) >= self.n_votes

        for attempt in range(self.max_attempts):
            params = self.params if attempt == 0 else self.retry_params
            reqs, where = [], []
            for i in range(n):
                for o in (0, 1):
                    s = slots[i][o]
                    if done(s):
                        continue
                    need = 1 if self.use_logprobs else self.n_votes - len(s.votes)
                    for v in range(need):
                        key = pairs[i].get("pair_id", i)
                        reqs.append(GenerationRequest(convs[i][o], params, _seed(self.seed, key, o, attempt, len(s.votes) + v)))
                        where.append((i, o))
            if not reqs:
                break
            comps = self.backend.generate(reqs)
            for (i, o), c in zip(where, comps):
                s, j = slots[i][o], out[i]
                s.requests += 1
                j.attempts += 1
                if not c.ok:
                    j.errors.append(f"order {o + 1}, attempt {attempt + 1}: request failed: {c.error}")
                    continue
                j.replies[o].append(c.text or "")
                if done(s):
                    continue
                if self.use_logprobs:
                    z = label_logit(c, self.labels)
                    if z is not None:
                        s.logit_first = z
                        continue
                v = parse_verdict(c.text or "", self.labels)
                if v is None:
                    j.errors.append(f"order {o + 1}, attempt {attempt + 1}: unparseable reply {c.text!r}")
                else:
                    s.votes.append(1 - v)
        for i in range(n):
            zs, srcs = [], []
            for o in (0, 1):
                s = slots[i][o]
                if s.logit_first is not None:
                    zs.append(s.logit_first)
                    srcs.append("logprobs")
                elif s.votes:
                    w = sum(s.votes)
                    zs.append(_logit((w + 1) / (len(s.votes) + 2)))
                    srcs.append("parsed")
            j = out[i]
            if len(zs) < 2:
                j.status = STATUS_FAILED
                continue
            j.logit_order1, j.logit_order2 = zs[0], -zs[1]
            j.status, j.logit = combine_orders(j.logit_order1, j.logit_order2)
            j.source = srcs[0] if srcs[0] == srcs[1] else "mixed"
        self.stats.add(out)
        return out


class MeanLogprobJudge:
    """Order-independent judge: ``z = scale * (s_a - s_b)`` with ``s`` the mean token
    log-probability of a response given the prompt under the judge model.

    Args:
        backend: a backend with ``score(items) -> [(sum_logprob, num_tokens)]``
            (:class:`~fastrm.judge.local.LocalBackend`).
        name: judge name recorded in the output.
        system_prompt: system message put before the prompt (None: none).
        scale: multiplies the mean-logprob difference to give log-odds (1: one nat of mean
            log-probability = one unit of log-odds).
        length_normalize: mean (True) or sum (False) of the token log-probabilities.
    """

    def __init__(
        self,
        backend: Any,
        *,
        name: Optional[str] = None,
        system_prompt: Optional[str] = None,
        scale: float = 1.0,
        length_normalize: bool = True,
    ) -> None:
        from fastrm.judge.local import _maybe_instantiate

        backend = _maybe_instantiate(backend)
        if not callable(getattr(backend, "score", None)):
            raise ValueError(
                f"MeanLogprobJudge needs a backend with score() (a LocalBackend); {type(backend).__name__} "
                "has none (chat-completion servers do not return prompt log-probabilities)"
            )
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.backend = backend
        self.name = name or getattr(backend, "name", "judge")
        self.system_prompt = system_prompt
        self.scale = scale
        self.length_normalize = length_normalize
        self.stats = JudgeStats()

    def _score_all(self, items: List[Tuple[Messages, str]]) -> List[Union[Tuple[float, int], str]]:
        try:
            return list(self.backend.score(items))
        except ValueError:
            # one bad item (empty / too long): score one by one to isolate it
            res: List[Union[Tuple[float, int], str]] = []
            for it in items:
                try:
                    res.append(self.backend.score([it])[0])
                except ValueError as e:
                    res.append(str(e))
            return res

    def judge(self, pairs: Sequence[Mapping[str, Any]]) -> List[PairJudgement]:
        items: List[Tuple[Messages, str]] = []
        for p in pairs:
            msgs = as_messages(p["prompt"], self.system_prompt)
            items += [(msgs, p["response_a"]), (msgs, p["response_b"])]
        scored = self._score_all(items)
        out = []
        for i in range(len(pairs)):
            ra, rb = scored[2 * i], scored[2 * i + 1]
            j = PairJudgement(status=STATUS_FAILED, attempts=2, source="mean_logprob")
            bad = [r for r in (ra, rb) if isinstance(r, str)]
            if bad:
                j.errors = bad  # type: ignore[assignment]
                out.append(j)
                continue
            sa = ra[0] / ra[1] if self.length_normalize else ra[0]  # type: ignore[index]
            sb = rb[0] / rb[1] if self.length_normalize else rb[0]  # type: ignore[index]
            z = self.scale * (sa - sb)
            j.scores = (sa, sb)
            j.logit_order1 = j.logit_order2 = z
            j.status, j.logit = (STATUS_TIE, 0.0) if z == 0 else (STATUS_OK, z)
            out.append(j)
        self.stats.add(out)
        return out
