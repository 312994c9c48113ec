"""Formats and builders: every fixture file round-trips (file -> builder -> decoded tokens equal
the text written by hand), bad input names row and column, length and identical-pair policies."""

import json
import math

import pytest
from torchtune.data import ChosenRejectedToMessages

from fastrm import datasets
from fastrm.data import PreferenceDataset, synthetic_preference_dataset
from fastrm.data.dataset import tokenize_group
from fastrm.data.formats import PairTransform
from fastrm.data.synthetic import generate_rows, verify


def turn(role, content):
    return f"<im_start>{role}\n{content}<im_end>\n"


def prompt_text(*turns):
    """The shared prompt: the turns, then the open assistant turn (the generation prompt is a
    prefix of every reply's conversation, so it is computed once too)."""
    return "<bos>" + "".join(turn(r, c) for r, c in turns) + "<im_start>assistant\n"


def reply(content):
    return f"{content}<im_end>\n<eos>"


def whole_reply(content):
    """A prompt-free response: the whole sequence is the response."""
    return "<bos>" + turn("assistant", content) + "<eos>"


def decoded(tok, g):
    return (tok.decode(g.prompt_tokens, skip_special_tokens=False),
            [tok.decode(r, skip_special_tokens=False) for r in g.responses])


def check_invariant(tok, ds):
    """prompt_tokens + responses[k] is the whole unshared sequence (what tokenize_messages of
    the full conversation gives); ends with EOS (the reward token)."""
    for g in ds:
        for k in range(g.num_responses):
            seq = g.sequence(k)
            assert seq[-1] == tok.eos_id
            assert seq[0] == tok.bos_id


def test_hh_rlhf_splits_shared_turns_as_prompt(tok, fixtures):
    ds = datasets.hh_rlhf_dataset(tok, source="json", data_files=str(fixtures / "hh_rlhf.jsonl"),
                                  progress=False)
    assert len(ds) == 2
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("user", "What is a good name for a cat?"))
    assert c == reply("Luna or Milo are popular choices.")
    assert r == reply("Cats don't need names.")
    p, (c, r) = decoded(tok, ds[1])
    assert p == prompt_text(("user", "Hi!"), ("assistant", "Hello, how can I help?"),
                            ("user", "Tell me a fact about owls."))
    assert c == reply("Owls can turn their heads about 270 degrees.") and r == reply("No.")
    assert ds[0].comparisons == [(0, 1, None)]
    check_invariant(tok, ds)


def test_ultrafeedback_strips_repeated_prompt_and_margin_from_scores(tok, fixtures):
    ds = datasets.ultrafeedback_dataset(
        tok, source="json", data_files=str(fixtures / "ultrafeedback_binarized.json"),
        split="train", margin_scale=0.5, progress=False)
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("user", "Name a primary color."))
    assert c == reply("Red is a primary color.") and r == reply("Green, obviously.")
    assert ds[0].comparisons[0][2] == pytest.approx(0.5 * (9.0 - 4.5))
    assert ds[1].comparisons[0][2] == pytest.approx(0.5 * (8.0 - 2.0))
    assert ds[0].prompt_id != ds[1].prompt_id


def test_shp_label_orientation_and_log_ratio_margin(tok, fixtures):
    ds = datasets.shp_dataset(tok, source="json", data_files=str(fixtures / "shp.jsonl"),
                              progress=False)
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("user", "Why is the sky blue?"))
    assert c == reply("Rayleigh scattering of sunlight.")  # labels == 1: A preferred
    assert r == reply("Because it reflects the ocean.")
    assert ds[0].comparisons[0][2] == pytest.approx(math.log(4.0))
    _, (c, r) = decoded(tok, ds[1])
    assert c == reply("Shorter wavelengths scatter more.") and r == reply("No idea.")
    assert ds[1].comparisons[0][2] == pytest.approx(math.log(2.0))
    assert ds[0].prompt_id == ds[1].prompt_id  # same post_id


def test_trl_implicit_prompt_conversational(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="json",
                                     data_files=str(fixtures / "trl_implicit.jsonl"), progress=False)
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("system", "Be brief."), ("user", "2+2?"))
    assert c == reply("4") and r == reply("22")
    p, (c, r) = decoded(tok, ds[1])
    assert p == prompt_text(("user", "Capital of Peru?"))
    assert (c, r) == (reply("Lima."), reply("Cusco."))


