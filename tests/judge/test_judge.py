"""LLM-as-judge: verdict parsing, answer-token probabilities, both-order combination,
contradiction dropping, position bias, retries and failures, transform and batch job."""

from __future__ import annotations

import math
import random
import re

import datasets
import pytest
import torch
from tiny_backend import local_backend_node

from fastrm.judge.bt import margin_from_prob
from fastrm.judge.judge import (
    STATUS_CONTRADICTION,
    STATUS_FAILED,
    STATUS_OK,
    MeanLogprobJudge,
    PairwiseJudge,
    combine_orders,
    label_logit,
    parse_verdict,
)
from fastrm.judge.local import LocalBackend
from fastrm.judge.store import read_rows, sidecar
from fastrm.judge.transform import PreferenceTransform, label_pairs, load_pairs
from fastrm.judge.types import FINISH_ERROR, FINISH_STOP, Completion, TokenLogprob

TEMPLATE = "Q: {prompt}\n<first>{response_a}</first>\n<second>{response_b}</second>\nAnswer {label_a} or {label_b}."


def _shown(req):
    m = re.search(r"<first>(.*)</first>\n<second>(.*)</second>", req.messages[-1]["content"], flags=re.S)
    return m.group(1), m.group(2)


class LogprobJudgeServer:
    """Stands in for a logprob-capable judge: log-odds that the first shown response wins is
    ``quality[first] - quality[second] + bias``; returns it as top_logprobs of the answer token."""

    supports_logprobs = True
    name = "sim"

    def __init__(self, quality, bias):
        self.quality, self.bias, self.requests = quality, bias, 0

    def generate(self, reqs):
        out = []
        for r in reqs:
            self.requests += 1
            a, b = _shown(r)
            z = self.quality[a] - self.quality[b] + self.bias
            la, lb = -math.log1p(math.exp(-z)), -math.log1p(math.exp(z))
            tok = "A" if z >= 0 else "B"
            out.append(Completion(tok, FINISH_STOP, 1, logprobs=[TokenLogprob(tok, max(la, lb), {"A": la, "B": lb, " C": -9.0})]))
        return out


class TextJudgeServer:
    """A judge without logprobs replying from a script: ``script(first, second, attempt) -> str``."""

    supports_logprobs = False
    name = "text"

    def __init__(self, script):
        self.script, self.calls = script, {}

    def generate(self, reqs):
        out = []
        for r in reqs:
            k = _shown(r)
            n = self.calls.get(k, 0)
            self.calls[k] = n + 1
            reply = self.script(*k, n)
            out.append(Completion(None, FINISH_ERROR, error=reply[4:]) if reply.startswith("ERR:") else Completion(reply, FINISH_STOP, 3))
        return out


