"""Generation driver: rows, keys, seeds, errors, and resume after an interrupted run."""

from __future__ import annotations

import json

import pytest

from fastrm.judge.generate import ModelEntry, generate_responses, load_prompts, row_key
from fastrm.judge.store import read_rows, sidecar
from fastrm.judge.types import FINISH_ERROR, Completion, SamplingParams

PROMPTS = [{"prompt_id": f"p{i}", "prompt": q} for i, q in enumerate(
    ["hi", "what is 2+2?", "a cat story", "why is the sky blue?", "name a colour"])]


class Interrupting:
    """Delegates to a real backend, raising KeyboardInterrupt on call number ``at`` (Ctrl-C)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls, self.name = inner, at, 0, inner.name

    def generate(self, reqs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.generate(reqs)


class FailingFirst:
    """Delegates to a real backend but fails requests whose seed is odd, on the first call only."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def generate(self, reqs):
        self.calls += 1
        out = self.inner.generate(reqs)
        if self.calls == 1:
            out = [Completion(None, FINISH_ERROR, error="server went away") if r.seed % 2 else c for r, c in zip(reqs, out)]
        return out


def _models(backend):
    return [
        ModelEntry("greedy", backend, SamplingParams(temperature=0.0, max_new_tokens=6, n=1), strength=2),
        ModelEntry("hot", backend, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, n=3, seed=5), strength=1),
    ]


def test_rows_keys_and_fields(tiny_backend, tmp_path):
    out = tmp_path / "gen.jsonl"
    st = generate_responses(PROMPTS, _models(tiny_backend), out, batch_size=4, progress=False)
    rows = read_rows(out)
    assert st.written == len(rows) == 5 * (1 + 3) and st.errors == 0 and st.resumed == 0
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert r["key"] == row_key(r["prompt_id"], r["model"], r["sample_index"])
        assert set(r) >= {"prompt_id", "prompt", "model", "sampling", "response", "finish_reason", "num_tokens", "seed"}
        assert 1 <= r["num_tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
    hot = [r for r in rows if r["model"] == "hot" and r["prompt_id"] == "p3"]
    assert hot[0]["sampling"]["temperature"] == 1.0 and len({r["seed"] for r in hot}) == 3
    # rerun: nothing to do, nothing duplicated
    st2 = generate_responses(PROMPTS, _models(tiny_backend), out, batch_size=4, progress=False)
    assert st2.written == 0 and st2.resumed == 20 and len(read_rows(out)) == 20


def test_resume_after_interrupt_and_torn_line_matches_uninterrupted(tiny_backend, tmp_path):
    ref_path = tmp_path / "ref.jsonl"
    generate_responses(PROMPTS, _models(tiny_backend), ref_path, batch_size=3, progress=False)
    ref = {r["key"]: r for r in read_rows(ref_path)}

    out = tmp_path / "gen.jsonl"
    crashing = Interrupting(tiny_backend, at=3)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(PROMPTS, _models(crashing), out, batch_size=3, progress=False)
    partial = read_rows(out)
    assert len(partial) == 5  # the two batches (3 + 2 greedy rows) finished before Ctrl-C are on disk
    with open(out, "a") as f:  # and the process died while writing the next row
        f.write('{"key": "[\\"p0\\", \\"hot\\", 2]", "response": "half')
    st = generate_responses(PROMPTS, _models(tiny_backend), out, batch_size=3, progress=False)
    rows = read_rows(out)
    assert st.resumed == 5 and st.written == 15
    assert len(rows) == len({r["key"] for r in rows}) == 20
    assert {r["key"] for r in rows} == set(ref)
    for r in rows:  # per-row seeds: the resumed run samples what the uninterrupted run sampled
        assert r["response"] == ref[r["key"]]["response"]


def test_failed_requests_are_recorded_and_retried(tiny_backend, tmp_path):
    out = tmp_path / "gen.jsonl"
    flaky = FailingFirst(tiny_backend)
    models = _models(flaky)
    st = generate_responses(PROMPTS, models, out, batch_size=32, progress=False)
    errs = read_rows(sidecar(out, "errors"))
    assert st.errors == len(errs) > 0 and st.written + st.errors == 20
    assert all(e["error"] == "server went away" and "response" not in e for e in errs)
    assert not ({e["key"] for e in errs} & {r["key"] for r in read_rows(out)})
    st2 = generate_responses(PROMPTS, models, out, batch_size=32, progress=False)
    assert st2.written == st.errors and st2.errors == 0 and len(read_rows(out)) == 20


def test_parquet_output_and_prompt_loading(tiny_backend, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": [{"role": "user", "content": "hi"}]}, {"question": [{"role": "user", "content": "hi"}]},
        {"question": [{"role": "user", "content": "yo"}]}]))
    prompts = load_prompts(src, prompt_key="question", id_key=None)
    assert len(prompts) == 2 and prompts[0]["prompt_id"] != prompts[1]["prompt_id"]
    out = tmp_path / "gen.parquet"
    generate_responses(prompts, _models(tiny_backend)[:1], out, progress=False)
    rows = read_rows(out)
    assert len(rows) == 2 and rows[1]["prompt"] == [{"role": "user", "content": "yo"}]
    mixed = [{"prompt_id": "s", "prompt": "plain"}, prompts[1]]
    with pytest.raises(ValueError, match="different types"):
        generate_responses(mixed, _models(tiny_backend)[:1], tmp_path / "mixed.parquet", progress=False)
    with pytest.raises(ValueError, match="no field 'prompt'"):
        load_prompts(src)
    with pytest.raises(ValueError, match="unique"):
        generate_responses(prompts, _models(tiny_backend)[:1] * 2, tmp_path / "x.jsonl", progress=False)
