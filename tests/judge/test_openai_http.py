"""OpenAIBackend over HTTP.

* Retry / timeout / concurrency behaviour against a scripted loopback HTTP server (a real
  server cannot be made to fail on cue).
* Real end-to-end test (slow) against ``transformers serve`` started on 127.0.0.1 inside the
  test, serving the SmolLM2-135M-Instruct checkpoint: generation, the judge (parsed-answer mode,
  since that server ignores ``logprobs``) and a resumed generation run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastrm.judge.openai_compat import OpenAIBackend
from fastrm.judge.types import GenerationRequest, SamplingParams

MSG = [{"role": "user", "content": "hi"}]


def _reply(text="hello", finish="stop", logprobs=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [choice], "usage": {"completion_tokens": 2}}


class Scripted(BaseHTTPRequestHandler):
    """Replies from ``server.script``: a list of (status, body or callable, delay) consumed in order."""

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            status, payload, delay = srv.script.pop(0) if srv.script else srv.default
        try:
            time.sleep(delay)
        finally:
            # count the request as finished before replying: once the reply is out, the client
            # may send its next request before this thread would run a later decrement
            with srv.lock:
                srv.inflight -= 1
        try:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if status == 429:
                self.send_header("Retry-After", "0.05")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.lock, srv.bodies, srv.script = threading.Lock(), [], []
    srv.inflight = srv.max_inflight = 0
    srv.default = (200, _reply(), 0.0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _backend(srv, **kw):
    kw.setdefault("backoff_s", 0.01)
    return OpenAIBackend(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", api_key="", **kw)


def test_request_body_and_parsing(server):
    lp = [{"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "A", "logprob": -0.1}, {"token": "B", "logprob": -2.4}]}]
    server.default = (200, _reply("A", "length", lp), 0.0)
    be = _backend(server)
    p = SamplingParams(temperature=0.3, top_p=0.8, top_k=7, max_new_tokens=5, top_logprobs=2, stop=["\n"])
    c = be.generate([GenerationRequest(MSG, p, seed=2**40 + 5)])[0]
    body = server.bodies[0]
    assert body["messages"] == MSG and body["temperature"] == 0.3 and body["top_p"] == 0.8 and body["top_k"] == 7
    assert body["max_tokens"] == 5 and body["logprobs"] is True and body["top_logprobs"] == 2 and body["stop"] == ["\n"]
    assert body["seed"] == (2**40 + 5) % 2**31
    assert (c.text, c.finish_reason, c.num_tokens) == ("A", "length", 2)
    assert c.logprobs[0].top == {"A": -0.1, "B": -2.4}


def test_retries_on_5xx_429_and_bad_json_then_succeeds(server):
    server.script = [(503, {"error": "busy"}, 0), (429, {"error": "slow down"}, 0), (200, "{not json", 0)]
    be = _backend(server, max_retries=4)
    c = be.generate([GenerationRequest(MSG, SamplingParams())])[0]
    assert c.ok and c.text == "hello" and c.attempts == 4 and be.num_retries == 3


def test_no_retry_on_4xx_and_gives_up_after_max_retries(server):
    server.script = [(400, {"error": "bad request: unknown field"}, 0)]
    be = _backend(server, max_retries=3)
    c = be.generate([GenerationRequest(MSG, SamplingParams())])[0]
    assert not c.ok and c.text is None and "HTTP 400" in c.error and "unknown field" in c.error and c.attempts == 1
    server.script = [(500, {"error": "boom"}, 0)] * 4  # max_retries=3: 4 attempts, all fail
    c = be.generate([GenerationRequest(MSG, SamplingParams())])[0]
    assert not c.ok and "HTTP 500" in c.error and c.attempts == 4 and len(server.bodies) == 5
    be2 = _backend(server, max_retries=2)
    server.script = [(500, {"error": "boom"}, 0)] * 3
    assert be2.generate([GenerationRequest(MSG, SamplingParams())])[0].attempts == 3


def test_timeout_is_retried_then_reported(server):
    server.script = [(200, _reply(), 1.0), (200, _reply(), 1.0)]
    be = _backend(server, timeout_s=0.2, max_retries=1)
    c = be.generate([GenerationRequest(MSG, SamplingParams())])[0]
    assert not c.ok and "timed out" in c.error.lower() and c.attempts == 2


def test_concurrency_limit(server):
    server.default = (200, _reply(), 0.15)
    be = _backend(server, max_concurrency=3)
    t0 = time.perf_counter()
    out = be.generate([GenerationRequest(MSG, SamplingParams(), seed=i) for i in range(9)])
    assert all(c.ok for c in out) and server.max_inflight == 3
    assert time.perf_counter() - t0 >= 3 * 0.15  # 9 requests, 3 at a time


def test_bad_config():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", max_concurrency=0)


# --------------------------------------------------------------------------- real server

@pytest.fixture(scope="module")
def transformers_server(smollm2_dir, free_port):
    missing = [m for m in ("transformers", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing or shutil.which("transformers") is None:
        pytest.skip(f"`transformers serve` unavailable (missing {missing or ['transformers CLI']}): pip install 'transformers[serving]'")
    port = free_port()
    log = open(os.path.join(str(smollm2_dir.parent), f"serve-{port}.log"), "w")
    proc = subprocess.Popen(
        [shutil.which("transformers"), "serve", str(smollm2_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"transformers serve did not come up in 180 s; see {log.name}")
            time.sleep(1)
        yield url, str(smollm2_dir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group, started above
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_real_server_generate_judge_and_resume(transformers_server, tmp_path):
    from fastrm.judge.generate import ModelEntry, generate_responses
    from fastrm.judge.judge import PairwiseJudge
    from fastrm.judge.store import read_rows

    url, model = transformers_server
    be = OpenAIBackend(url, model, name="smollm2-http", max_concurrency=2, timeout_s=300, max_retries=2)
    assert model in be.list_models()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    out = be.generate([GenerationRequest([{"role": "user", "content": q}], greedy) for q in
                       ["What is the capital of France?", "What is 2+2? Answer with a number."]])
    assert all(c.ok for c in out), [c.error for c in out]
    assert "Paris" in out[0].text and "4" in out[1].text and out[0].num_tokens > 0

    # the judge over HTTP: this server returns no logprobs, so verdicts come from parsed answers
    judge = PairwiseJudge(be, max_new_tokens=4, max_attempts=2)
    js = judge.judge([{"prompt": "What is the capital of France?", "response_a": "Paris.", "response_b": "Berlin."}])
    assert js[0].status != "failed" or js[0].replies[0], js[0]
    if js[0].status != "failed":
        assert js[0].source == "parsed"

    # resumable generation through the server: a partial run, then the rest
    prompts = [{"prompt_id": f"p{i}", "prompt": q} for i, q in enumerate(["Say hi.", "Name a fruit.", "Name a colour."])]
    models = [ModelEntry("smollm2-http", be, SamplingParams(temperature=0.8, max_new_tokens=12, n=2, seed=3))]
    path = tmp_path / "gen.jsonl"
    st1 = generate_responses(prompts, models, path, batch_size=2, max_rows=3, progress=False)
    st2 = generate_responses(prompts, models, path, batch_size=4, progress=False)
    rows = read_rows(path)
    assert st1.written == 3 and st2.resumed == 3 and st2.written == 3
    assert len(rows) == len({r["key"] for r in rows}) == 6 and all(r["response"] for r in rows)
