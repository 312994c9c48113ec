"""OpenAI-compatible HTTP backend (vLLM, SGLang, TGI, llama.cpp server, ``transformers serve``).

One ``POST {base_url}/chat/completions`` per response, ``max_concurrency`` requests in flight
(a thread pool: the work is waiting on sockets), a timeout per request, and retries with
exponential backoff and jitter on connection errors, timeouts, HTTP 408/409/429/5xx and
malformed replies (``Retry-After`` is honoured). A request that still fails comes back as a
``finish_reason="error"`` :class:`~fastrm.judge.types.Completion` carrying the last error;
it never raises, so one bad row never stops a long run, and never becomes a fake response.

Only the standard library is used (``urllib``), so no extra dependency is needed to scale a
generation run to a fleet of servers: start one server per machine and one backend per server.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fastrm.judge.types import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    GenerationRequest,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPStatusError(RuntimeError):
    """A non-2xx reply; ``retryable`` says whether a retry can help."""

    def __init__(self, status: int, body: str, retry_after: Optional[float] = None) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.retryable = status in _RETRY_STATUS
        self.retry_after = retry_after


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server.

    Args:
        base_url (str): server root including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``.
        model (str): the ``model`` field of each request (the served model's name or path).
        name (Optional[str]): name written into output rows (default: ``model``).
        api_key (Optional[str]): bearer token; default ``$OPENAI_API_KEY`` if set, else none.
        max_concurrency (int): requests in flight at once.
        timeout_s (float): per-request socket timeout in seconds.
        max_retries (int): retries after the first attempt (so ``max_retries + 1`` attempts).
        backoff_s (float): first backoff; attempt ``k`` waits ``backoff_s * 2**k`` (capped at
            ``max_backoff_s``) times a jitter in ``[0.5, 1.5)``.
        max_backoff_s (float): backoff cap.
        send_top_k (bool): send ``top_k`` when set (vLLM/SGLang/TGI/llama.cpp accept it; the
            OpenAI API rejects it).
        send_seed (bool): send the per-request ``seed`` (reproducible sampling where supported).
        extra_body (Optional[Mapping]): merged into every request body (server-specific knobs).
        supports_logprobs (bool): whether the server returns ``logprobs``/``top_logprobs``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        name: Optional[str] = None,
        api_key: Optional[str] = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        send_top_k: bool = True,
        send_seed: bool = True,
        extra_body: Optional[Mapping[str, Any]] = None,
        supports_logprobs: bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.send_top_k = send_top_k
        self.send_seed = send_seed
        self.extra_body = dict(extra_body or {})
        self.supports_logprobs = supports_logprobs
        self._lock = threading.Lock()
        self.num_retries = 0  # total retries over this backend's life (reported by the driver)

    # ------------------------------------------------------------------ request plumbing
    def _body(self, r: GenerationRequest) -> Dict[str, Any]:
        p = r.params
        body: Dict[str, Any] = {
            "model": self.model,
            "messages": r.messages,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens,
            "n": 1,
            "stream": False,
        }
        if p.top_k is not None and self.send_top_k:
            body["top_k"] = p.top_k
        if self.send_seed and r.seed is not None:
            body["seed"] = int(r.seed) % (2**31)
        if p.stop:
            body["stop"] = list(p.stop)
        if self.supports_logprobs and (p.logprobs or p.top_logprobs > 0):
            body["logprobs"] = True
            if p.top_logprobs > 0:
                body["top_logprobs"] = p.top_logprobs
        body.update(self.extra_body)
        return body

    def _post(self, path: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace") if e.fp else ""
            ra = e.headers.get("Retry-After") if e.headers else None
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            raise HTTPStatusError(e.code, text, retry_after) from None
        return json.loads(raw.decode("utf-8"))

    @staticmethod
    def _parse(reply: Mapping[str, Any]) -> Completion:
        """Turn a chat-completions reply into a Completion; raise ``ValueError`` if malformed."""
        try:
            choice = reply["choices"][0]
            msg = choice["message"]
            text = msg.get("content")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed chat completion (no choices[0].message): {str(reply)[:300]}") from e
        if text is None:
            raise ValueError(f"chat completion has no message content: {str(reply)[:300]}")
        fr = choice.get("finish_reason") or FINISH_STOP
        finish = FINISH_LENGTH if fr == "length" else FINISH_STOP
        usage = reply.get("usage") or {}
        lp = None
        lp_block = choice.get("logprobs")
        if isinstance(lp_block, Mapping) and lp_block.get("content") is not None:
            lp = []
            for t in lp_block["content"]:
                top: Dict[str, float] = {}
                for alt in t.get("top_logprobs") or []:
                    top.setdefault(alt["token"], float(alt["logprob"]))
                lp.append(TokenLogprob(t["token"], float(t["logprob"]), top))
        n_tok = usage.get("completion_tokens")
        if n_tok is None:
            n_tok = len(lp) if lp is not None else 0
        return Completion(text=text, finish_reason=finish, num_tokens=int(n_tok), logprobs=lp)

    def _one(self, r: GenerationRequest) -> Completion:
        body = self._body(r)
        last_err = "no attempt made"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                c = self._parse(self._post("/chat/completions", body))
                c.attempts = attempt + 1
                return c
            except HTTPStatusError as e:
                last_err = str(e)
                if not e.retryable:
                    break
                wait = e.retry_after
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, ValueError) as e:
                # ValueError covers bad JSON and malformed replies (a restarting server)
                last_err = f"{type(e).__name__}: {e}"
            if attempt == self.max_retries:
                break
            with self._lock:
                self.num_retries += 1
            if wait is None:
                wait = min(self.max_backoff_s, self.backoff_s * (2**attempt)) * (0.5 + random.random())
            log.debug("request failed (%s); retry %d in %.2fs", last_err, attempt + 1, wait)
            time.sleep(wait)
        return Completion(None, FINISH_ERROR, error=last_err, attempts=attempt + 1)

    # ------------------------------------------------------------------ public API
    def generate(self, requests: Sequence[GenerationRequest]) -> List[Completion]:
        """One chat completion per request, ``max_concurrency`` at a time, results in order."""
        if not requests:
            return []
        if len(requests) == 1 or self.max_concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def list_models(self) -> List[str]:
        """Model ids served (``GET /models``); raises on failure (use it as a health check)."""
        req = urllib.request.Request(self.base_url + "/models", headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return [m["id"] for m in data.get("data", [])]
