"""``fastrm serve``: an HTTP reward server for PPO / GRPO loops (standard library only).

Endpoints (JSON in, JSON out):

* ``POST /get_reward`` -- OpenRLHF's remote reward-model protocol
  (``openrlhf.utils.remote_rm_utils.remote_rm_fn``): ``{"query": [texts]}`` ->
  ``{"rewards": [floats], "scores": [floats]}`` (``scores`` repeats the rewards for clients that
  read that key). Each query is a whole rendered conversation (``prompt + response`` as the chat
  template writes it); it is tokenized as the training data was
  (:func:`fastrm.inference.rows.text_tokens`); queries that share a prompt (a PPO batch sends
  several samples per prompt) have it computed once. Other keys (``prompts``, ``labels``) are
  ignored.
* ``POST /score`` -- ``{"rows": [rows]}`` in any format of :mod:`fastrm.inference.rows`
  (``{prompt, response}``, ``{messages}``, ``{prompt, responses}``) -> ``{"rewards": [...]}``,
  one entry per row: a float, or a list for a ``responses`` row. The prompt of a best-of-N row
  is computed once.
* ``GET /health`` -- ``{"status": "ok", ...}`` with request and batch counters.

Dynamic batching (:class:`DynamicBatcher`): request threads tokenize their rows and queue them;
one model thread takes the first waiting request, waits at most ``max_wait_ms`` for more while
the collected requests stay within ``batch_tokens`` tokens, scores them together in packed rows
(:meth:`RewardScorer.score_groups`) and answers each. A bad body (not JSON, wrong fields, a text
cell that is a number or not valid Unicode, a row too long for ``batch_tokens``) is answered
``400`` with the message and never reaches the model; an unexpected error is a ``500`` and the
server keeps serving.
SIGTERM / SIGINT stop accepting connections, finish the requests in flight, then exit.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from fastrm.data.batch import shares_prefix

log = logging.getLogger(__name__)

__all__ = ["DynamicBatcher", "RewardServer", "serve", "MAX_BODY_BYTES"]

#: requests larger than this are refused (413)
MAX_BODY_BYTES = 64 << 20


class BadRequest(ValueError):
    """A request the client must fix (answered 400 / 404 / 411 / 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Job:
    __slots__ = ("groups", "tokens", "done", "result", "error")

    def __init__(self, groups, tokens: int) -> None:
        self.groups = groups
        self.tokens = tokens
        self.done = threading.Event()
        self.result: Optional[list[list[float]]] = None
        self.error: Optional[BaseException] = None


class DynamicBatcher:
    """Collects concurrent requests into packed batches scored by one model thread.

    Args:
        scorer: the :class:`~fastrm.inference.RewardScorer` (only this thread calls its model).
        max_wait_ms: how long the first request of a batch waits for others.
        batch_tokens: token bound of one collected batch (default: the scorer's
            ``batch_tokens``); a larger single request runs alone, in several forwards.
    """

    def __init__(self, scorer, max_wait_ms: float = 5.0, batch_tokens: Optional[int] = None):
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.scorer = scorer
        self.max_wait = max_wait_ms / 1000.0
        self.batch_tokens = int(batch_tokens or scorer.batch_tokens)
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._carry: Optional[_Job] = None
        self.stats = {"requests": 0, "batches": 0, "responses": 0, "errors": 0, "waiting": 0}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fastrm-batcher", daemon=True)
        self._thread.start()

    def submit(self, groups) -> list[list[float]]:
        """Rewards of ``groups`` (blocks until their batch ran). A group that cannot be scored
        raises ``ValueError`` here, before it joins a batch."""
        self.scorer.check_groups(groups)
        tokens = sum(g.num_tokens(shares_prefix(g, True)) for g in groups)
        job = _Job(groups, tokens)
        with self._lock:
            self.stats["waiting"] += 1
        self._queue.put(job)
        job.done.wait()
        with self._lock:
            self.stats["waiting"] -= 1
        if job.error is not None:
            raise job.error
        return job.result

    def _next(self, timeout: Optional[float]) -> Optional[_Job]:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else \
            self._queue.get_nowait()

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            jobs, tokens, stop = [first], first.tokens, False
            deadline = time.monotonic() + self.max_wait
            while tokens < self.batch_tokens:
                try:
                    job = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if tokens + job.tokens > self.batch_tokens:
                    self._carry = job
                    break
                jobs.append(job)
                tokens += job.tokens
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: Sequence[_Job]) -> None:
        groups = [g for j in jobs for g in j.groups]
        try:
            rewards = self.scorer.score_groups(groups)
        except BaseException as err:  # answered as 500 by each request; the loop goes on
            log.exception("scoring a batch of %d requests failed", len(jobs))
            for j in jobs:
                j.error = err
                j.done.set()
            with self._lock:
                self.stats["errors"] += len(jobs)
            return
        at = 0
        for j in jobs:
            j.result = rewards[at:at + len(j.groups)]
            at += len(j.groups)
            j.done.set()
        with self._lock:
            self.stats["requests"] += len(jobs)
            self.stats["batches"] += 1
            self.stats["responses"] += sum(len(r) for r in rewards)

    def close(self) -> None:
        """Lets the queued requests finish, then stops the model thread."""
        self._queue.put(None)
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"
    server_version = "fastrm-serve"

    def log_message(self, fmt: str, *args: Any) -> None:  # the default writes every request to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a POST needs a Content-Length header and a JSON body", 411)
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if n > MAX_BODY_BYTES:
            raise BadRequest(f"body of {n} bytes is over the {MAX_BODY_BYTES} byte limit; send "
                             "fewer rows per request", 413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadRequest(f"body is not valid JSON ({err})") from None

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/health":
            self._send(404, {"error": f"no GET {self.path}; endpoints: GET /health, POST "
                                      "/get_reward, POST /score"})
            return
        self._send(200, {"status": "ok", **self.server.info()})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            if path not in ("/get_reward", "/score"):
                raise BadRequest(f"no POST {self.path}; endpoints: POST /get_reward, POST "
                                 "/score, GET /health", 404)
            body = self._body()
            if not isinstance(body, dict):
                raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
            out = self.server.get_reward(body) if path == "/get_reward" else \
                self.server.score(body)
        except BadRequest as err:
            self._send(err.status, {"error": str(err)})
            return
        except ValueError as err:  # bad rows: named row and column
            self._send(400, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 (the server keeps serving)
            log.exception("request to %s failed", path)
            self._send(500, {"error": f"internal error: {type(err).__name__}: {err}"})
            return
        self._send(200, out)


class RewardServer(ThreadingHTTPServer):
    """The HTTP server (one thread per connection) around a :class:`DynamicBatcher`."""

    daemon_threads = False  # server_close() waits for the requests in flight
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: many PPO workers connect at once

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 5000,
                 max_wait_ms: float = 5.0, batch_tokens: Optional[int] = None) -> None:
        self.scorer = scorer
        self.batcher = DynamicBatcher(scorer, max_wait_ms, batch_tokens)
        self.started = time.time()
        super().__init__((host, port), _Handler)

    def info(self) -> dict[str, Any]:
        with self.batcher._lock:
            stats = dict(self.batcher.stats)
        return {"uptime_s": round(time.time() - self.started, 3), "normalize": self.scorer.normalize,
                "batch_tokens": self.batcher.batch_tokens,
                "max_wait_ms": self.batcher.max_wait * 1000.0, **stats}

    def get_reward(self, body: dict) -> dict:
        queries = body.get("query")
        if not isinstance(queries, list) or not queries:
            raise BadRequest('/get_reward takes {"query": [texts]} (OpenRLHF): "query" must be a '
                             "non-empty list of strings")
        groups, where = self.scorer.tokenize_texts(queries)
        raw = self.batcher.submit(groups)
        rewards = [self.scorer.normalized([raw[g][k]])[0] for g, k in where]
        return {"rewards": rewards, "scores": rewards}

    def score(self, body: dict) -> dict:
        rows = body.get("rows")
        if not isinstance(rows, list) or not rows:
            raise BadRequest('/score takes {"rows": [rows]}: each row {"prompt", "response"}, '
                             '{"messages"} or {"prompt", "responses": [...]}')
        prepared = self.scorer.prepare_rows(rows)
        rewards = self.batcher.submit([g for _, _, g in prepared])
        out = self.scorer.finish_rows(prepared, rewards)
        return {"rewards": [r[p.output_field] for r, (_, p, _) in zip(out, prepared)]}

    def server_close(self) -> None:
        super().server_close()  # joins the request threads
        self.batcher.close()


def serve(scorer, host: str = "127.0.0.1", port: int = 5000, max_wait_ms: float = 5.0,
          batch_tokens: Optional[int] = None) -> None:
    """Runs the server until SIGTERM / SIGINT, then stops gracefully. Prints ``fastrm serve:
    listening on http://HOST:PORT`` (the real port when ``port=0``) once it accepts requests."""
    server = RewardServer(scorer, host, port, max_wait_ms, batch_tokens)

    def stop(signum, _frame) -> None:
        log.info("signal %d: finishing requests in flight, then exiting", signum)
        # shutdown() waits for serve_forever to return: call it off the main thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    h, p = server.server_address[:2]
    print(f"fastrm serve: listening on http://{h}:{p}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
    print("fastrm serve: stopped", flush=True)