@pytest.mark.parametrize("text,want", [
    ("A", 0), ("B", 1), (" b", None), ("**B**", 1), ("A.", 0), ("[[B]] because...", 1), ("Answer: B", 1),
    ("The better response is B.", 1), ("Response A is better", 0), ("Both A and B are fine", None),
    ("I cannot tell", None), ("Apple", None), ("", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_label_logit_from_top_logprobs():
    c = Completion("The A", FINISH_STOP, 2, logprobs=[
        TokenLogprob("The", -0.5, {"The": -0.5, "A": -2.0}),  # not a label: skipped
        TokenLogprob(" A", -0.3, {" A": -0.3, "A": -1.0, " B": -2.0, "Hmm": -4.0}),
    ])
    want = math.log(math.exp(-0.3) + math.exp(-1.0)) - (-2.0)
    assert label_logit(c) == pytest.approx(want, abs=1e-12)
    # B missing from the top list: bounded by the smallest listed logprob
    c2 = Completion("A", FINISH_STOP, 1, logprobs=[TokenLogprob("A", -0.1, {"A": -0.1, "x": -3.0, "y": -5.0})])
    assert label_logit(c2) == pytest.approx(-0.1 + 5.0)
    assert label_logit(Completion("A", FINISH_STOP, 1, logprobs=[TokenLogprob("A", -0.1, {})])) is None
    assert label_logit(Completion("A", FINISH_STOP, 1)) is None


def test_combine_orders():
    assert combine_orders(2.0, 1.0) == (STATUS_OK, 1.5)
    assert combine_orders(-2.0, -1.0) == (STATUS_OK, -1.5)
    assert combine_orders(2.0, -1.0)[0] == STATUS_CONTRADICTION
    assert combine_orders(0.0, 0.0)[0] == "tie"


def _pairs(n, seed=0):
    rng = random.Random(seed)
    texts = [f"resp{i}" for i in range(2 * n)]
    quality = {t: rng.gauss(0, 1.5) for t in texts}
    pairs = [{"pair_id": f"q{i}", "prompt": f"question {i}", "response_a": texts[2 * i], "response_b": texts[2 * i + 1]} for i in range(n)]
    return pairs, quality


def test_both_orders_cancel_position_bias_and_drop_contradictions():
    pairs, quality = _pairs(200)
    bias = 0.8
    judge = PairwiseJudge(LogprobJudgeServer(quality, bias), template=TEMPLATE)
    js = judge.judge(pairs)
    n_contra = 0
    first1 = first2 = 0
    for p, j in zip(pairs, js):
        t = quality[p["response_a"]] - quality[p["response_b"]]
        assert j.logit_order1 == pytest.approx(t + bias, abs=1e-9)
        assert j.logit_order2 == pytest.approx(t - bias, abs=1e-9)
        assert j.source == "logprobs" and j.attempts == 2
        if abs(t) < bias:  # the two orders disagree exactly when the bias outweighs the preference
            assert j.status == STATUS_CONTRADICTION
            n_contra += 1
        else:
            assert j.status == STATUS_OK and j.logit == pytest.approx(t, abs=1e-9)  # bias cancels
        first1 += t + bias > 0
        first2 += t - bias < 0
    st = judge.stats.as_dict()
    assert st["contradictions"] == n_contra > 0 and st["ok"] == 200 - n_contra
    assert st["first_win_rate_order1"] == pytest.approx(first1 / 200)
    assert st["first_win_rate_order2"] == pytest.approx(first2 / 200)
    assert st["position_bias_logit"] == pytest.approx(bias, abs=1e-9)


def test_always_A_judge_is_all_contradictions(tmp_path):
    pairs, _ = _pairs(6)
    judge = PairwiseJudge(TextJudgeServer(lambda a, b, n: "A"), template=TEMPLATE)
    stats = label_pairs(pairs, judge, tmp_path / "prefs.jsonl", progress=False)
    assert stats["labelled"] == 0 and stats["dropped"] == 6
    assert stats["judge_stats"]["first_win_rate"] == 1.0
    dropped = read_rows(sidecar(tmp_path / "prefs.jsonl", "dropped"))
    assert len(dropped) == 6 and all(r["label_status"] == "contradiction" and r["chosen"] is None for r in dropped)
    assert all(r["judge_replies"] == [["A"], ["A"]] for r in dropped)
    # parsed single votes: p_first = 2/3 (Laplace), so each order's log-odds is +-log 2
    assert dropped[0]["judge_p_order1"] == pytest.approx(2 / 3) and dropped[0]["judge_p_order2"] == pytest.approx(1 / 3)


def test_retries_then_failures_keep_raw_replies():
    pairs, _ = _pairs(3)
    good, bad = pairs[0]["response_a"], pairs[1]["response_a"]

    def script(first, second, n):
        if good in (first, second):  # unparseable once, then a real answer (for the good response)
            return "hmm, hard to say" if n == 0 else ("A" if first == good else "B")
        if bad in (first, second):
            return "I refuse"
        return "ERR:connection reset"

    judge = PairwiseJudge(TextJudgeServer(script), template=TEMPLATE, max_attempts=3)
    js = judge.judge(pairs)
    assert js[0].status == STATUS_OK and js[0].logit > 0 and js[0].attempts == 4
    assert js[0].replies == [["hmm, hard to say", "A"], ["hmm, hard to say", "B"]]
    assert js[1].status == STATUS_FAILED and js[1].replies == [["I refuse"] * 3] * 2
    assert sum("unparseable reply 'I refuse'" in e for e in js[1].errors) == 6
    assert js[2].status == STATUS_FAILED and all("connection reset" in e for e in js[2].errors) and len(js[2].errors) == 6
    assert judge.stats.failures == 2


def test_votes_give_laplace_probability():
    pairs, _ = _pairs(1)
    replies = ["A", "A", "B"]
    judge = PairwiseJudge(TextJudgeServer(lambda a, b, n: replies[n % 3]), template=TEMPLATE, n_votes=3, temperature=1.0)
    j = judge.judge(pairs)[0]
    # order 1: first wins 2 of 3 -> p = 3/5; order 2 likewise -> P(a wins) = 2/5: contradiction
    assert j.p_order1 == pytest.approx(3 / 5) and j.p_order2 == pytest.approx(2 / 5) and j.status == STATUS_CONTRADICTION
    with pytest.raises(ValueError, match="temperature"):
        PairwiseJudge(TextJudgeServer(None), n_votes=3, temperature=0.0)


def test_local_backend_judge_reads_answer_token_probabilities(tiny_model, tokenizer):
    """A real (tiny) model whose LM head is pushed toward "A" answers "A" in both orders."""
    a_id, b_id = tokenizer.encode("A")[0], tokenizer.encode("B")[0]

    def push(m, i, o):  # "A" and "B" become the two likeliest tokens, "A" ahead by 2 nats
        o = o.clone()
        top = o.max(-1).values
        o[..., a_id], o[..., b_id] = top + 5.0, top + 3.0
        return o

    h = tiny_model.output.register_forward_hook(push)
    try:
        be = LocalBackend(tiny_model, tokenizer, max_batch_size=4)
        pairs, _ = _pairs(3)
        judge = PairwiseJudge(be, template=TEMPLATE, max_new_tokens=2, top_logprobs=5)
        js = judge.judge(pairs)
        for p, j in zip(pairs, js):
            assert j.source == "logprobs" and j.status == STATUS_CONTRADICTION
            # reference: next-token log-odds A vs B after each judge prompt, by a plain forward
            from fastrm.judge.local import encode_chat_prompt

            for order, (x, y) in enumerate([(p["response_a"], p["response_b"]), (p["response_b"], p["response_a"])]):
                ids = encode_chat_prompt(tokenizer, judge.messages(p["prompt"], x, y))
                with torch.no_grad():
                    lp = torch.log_softmax(tiny_model(torch.tensor([ids]))[0, -1].double(), -1)
                z_first = float(lp[a_id] - lp[b_id])
                got = j.logit_order1 if order == 0 else -j.logit_order2
                assert got == pytest.approx(z_first, abs=1e-3)
        assert judge.stats.as_dict()["first_win_rate"] == 1.0
    finally:
        h.remove()


def test_tiny_random_judge_unparseable_replies_become_failures(tiny_backend):
    pairs, _ = _pairs(2)
    judge = PairwiseJudge(tiny_backend, template=TEMPLATE, max_new_tokens=6, max_attempts=2)
    js = judge.judge(pairs)
    for j in js:  # random bytes never form an answer: retried, then failed with the raw replies
        assert j.status == STATUS_FAILED and len(j.replies[0]) == 2 and len(j.errors) == 4


def test_mean_logprob_judge_is_order_independent(tiny_backend):
    pairs, _ = _pairs(4)
    judge = MeanLogprobJudge(tiny_backend)
    js = judge.judge(pairs)
    swapped = judge.judge([{**p, "response_a": p["response_b"], "response_b": p["response_a"]} for p in pairs])
    ref = tiny_backend.score([([{"role": "user", "content": p["prompt"]}], r) for p in pairs for r in (p["response_a"], p["response_b"])])
    for i, (j, s) in enumerate(zip(js, swapped)):
        sa, sb = ref[2 * i][0] / ref[2 * i][1], ref[2 * i + 1][0] / ref[2 * i + 1][1]
        assert j.logit == pytest.approx(sa - sb, abs=1e-9) and j.status == STATUS_OK
        assert s.logit == pytest.approx(-j.logit, abs=1e-9)
        assert j.p_order1 == j.p_order2
    assert judge.stats.contradictions == 0
    with pytest.raises(ValueError, match="score"):
        MeanLogprobJudge(TextJudgeServer(None))


def test_preference_transform_rows_and_margin(tiny_backend):
    # scale keeps the random model's large log-prob gaps inside the eps clamp of p
    t = PreferenceTransform(MeanLogprobJudge(tiny_backend, scale=0.05), beta=0.5, prompt_key="question", response_keys=("r1", "r2"))
    samples = [{"question": "hi", "r1": "hello", "r2": "go away", "id": 1}, {"question": "2+2?", "r1": "5", "r2": "4", "id": 2}]
    rows = [t(s) for s in samples]
    for s, r in zip(samples, rows):
        assert r["label_status"] == "ok" and r["id"] == s["id"] and r["prompt"] == s["question"]
        sa, sb = r["judge_scores"]
        assert (r["chosen"], r["rejected"]) == ((s["r1"], s["r2"]) if sa > sb else (s["r2"], s["r1"]))
        assert r["margin"] == pytest.approx(0.05 * abs(sa - sb) / 0.5, abs=1e-9)  # |logit(p)| / beta
        assert r["margin"] == pytest.approx(margin_from_prob(r["p_chosen"], 0.5), abs=1e-9) and r["margin"] > 0
    ds = datasets.Dataset.from_list(samples).map(t.map_batched, batched=True, batch_size=2)
    assert ds["chosen"] == [r["chosen"] for r in rows] and ds["margin"] == pytest.approx([r["margin"] for r in rows])
    with pytest.raises(ValueError, match="no field 'r1'"):
        t({"question": "x", "a": "y", "b": "z"})


def test_label_pairs_resume_after_interrupt(tmp_path):
    pairs, quality = _pairs(30, seed=4)
    out = tmp_path / "prefs.jsonl"
    server = LogprobJudgeServer(quality, bias=0.5)
    judge = PairwiseJudge(server, template=TEMPLATE)
    orig = judge.judge
    calls = {"n": 0}

    def crashing(ps):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(ps)

    judge.judge = crashing
    with pytest.raises(KeyboardInterrupt):
        label_pairs(pairs, judge, out, batch_size=7, progress=False)
    judge.judge = orig
    before = server.requests
    stats = label_pairs(pairs, judge, out, batch_size=7, progress=False)
    assert stats["resumed_labelled"] + stats["resumed_dropped"] == 14
    assert server.requests - before == 2 * (30 - 14)  # only the unsettled pairs are judged again
    rows = read_rows(out)
    dropped = read_rows(sidecar(out, "dropped"))
    keys = [r["key"] for r in rows + dropped]
    assert len(keys) == len(set(keys)) == 30
    for r in rows:
        t = quality[r["chosen"]] - quality[r["rejected"]]
        assert t > 0 and r["margin"] == pytest.approx(t, abs=1e-9)  # beta = 1: margin = logit(p)
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected", "margin"} <= set(ds.column_names) and len(ds) == len(rows)


def test_load_pairs_ids():
    rows = [{"prompt": "p", "response1": "x", "response2": "y"}, {"prompt": "p", "response1": "x", "response2": "z", "id": 7}]
    ps = load_pairs(rows)
    assert ps[1]["pair_id"] == "7" and ps[0]["pair_id"] != ps[1]["pair_id"] and ps[0]["response_b"] == "y"
    with pytest.raises(ValueError, match="duplicate"):
        load_pairs(rows + rows)


FACT_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has three legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue.", "On a clear day the sky is green."),
    ("What is 10 times 10?", "10 times 10 is 100.", "10 times 10 is 7."),
    ("Which planet do we live on?", "We live on Earth.", "We live on the Sun."),
    ("What do bees make?", "Bees make honey.", "Bees make steel."),
]


@pytest.mark.slow
def test_smollm2_judges_position_bias_and_mean_logprob(smollm2_backend):
    """The real 135M judge: "A or B" shows position bias (contradictions, dropped and counted);
    the mean-logprob judge is order-independent and prefers the correct fact."""
    pairs = [{"pair_id": str(i), "prompt": q, "response_a": good, "response_b": bad} for i, (q, good, bad) in enumerate(FACT_PAIRS)]
    pj = PairwiseJudge(smollm2_backend, max_new_tokens=4)
    js = pj.judge(pairs)
    st = pj.stats.as_dict()
    read = [j for j in js if j.status != STATUS_FAILED]
    assert read and all(j.source in ("logprobs", "parsed", "mixed") for j in read)
    assert st["contradictions"] == sum(j.logit_order1 * j.logit_order2 <= 0 and not (j.logit_order1 == j.logit_order2 == 0) for j in read)
    assert st["first_win_rate"] >= 0.75  # the small judge mostly answers "A", whatever is shown first
    assert st["position_bias_logit"] > 0

    mj = MeanLogprobJudge(smollm2_backend)
    mjs = mj.judge(pairs)
    assert all(j.status == STATUS_OK for j in mjs) and mj.stats.contradictions == 0
    assert sum(j.logit > 0 for j in mjs) >= 5  # the true statement is the likelier one
    assert mjs[0].logit > 0  # Paris over Berlin


def test_preference_transform_from_nested_config():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({
        "_component_": "fastrm.judge.transform.PreferenceTransform",
        "beta": 2.0,
        "judge": {
            "_component_": "fastrm.judge.judge.MeanLogprobJudge",
            "scale": 0.01,
            "backend": local_backend_node(),
        },
    })
    t = config.instantiate(cfg)
    r = t({"prompt": "hi", "response1": "hello", "response2": "bye"})
    assert r["label_status"] == "ok" and r["margin"] == pytest.approx(abs(r["judge_logit"]) / 2.0)
