"""Real data is not refused: empty responses are kept, counted, trained on and scored; non-text
cells (numbers, booleans, nulls, NaN) are a ValueError naming row and column."""

import json
import math

import pytest
import torch

from fastrm import RewardLoss, datasets
from fastrm.data import PreferenceDataset, collate_packed
from fastrm.data.formats import HHRLHFTransform, ScoredResponsesTransform, SHPTransform, \
    UnpairedTransform
from fastrm.models import reward_model, tiny_llama3

EMPTY_ROWS = 5  # tests/fixtures/empty_responses.jsonl: responses that are empty or whitespace only


def _train_step(ds, vocab_size: int, prefix_sharing: bool):
    """One optimizer step of a tiny reward model on every group of ``ds``: (loss, rewards, model
    before the step, batch)."""
    torch.manual_seed(0)
    model = reward_model(tiny_llama3(vocab_size=vocab_size, max_seq_len=512, embed_dim=32,
                                     num_heads=2, num_kv_heads=1))
    batch = collate_packed(list(ds), prefix_sharing=prefix_sharing)
    loss, rewards = RewardLoss().from_hidden(model(batch), model.head.weight, model.head.bias, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return loss.detach(), rewards.detach(), model, batch


def _check_scored(ds, model, rewards):
    """Each reward (packed, prompt shared) == the model on that response's whole sequence alone."""
    seqs = [g.sequence(k) for g in ds for k in range(g.num_responses)]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        ref = model.rewards_padded(tokens, lengths)
    torch.testing.assert_close(rewards, ref, rtol=1e-4, atol=1e-4)


def test_empty_responses_kept_counted_and_trained(tok, fixtures):
    ds = datasets.preference_dataset(tok, source="json", progress=False,
                                     data_files=str(fixtures / "empty_responses.jsonl"))
    assert len(ds) == 6 and ds.stats["empty_responses"] == EMPTY_ROWS
    g = ds[0]  # rejected "" still closes the template's assistant turn and has the end token
    assert tok.decode(g.responses[1], skip_special_tokens=False) == "<im_end>\n<eos>"
    for share in (True, False):
        loss, rewards, model, batch = _train_step(ds, tok.vocab_size, share)
        assert torch.isfinite(loss) and rewards.shape == (12,) and torch.isfinite(rewards).all()
    with torch.no_grad():  # scoring after the step: the empty responses' rewards are exact too
        _check_scored(ds, model, model.rewards(batch))


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    from fixtures.hf_tokenizers import build_tokenizer_dir
    return build_tokenizer_dir("smollm2", tmp_path_factory.mktemp("tok") / "smollm2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from fixtures.hf_tokenizers import build_tokenizer_dir
    return build_tokenizer_dir("llama3", tmp_path_factory.mktemp("tok") / "llama3")


def test_empty_responses_with_a_chat_template(chatml_dir, fixtures):
    from fastrm.models.tokenizer import HFChatTokenizer

    tok = HFChatTokenizer(chatml_dir)
    ds = datasets.preference_dataset(tok, source="json", progress=False,
                                     data_files=str(fixtures / "empty_responses.jsonl"))
    assert ds.stats["empty_responses"] == EMPTY_ROWS and len(ds) == 6
    g = ds[0]
    assert tok.decode(g.prompt_tokens).endswith("<|im_start|>assistant\n")  # the generation prompt
    assert tok.decode(g.responses[1]) == "<|im_end|>\n"  # "" : the turn's closing tokens
    loss, rewards, model, batch = _train_step(ds, tok.vocab_size, prefix_sharing=True)
    assert torch.isfinite(loss) and torch.isfinite(rewards).all()
    with torch.no_grad():
        _check_scored(ds, model, model.rewards(batch))


def test_empty_prompt_free_response_in_plain_mode_is_its_end_token(llama_dir, chatml_dir):
    """Plain mode: an empty prompt-free response is ``[bos] + [eos]`` (Llama) or ``[eos]``: never
    an empty segment for the packer."""
    from fastrm.models.tokenizer import HFChatTokenizer

    rows = [{"chosen": "", "rejected": "Something."}, {"chosen": "Yes", "rejected": " "}]
    for d in (llama_dir, chatml_dir):
        tok = HFChatTokenizer(d, chat=False)
        ds = PreferenceDataset(tok, data=rows, progress=False)
        assert ds.stats["empty_responses"] == 2
        empty = ds[0].responses[0]
        assert empty == ([tok.bos_id] if d == llama_dir else []) + [tok.eos_id]
        loss, rewards, _, _ = _train_step(ds, tok.vocab_size, prefix_sharing=True)
        assert torch.isfinite(loss) and torch.isfinite(rewards).all()


def test_a_tokenizer_with_no_token_for_an_empty_response_is_an_error():
    class NoEndTokenizer:  # encodes message bytes only: an empty response has no token
        def tokenize_messages(self, messages):
            ids = [b for m in messages for b in m.text_content.encode()]
            return ids, [False] * len(ids)

    with pytest.raises(ValueError, match=r"row 1, column 'rejected'.*no token"):
        PreferenceDataset(NoEndTokenizer(), data=[{"chosen": "a", "rejected": "b"},
                                                  {"chosen": "a", "rejected": ""}], progress=False)


GOOD = {"prompt": "ok", "chosen": "a", "rejected": "b"}
BAD_VALUES = [(7, "a number"), (2.5, "a number"), (True, "a boolean"), (False, "a boolean"),
              (None, r"null \(None\)"), (float("nan"), "NaN")]


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("value,kind", BAD_VALUES)
def test_non_text_cells_name_row_and_column(tok, column, value, kind):
    rows = [GOOD, dict(GOOD), {**GOOD, column: value}]
    with pytest.raises(ValueError, match=rf"row 2, column '{column}'.*{kind}.*(convert|text)"):
        PreferenceDataset(tok, data=rows, progress=False)


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("value,kind", BAD_VALUES)
def test_non_text_message_content_names_row_column_and_message(tok, column, value, kind):
    msgs = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    good = {k: [dict(m) for m in v] for k, v in msgs.items()}
    bad = {k: [dict(m) for m in v] for k, v in msgs.items()}
    bad[column][-1]["content"] = value
    k = len(bad[column]) - 1
    with pytest.raises(ValueError, match=rf"row 1, column '{column}': message {k} content is {kind}"):
        PreferenceDataset(tok, data=[good, bad], progress=False)


def test_non_text_cells_from_a_json_file(tok, tmp_path):
    """datasets keeps mixed JSON types as they are: the error still names row and column."""
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [GOOD, {**GOOD, "chosen": 5}]) + "\n")
    with pytest.raises(ValueError, match=r"row 1, column 'chosen' is a number \(5\)"):
        datasets.preference_dataset(tok, source="json", data_files=str(f), progress=False)
    f.write_text("\n".join(json.dumps(r) for r in [GOOD, {**GOOD, "rejected": None}]) + "\n")
    with pytest.raises(ValueError, match=r"row 1, column 'rejected'.*null"):
        datasets.preference_dataset(tok, source="json", data_files=str(f), progress=False)


