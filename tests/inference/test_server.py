"""The reward server as a real process on loopback: OpenRLHF /get_reward and /score under many
concurrent clients equal the in-process scorer; bad bodies get 4xx and the server keeps
serving; /health; SIGTERM finishes the requests in flight and exits."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastrm.inference import RewardScorer
from scoring_ref import flat_rewards, random_rows

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def post(url: str, body, raw: bytes | None = None, timeout: float = 60.0):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_server(tokenizer_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_tiny.py"), str(tokenizer_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split("listening on ")[1].strip()


@pytest.fixture(scope="module")
def server_proc(chatml_dir):
    proc, url = start_server(chatml_dir, "--max-wait-ms", "200", "--batch-tokens", "1024")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def server(server_proc):
    return server_proc[1]


def test_concurrent_clients_equal_the_scorer(server, chatml_model, chatml_tok):
    rows = random_rows(21, n=48)
    expected = RewardScorer(chatml_model, chatml_tok).score(rows)
    texts = [chatml_tok.render(c) for c in
             [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
              for r in rows if isinstance(r.get("response"), str) and isinstance(r.get("prompt"), str)]]
    text_expected = RewardScorer(chatml_model, chatml_tok).score(
        [{"prompt": r["prompt"], "response": r["response"]} for r in rows
         if isinstance(r.get("response"), str) and isinstance(r.get("prompt"), str)])
    rng = random.Random(0)

    def one_score(i):
        k = rng.randint(1, 3)
        batch = list(range(i, min(i + k, len(rows))))
        status, out = post(server + "/score", {"rows": [rows[j] for j in batch]})
        assert status == 200, out
        return batch, out["rewards"]

    def one_query(i):
        status, out = post(server + "/get_reward", {"query": [texts[i]], "prompts": ["ignored"]})
        assert status == 200, out
        assert out["scores"] == out["rewards"]
        return i, out["rewards"][0]

    with ThreadPoolExecutor(32) as ex:
        futs = [ex.submit(one_score, i) for i in range(len(rows))]
        futs += [ex.submit(one_query, i) for i in range(len(texts))]
        results = [f.result() for f in futs]
    for res in results[:len(rows)]:
        batch, rewards = res
        for j, r in zip(batch, rewards):
            want = expected[j]["rewards"] if "rewards" in expected[j] else expected[j]["reward"]
            assert r == pytest.approx(want, abs=1e-4)
    for i, r in results[len(rows):]:
        assert r == pytest.approx(text_expected[i]["reward"], abs=1e-4)
    status, health = urllib.request.urlopen(server + "/health").status, json.loads(
        urllib.request.urlopen(server + "/health").read())
    assert status == 200 and health["status"] == "ok"
    assert health["requests"] >= len(results)
    assert health["batches"] < health["requests"]  # concurrent requests shared batches


@pytest.mark.parametrize("path,body,raw,status,match", [
    ("/get_reward", None, b"{not json", 400, "not valid JSON"),
    ("/get_reward", [1, 2], None, 400, "JSON object"),
    ("/get_reward", {"queries": ["x"]}, None, 400, '"query" must be a non-empty list'),
    ("/get_reward", {"query": ["ok", 3]}, None, 400, "query 1 is a int"),
    ("/score", {"rows": [{"prompt": "q", "response": 5}]}, None, 400, "row 0, column 'response' is a number"),
    ("/score", {"rows": [{"prompt": "q"}]}, None, 400, "none of 'response'"),
    ("/score", {"rows": [{"prompt": "x " * 3000, "response": "a"}]}, None, 400, "batch_tokens=1024"),
    ("/score", {}, None, 400, '"rows"'),
    ("/nope", {"query": ["x"]}, None, 404, "endpoints"),
    # a lone surrogate escape is valid JSON but no Unicode text: a client error, not a 500
    ("/get_reward", None, b'{"query": ["hi \\ud800"]}', 400, "not valid Unicode"),
    ("/score", None, b'{"rows": [{"prompt": "q", "response": "\\udfff"}]}', 400,
     "not valid Unicode"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, path, body, raw, status, match):
    code, out = post(server + path, body, raw)
    assert code == status and match in out["error"]
    code, out = post(server + "/score", {"rows": [{"prompt": "q", "response": "a"}]})
    assert code == 200 and isinstance(out["rewards"][0], float)


def test_sigterm_finishes_requests_in_flight(server_proc):
    """Last test of the module: it stops the shared server."""
    proc, url = server_proc
    results = []

    def client():
        results.append(post(url + "/score", {"rows": [{"prompt": "q", "responses": ["a", "b"]}]}))

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while json.loads(urllib.request.urlopen(url + "/health").read())["waiting"] < 1:
        assert time.monotonic() < deadline, "the request never reached the batcher"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # the request waits in the batcher (max_wait 200 ms)
    t.join(30)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    assert results and results[0][0] == 200 and len(results[0][1]["rewards"][0]) == 2
    assert "stopped" in out
