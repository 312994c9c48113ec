"""``fastrm score / eval / serve`` on an HF reward-model directory (``*ForSequenceClassification``
written by transformers): rewards equal transformers' own model on the same conversations; the
commands end to end, including a ``fastrm score`` process killed mid-run and rerun, and a
``fastrm serve`` process under concurrent clients equal to ``fastrm score``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fastrm.inference import RewardScorer, evaluate_pairs
from fastrm.inference.cli import main_eval, main_score
from fastrm.judge.store import iter_jsonl, read_rows
from fixtures.hf_tokenizers import conversations

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="module", params=["mistral", "llama"])
def rm_dir(request, tmp_path_factory):
    """A tiny random reward model of a family (ChatML / Llama 3.1 templates), saved by
    transformers."""
    from fixtures.hf_models import build_model_dir
    return build_model_dir(request.param, tmp_path_factory.mktemp("rm") / request.param,
                           seqcls=True, seed=3)


@pytest.fixture(scope="module")
def chatml_rm_dir(tmp_path_factory):
    from fixtures.hf_models import build_model_dir
    return build_model_dir("mistral", tmp_path_factory.mktemp("rm") / "chatml", seqcls=True, seed=4)


def transformers_rewards(directory: Path, convs: list[list[dict]]) -> list[float]:
    """transformers' AutoModelForSequenceClassification, one conversation at a time, tokenized
    by AutoTokenizer.apply_chat_template (the ecosystem's reference scorer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory),
                                                               dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for c in convs:
            ids = tok.apply_chat_template(c, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(float(model(input_ids=torch.tensor([list(ids)])).logits[0, 0]))
    return out


def test_rewards_equal_transformers(rm_dir):
    convs = conversations(seed=5, n=30)
    rng = random.Random(0)
    rows = [{"messages": c} for c in convs[:20]]
    best_of = []  # best-of-N rows: one prompt, the last turns of other conversations
    for c in convs[20:]:
        others = [rng.choice(convs)[-1]["content"] for _ in range(3)]
        rows.append({"prompt": c[:-1], "responses": [c[-1]["content"], *others]})
        best_of += [c[:-1] + [{"role": "assistant", "content": t}]
                    for t in [c[-1]["content"], *others]]
    scorer = RewardScorer.from_checkpoint(str(rm_dir), batch_tokens=1024)
    out = scorer.score(rows)
    got = [r["reward"] for r in out[:20]] + [x for r in out[20:] for x in r["rewards"]]
    ref = transformers_rewards(rm_dir, convs[:20] + best_of)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=1e-4)
    assert scorer.stats["prompt_tokens_saved"] > 0


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    convs = conversations(seed=seed, n=n)
    rows = []
    for i, c in enumerate(convs):
        if i % 3 == 0:
            rows.append({"id": i, "messages": c})
        elif i % 3 == 1:
            rows.append({"id": i, "prompt": c[0]["content"] or "hi", "response": c[-1]["content"]})
        else:
            rows.append({"id": i, "prompt": c[:-1], "responses": [
                c[-1]["content"], *[rng.choice(convs)[-1]["content"] for _ in range(rng.randint(0, 5))]]})
    return rows


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two `fastrm score` processes (the in-process crash test is in the default run)
def test_score_cli_killed_mid_run_resumes(chatml_rm_dir, tmp_path):
    rows = _rows(60, seed=8)
    src = _write(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "fastrm.cli", "score", "--checkpoint", str(chatml_rm_dir),
           "--input", str(src), "--output", str(out), "--batch-tokens", "512", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = out.read_text().count("\n")
    assert done < len(rows), "the run finished before it was killed: give it more rows"
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already done" in res.stdout
    got = list(iter_jsonl(out))
    assert [r["input_row"] for r in got] == list(range(len(rows)))
    ref = RewardScorer.from_checkpoint(str(chatml_rm_dir)).score(rows)
    for a, b in zip(got, ref):
        key = "rewards" if "rewards" in b else "reward"
        assert a["id"] == b["id"] and a[key] == pytest.approx(b[key], abs=1e-4)


def test_score_cli_in_process_and_normalize(chatml_rm_dir, tmp_path, capsys):
    rows = _rows(9, seed=9)
    src = _write(tmp_path / "rows.jsonl", rows)
    main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(src), "--output",
                str(tmp_path / "a.jsonl"), "--no-progress"])
    assert "scored 9 rows" in capsys.readouterr().out
    got = [r.get("reward", r.get("rewards")) for r in iter_jsonl(tmp_path / "a.jsonl")]
    ref = RewardScorer.from_checkpoint(str(chatml_rm_dir)).score(rows)
    for g, w in zip(got, [r.get("reward", r.get("rewards")) for r in ref]):
        assert g == pytest.approx(w, abs=1e-5)
    # --normalize with the statistics stored in config.json (OpenRLHF's mean / std keys); the
    # model options (dtype, device, attention backend, batch tokens) give the same rewards
    import shutil
    stats_dir = tmp_path / "with_stats"
    shutil.copytree(chatml_rm_dir, stats_dir)
    cfg = json.loads((stats_dir / "config.json").read_text())
    (stats_dir / "config.json").write_text(json.dumps({**cfg, "mean": 0.5, "std": 2.0}))
    main_score(["--checkpoint", str(stats_dir), "--input", str(src), "--output",
                str(tmp_path / "n.jsonl"), "--normalize", "--no-progress", "--dtype", "fp32",
                "--device", "cpu", "--attention-backend", "sdpa_segments", "--batch-tokens", "512"])
    normed = [r.get("reward", r.get("rewards")) for r in iter_jsonl(tmp_path / "n.jsonl")]
    for n, g in zip(normed, got):
        if isinstance(g, list):
            assert n == pytest.approx([(x - 0.5) / 2.0 for x in g], abs=1e-5)
        else:
            assert n == pytest.approx((g - 0.5) / 2.0, abs=1e-5)
    with pytest.raises(SystemExit, match="normalize=True needs reward_mean"):
        main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(src), "--output",
                    str(tmp_path / "b.jsonl"), "--normalize"])
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "response": 7}])
    with pytest.raises(SystemExit, match="row 0, column 'response' is a number"):
        main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(bad), "--output",
                    str(tmp_path / "c.jsonl")])
    with pytest.raises(SystemExit, match="not a directory"):
        main_score(["--checkpoint", str(tmp_path / "nope"), "--input", str(src), "--output",
                    str(tmp_path / "d.jsonl")])
    # a missing input or an output of another type is a one-line error, before the model loads
    with pytest.raises(SystemExit, match=r"--input \S*missing.jsonl does not exist"):
        main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(tmp_path / "missing.jsonl"),
                    "--output", str(tmp_path / "e.jsonl")])
    with pytest.raises(SystemExit, match="output must end in .jsonl or .parquet"):
        main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(src), "--output",
                    str(tmp_path / "e.csv")])
    assert not (tmp_path / "e.jsonl").exists()