def test_non_text_cells_in_other_formats(tok):
    with pytest.raises(ValueError, match=r"row 0, column 'responses\[1\]' is a boolean"):
        PreferenceDataset(tok, data=[{"prompt": "p", "responses": ["a", True], "scores": [1, 0]}],
                          transform=ScoredResponsesTransform(), progress=False)
    with pytest.raises(ValueError, match=r"row 0, column 'responses'.*list of responses.*a number"):
        ScoredResponsesTransform()({"prompt": "p", "responses": 3, "scores": [1]}, 0)
    with pytest.raises(ValueError, match=r"row 0, column 'completion' is NaN"):
        UnpairedTransform()({"prompt": "p", "completion": math.nan, "label": True}, 0)
    with pytest.raises(ValueError, match=r"row 0, column 'chosen' is a number"):
        HHRLHFTransform()({"chosen": 1.0, "rejected": "\n\nHuman: a\n\nAssistant: b"}, 0)
    with pytest.raises(ValueError, match=r"row 0, column 'human_ref_B' is null"):
        SHPTransform()({"history": "h", "human_ref_A": "a", "human_ref_B": None, "labels": 1,
                        "score_ratio": 2.0}, 0)
    with pytest.raises(ValueError, match=r"row 0, column 'labels'"):
        SHPTransform()({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": math.nan}, 0)


def test_lone_surrogates_name_row_and_column(tok):
    """JSON may escape half a UTF-16 pair ("\\ud800"; Python's json module reads it, pyarrow's
    refuses the file naming the row); no tokenizer can encode it. The data path and `fastrm
    score` name the row and column instead of failing inside the tokenizer."""
    rows = [GOOD, json.loads('{"prompt": "ok", "chosen": "a\\ud800b", "rejected": "b"}')]
    with pytest.raises(ValueError, match=r"row 1, column 'chosen'.*not valid Unicode.*\\ud800"):
        PreferenceDataset(tok, data=rows, progress=False)
    from fastrm.inference.rows import parse_row

    with pytest.raises(ValueError, match=r"row 3, column 'response'.*not valid Unicode"):
        parse_row({"prompt": "p", "response": "x\udfffy"}, 3)
    assert parse_row({"prompt": "p", "response": "ok \U0001F600 é"}, 0)  # real non-ASCII is fine
