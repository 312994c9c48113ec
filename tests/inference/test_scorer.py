"""RewardScorer: packed prompt-once rewards equal an independent float64 padded scorer, in input
order, for every row format; prompt-once equals each response alone; errors name row and
column."""

from __future__ import annotations

import random

import pytest
import torch

import fastrm
from fastrm.inference import RewardScorer, parse_row
from scoring_ref import WORDS, _text, conversations_of, flat_rewards, random_rows, reference_rewards

@pytest.mark.parametrize("seed,batch_tokens", [(0, 4096), (1, 360), (2, 500)])
def test_rewards_equal_float64_padded_reference(byte_model, byte_tok, seed, batch_tokens):
    rows = random_rows(seed)
    scorer = RewardScorer(byte_model, byte_tok, batch_tokens=batch_tokens, chunk_tokens=700)
    out = scorer.score(rows)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for a, b in zip(rows, out):  # every input column kept unchanged
        assert {k: v for k, v in b.items() if k not in ("reward", "rewards")} == a
        assert ("rewards" in b) == ("responses" in a)
        if "responses" in a:
            assert len(b["rewards"]) == len(a["responses"])
    ref = reference_rewards(byte_model, byte_tok, conversations_of(rows))
    torch.testing.assert_close(torch.tensor(flat_rewards(out), dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-4)
    if batch_tokens < 400:  # several forwards, best-of-N groups split across them
        assert scorer.stats["forwards"] > 3
    assert scorer.stats["prompt_tokens_saved"] > 0


def test_rewards_equal_reference_with_hf_chat_template(chatml_model, chatml_tok):
    rows = random_rows(5, n=16)
    out = RewardScorer(chatml_model, chatml_tok, batch_tokens=512).score(rows)
    ref = reference_rewards(chatml_model, chatml_tok, conversations_of(rows))
    torch.testing.assert_close(torch.tensor(flat_rewards(out), dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-4)


def test_prompt_once_equals_each_response_alone(byte_model, byte_tok):
    rng = random.Random(7)
    rows = [{"prompt": _text(rng, 20, 60), "responses": [_text(rng, 0, 20) for _ in range(8)]}
            for _ in range(6)]
    scorer = RewardScorer(byte_model, byte_tok, batch_tokens=2048)
    grouped = scorer.score(rows)
    assert scorer.stats["prompt_tokens_saved"] > 0
    alone = RewardScorer(byte_model, byte_tok, batch_tokens=2048).score(
        [{"prompt": r["prompt"], "response": x} for r in rows for x in r["responses"]])
    torch.testing.assert_close(torch.tensor(flat_rewards(grouped)),
                               torch.tensor([r["reward"] for r in alone]), rtol=0, atol=1e-5)


def test_empty_response_scored_and_api_exported(byte_model, byte_tok):
    assert fastrm.RewardScorer is RewardScorer
    out = fastrm.RewardScorer(byte_model, byte_tok).score(
        [{"prompt": "q", "response": ""}, {"prompt": "q", "responses": ["", "a"]}])
    assert out[0]["reward"] == pytest.approx(out[1]["rewards"][0], abs=1e-5)
    assert out[1]["rewards"][0] != pytest.approx(out[1]["rewards"][1], abs=1e-6)


def test_normalize(byte_model, byte_tok):
    rows = random_rows(3, n=8)
    raw = flat_rewards(RewardScorer(byte_model, byte_tok).score(rows))
    norm = flat_rewards(RewardScorer(byte_model, byte_tok, normalize=True, reward_mean=0.25,
                                     reward_std=2.0).score(rows))
    torch.testing.assert_close(torch.tensor(norm), (torch.tensor(raw) - 0.25) / 2.0)
    with pytest.raises(ValueError, match="reward_mean and reward_std"):
        RewardScorer(byte_model, byte_tok, normalize=True)
    with pytest.raises(ValueError, match="positive std"):
        RewardScorer(byte_model, byte_tok, normalize=True, reward_mean=0.0, reward_std=0.0)


@pytest.mark.parametrize("row,match", [
    ({"prompt": "q", "response": 3}, r"row 0, column 'response' is a number"),
    ({"prompt": "q", "response": None}, r"row 0, column 'response' is null"),
    ({"prompt": True, "response": "a"}, r"row 0, column 'prompt' is a boolean"),
    ({"prompt": None, "response": "a"}, r"row 0, column 'prompt' is null"),
    ({"prompt": "q", "responses": ["a", 1.5]}, r"row 0, column 'responses\[1\]' is a number"),
    ({"prompt": "q", "responses": []}, "non-empty list"),
    ({"prompt": "q", "responses": "a"}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message has role 'user'"),
    ({"messages": []}, "empty or null"),
    ({"messages": [{"role": "assistant", "content": 5}]}, "message 0 content is a number"),
    ({"prompt": "q"}, "none of 'response'"),
    ({"prompt": "q", "response": "a", "responses": ["b"]}, "more than one"),
    ({"prompt": "q", "response": "a", "reward": 1.0}, "already has a 'reward' column"),
    ({"messages": [{"role": "assistant", "content": "a"}], "prompt": "q"}, "both 'messages'"),
    ("text", "not an object"),
])
def test_bad_rows_name_row_and_column(row, match):
    with pytest.raises(ValueError, match=match):
        parse_row(row, 0)


def test_too_long_rows_are_errors_naming_the_row(byte_model, byte_tok):
    scorer = RewardScorer(byte_model, byte_tok, batch_tokens=64)
    with pytest.raises(ValueError, match=r"row 1: prompt \+ response is \d+ tokens, more than "
                                         r"batch_tokens=64; raise --batch-tokens"):
        scorer.score([{"prompt": "q", "response": "a"}, {"prompt": "x" * 80, "response": "a"}])
    long_ok = RewardScorer(byte_model, byte_tok, batch_tokens=4096)  # model max_seq_len=1024
    with pytest.raises(ValueError, match="more than the model's max_seq_len=1024"):
        long_ok.score([{"prompt": "x" * 1100, "response": "a"}])


def test_rendered_texts_share_prompts_and_equal_conversations(chatml_model, chatml_tok):
    """OpenRLHF queries: rendered texts score as their conversations do; texts of one prompt
    share it (computed once)."""
    rng = random.Random(9)
    convs = []
    for _ in range(4):
        prompt = [{"role": "user", "content": _text(rng, 20, 40)}]
        convs += [prompt + [{"role": "assistant", "content": _text(rng, 0, 10)}] for _ in range(3)]
    rng.shuffle(convs)
    texts = [chatml_tok.render(c) for c in convs]
    scorer = RewardScorer(chatml_model, chatml_tok)
    groups, where = scorer.tokenize_texts(texts)
    assert len(groups) == 4 and all(len(g.prompt_tokens) >= 16 for g in groups)
    got = scorer.score_texts(texts)
    assert scorer.stats["prompt_tokens_saved"] > 0
    ref = reference_rewards(chatml_model, chatml_tok, convs)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="query 1 is a int"):
        scorer.tokenize_texts(["a", 3])


def test_text_tokens_strips_padding_it_can_tell_apart():
    from fastrm.inference import text_tokens

    class Tok:  # ids are the characters' codes; "P" pads, "E" ends a turn
        pad_id, eos_id, end_token_id = ord("P"), ord("E"), ord("E")

        def encode_rendered(self, text):
            return [ord(c) for c in text]

    tok = Tok()
    assert text_tokens(tok, "PPabcEPP") == [ord(c) for c in "abcE"]
    tok.pad_id = ord("E")  # pad == end of turn: trailing "pads" are the sequence's own end
    assert text_tokens(tok, "EabE") == [ord(c) for c in "abE"]
    with pytest.raises(ValueError, match="no token"):
        text_tokens(Tok(), "PPP")