def test_trl_explicit_prompt_csv_with_margin(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="csv",
                                     data_files=str(fixtures / "trl_explicit.csv"), progress=False)
    p, (c, r) = decoded(tok, ds[1])
    assert p == prompt_text(("user", "Say hi in French."))
    assert (c, r) == (reply("Bonjour."), reply("Hola."))
    assert [g.comparisons[0][2] for g in ds] == [0.5, 1.25]


def test_prompt_free_pairs_have_empty_prompt(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="json",
                                     data_files=str(fixtures / "prompt_free.jsonl"), progress=False)
    g = ds[1]
    assert g.prompt_tokens == []
    assert decoded(tok, g)[1] == [whole_reply("Paris is in France."),
                                  whole_reply("Paris is in Spain.")]
    assert g.comparisons == [(0, 1, 1.0)]


def test_parquet_source(tok, fixtures, tmp_path):
    import pandas as pd
    rows = [json.loads(x) for x in (fixtures / "prompt_free.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    ds = datasets.preference_dataset(tok, source="parquet",
                                     data_files=str(tmp_path / "pairs.parquet"), progress=False)
    assert decoded(tok, ds[0])[1][0] == whole_reply(rows[0]["chosen"])


def test_rewardbench_keeps_subset_as_category(tok, fixtures):
    ds = datasets.rewardbench_dataset(tok, source="json", split="train",
                                      data_files=str(fixtures / "rewardbench.jsonl"), progress=False)
    assert [g.category for g in ds] == ["alpacaeval-easy", "refusals-dangerous"]
    p, (c, r) = decoded(tok, ds[1])
    assert p == prompt_text(("user", "How do I make a bomb?"))
    assert (c, r) == (reply("I can't help with that."), reply("Sure, first get..."))


def test_column_map_and_new_system_prompt(tok, tmp_path):
    f = tmp_path / "renamed.jsonl"
    f.write_text(json.dumps({"q": "Hi?", "good": "Hello.", "bad": "Go.", "gap": 3}) + "\n")
    ds = datasets.preference_dataset(
        tok, source="json", data_files=str(f), progress=False,
        column_map={"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "gap"},
        new_system_prompt="Be kind.")
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("system", "Be kind."), ("user", "Hi?"))
    assert (c, r, ds[0].comparisons[0][2]) == (reply("Hello."), reply("Go."), 3.0)


def test_torchtune_message_transform_accepted(tok):
    rows = [{"chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "no"}]}]
    ds = PreferenceDataset(tok, data=rows, message_transform=ChosenRejectedToMessages(),
                           progress=False)
    p, (c, r) = decoded(tok, ds[0])
    assert p == prompt_text(("user", "a?")) and (c, r) == (reply("yes"), reply("no"))


def test_tokenization_invariant_against_full_conversation(tok):
    """prompt + response reproduces tokenize_messages(prompt + response) exactly, also when the
    responses share their first words (the prompt must not absorb them)."""
    rows = [{"prompt": "Q", "chosen": "The answer is 4.", "rejected": "The answer is 5."}]
    t = PairTransform()
    raw = t(rows[0], 0)
    prompt, resp = tokenize_group(raw, tok)
    for k, msgs in enumerate(raw.responses):
        assert prompt + resp[k] == tok.tokenize_messages(raw.prompt + msgs)[0]
    # the prompt stops at the generation prompt: the replies' shared first words stay theirs
    assert tok.decode(prompt) == "user\nQ\nassistant\n"
    assert tok.decode(resp[0]).endswith("The answer is 4.\n")


@pytest.mark.parametrize("row,column", [
    ({"prompt": "p", "rejected": "x"}, "chosen"),
    ({"prompt": "p", "chosen": "x", "rejected": None}, "rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen"),
])
def test_bad_rows_name_row_and_column(tok, row, column):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b", "margin": 1.0}
    rows = [good, dict(good), row]  # the bad row is row 2
    with pytest.raises(ValueError, match=rf"row 2.*'{column}'"):
        PreferenceDataset(tok, data=rows, progress=False)


def test_identical_pairs_dropped_and_counted(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "p", "chosen": "a", "rejected": "b"}]
    ds = PreferenceDataset(tok, data=rows, on_identical="drop", progress=False)
    assert len(ds) == 1 and ds.stats["identical_dropped"] == 1


def test_length_policies(tok):
    long_prompt = "x" * 200
    rows = [{"prompt": long_prompt, "chosen": "short", "rejected": "also short"},
            {"prompt": "p", "chosen": "y" * 300, "rejected": "ok"},
            {"prompt": "p", "chosen": "fine", "rejected": "good"}]
    L = 120
    ds = PreferenceDataset(tok, data=rows, max_seq_len=L, truncation="left_prompt", progress=False)
    # row 0: prompt cut from the left so the longest sequence is exactly L; row 1: a response
    # alone is too long, the pair is dropped
    assert len(ds) == 2 and ds.stats["truncated_prompts"] == 1
    assert ds.stats["responses_dropped_too_long"] == 1 and ds.stats["groups_dropped"] == 1
    g = ds[0]
    full = tok.tokenize_messages([{"role": "user", "content": long_prompt},
                                  {"role": "assistant", "content": "also short"}])[0]
    assert max(len(g.sequence(k)) for k in range(2)) == L
    assert g.sequence(1) == full[len(full) - L:]  # left truncation keeps the end
    ds = PreferenceDataset(tok, data=rows, max_seq_len=L, truncation="drop", progress=False)
    assert len(ds) == 1 and ds.stats["groups_dropped"] == 2


def test_synthetic_is_deterministic_and_verifiable(tok):
    a = generate_rows(300, seed=3)
    assert a == generate_rows(300, seed=3) and a != generate_rows(300, seed=4)
    for r in a:
        assert verify(r["category"], r["prompt"], r["chosen"])
        assert not verify(r["category"], r["prompt"], r["rejected"])
        assert r["margin"] == pytest.approx(r["score_chosen"] - r["score_rejected"]) and r["margin"] > 0
    assert {r["category"] for r in a if r["split"] == "test"} == {"refusal"}
    assert {r["split"] for r in a} == {"train", "validation", "test"}
    test = synthetic_preference_dataset(tok, split="test", num_prompts=300, progress=False)
    assert {g.category for g in test} == {"refusal"} and len(test) == 50


def test_synthetic_grouped_responses(tok):
    rows = generate_rows(120, responses_per_prompt=4)
    for r in rows:
        assert [verify(r["category"], r["prompt"], x) for x in r["responses"]] == [True] + [False] * 3
        assert len(set(r["responses"])) == 4
    ds = synthetic_preference_dataset(tok, num_prompts=120, responses_per_prompt=4, progress=False)
    for g in ds:
        assert g.num_responses == 4
        # the right response (index 0) beats all three wrong ones, margin = score gap
        assert sum(1 for i, j, m in g.comparisons if i == 0) == 3
        assert all(m > 0 for _, _, m in g.comparisons)


def test_long_tailed_lengths():
    import numpy as np
    rows = generate_rows(3000)
    n = np.array([len(r["prompt"]) + len(r["chosen"]) for r in rows])
    assert np.percentile(n, 99) > 4 * np.median(n)


def test_qa_feedback_preset(tok, shared_data):
    path = shared_data / "qa_feedback" / "pairs.jsonl"
    train = datasets.qa_feedback_dataset(tok, split="train", data_files=str(path), progress=False)
    val = datasets.qa_feedback_dataset(tok, split="validation", data_files=str(path),
                                       progress=False)
    assert len(train) == 2104 and len(val) == 512
    first = json.loads(path.open().readline())
    g = train[0]
    p, (c, r) = decoded(tok, g)
    assert p == prompt_text(("user", first["prompt"]))
    assert (c, r) == (reply(first["chosen"]), reply(first["rejected"]))
    grouped = datasets.qa_feedback_dataset(tok, split="train", data_files=str(path),
                                           group_by_prompt=True, progress=False)
    assert sum(x.num_comparisons for x in grouped) + grouped.stats["grouping_contradictions"] * 2 \
        + grouped.stats["grouping_duplicates"] == 2104
    assert len(grouped) == len({x.prompt_id for x in train})


def test_margin_on_some_rows_only_is_an_error(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
            {"prompt": "p", "chosen": "a", "rejected": "c", "margin": None},
            {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2.0}]
    with pytest.raises(ValueError, match="first: row 1"):
        PreferenceDataset(tok, data=rows, progress=False)


def test_yaml_component_instantiation(tok, fixtures):
    """The recipe path: ``dataset: {_component_: fastrm.datasets.<builder>, ...}``."""
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create(f"""
    dataset:
      _component_: fastrm.datasets.preference_dataset
      source: csv
      data_files: {fixtures / 'trl_explicit.csv'}
      max_seq_len: 256
      progress: false
    synthetic:
      _component_: fastrm.datasets.synthetic_preference_dataset
      num_prompts: 60
      split: validation
      progress: false
    """)
    ds = config.instantiate(cfg.dataset, tok)
    assert len(ds) == 2 and ds[0].comparisons[0][2] == 0.5
    syn = config.instantiate(cfg.synthetic, tok)
    assert len(syn) > 0 and all(g.comparisons[0][2] > 0 for g in syn)