def test_serve_cli_bad_options_and_busy_port_are_one_line_errors(chatml_rm_dir, capsys):
    import socket

    from fastrm.inference.cli import main_serve

    with pytest.raises(SystemExit):
        main_serve(["--checkpoint", str(chatml_rm_dir), "--max-wait-ms", "-1"])
    assert "--max-wait-ms must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_serve(["--checkpoint", str(chatml_rm_dir), "--port", "70000"])
    assert "--port must lie in [0, 65535], got 70000" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{port} .*in use"):
            main_serve(["--checkpoint", str(chatml_rm_dir), "--port", str(port)])


def test_eval_cli_on_rewardbench_fixture_and_builder(chatml_rm_dir, tmp_path, capsys):
    data = FIXTURES / "rewardbench_sections.jsonl"
    main_eval(["--checkpoint", str(chatml_rm_dir), "--data", str(data), "--output-dir",
               str(tmp_path / "ev")])
    printed = capsys.readouterr().out
    assert "| RewardBench | Chat | Chat Hard | Safety | Reasoning | Score |" in printed
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    want = evaluate_pairs(RewardScorer.from_checkpoint(str(chatml_rm_dir)), read_rows(data))
    assert metrics["accuracy"] == pytest.approx(want["accuracy"])
    assert metrics["rewardbench"] == pytest.approx(want["rewardbench"])
    assert (tmp_path / "ev" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    main_eval(["--checkpoint", str(chatml_rm_dir), "--data", "synthetic", "--data-arg",
               "num_prompts=20", "--data-arg", "split=train"])
    assert '"pairs": ' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a file nor a builder"):
        main_eval(["--checkpoint", str(chatml_rm_dir), "--data", "no_such_thing"])
    with pytest.raises(SystemExit, match="--data-arg applies to builders"):
        main_eval(["--checkpoint", str(chatml_rm_dir), "--data", str(data), "--data-arg", "a=1"])


@pytest.mark.slow  # a `fastrm serve` process (tests/inference/test_server.py runs one by default)
def test_serve_cli_equals_score(chatml_rm_dir, tmp_path):
    import urllib.request

    rows = _rows(24, seed=10)
    src = _write(tmp_path / "rows.jsonl", rows)
    scored = tmp_path / "scored.jsonl"
    main_score(["--checkpoint", str(chatml_rm_dir), "--input", str(src), "--output", str(scored),
                "--no-progress"])
    expected = list(iter_jsonl(scored))
    proc = subprocess.Popen([sys.executable, "-m", "fastrm.cli", "serve", "--checkpoint",
                             str(chatml_rm_dir), "--port", "0", "--max-wait-ms", "20"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read()[-2000:]
        url = line.split("listening on ")[1].strip()

        def call(i):
            req = urllib.request.Request(url + "/score", data=json.dumps({"rows": [rows[i]]}).encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                return i, json.loads(r.read())["rewards"][0]

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(call, range(len(rows))))
        for i, r in results:
            key = "rewards" if "rewards" in expected[i] else "reward"
            assert r == pytest.approx(expected[i][key], abs=1e-4)
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        assert health["status"] == "ok" and health["requests"] >= len(rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
