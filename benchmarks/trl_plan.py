"""The plan both sides of ``bench_trl.py`` train on: the pairs in one order, their token ids
(TRL's own tokenization, checked against fastrm's), the reward head's initial values and the
length policies, for the qa-feedback train split or fastrm's synthetic long-tailed set.

Built once per data set by ``bench_trl.py`` and handed to every run (fastrm's and TRL's, each in
its own subprocess) as a pickle.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

#: fastrm configurations compared with TRL (see ``bench_trl.py``)
CONFIGS = ("packed", "prefix", "grouped")


def hf_chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids TRL trains on for one conversation (TRL's ``_tokenize``: ``apply_chat_template``
    with ``tokenize=True``, no generation prompt)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _conversational(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def qa_feedback_rows(path: Path, seed: int) -> list[dict[str, Any]]:
    """qa-feedback train pairs, prompts (questions) shuffled with ``seed``, pairs of a question
    kept together in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "train"]
    by_q: "OrderedDict[Any, list]" = OrderedDict()
    for i, r in enumerate(rows):
        by_q.setdefault(r["question_id"], []).append(
            {**_conversational(r["prompt"], r["chosen"], r["rejected"]), "prompt_id": r["question_id"],
             "row": i})
    order = list(by_q)
    random.Random(seed).shuffle(order)
    return [p for q in order for p in by_q[q]]


def synthetic_rows(num_prompts: int, length_scale: float, seed: int) -> list[dict[str, Any]]:
    """fastrm's synthetic long-tailed set, 4 scored responses per prompt expanded to every
    strictly ordered pair (up to 6 per prompt), prompts shuffled, pairs of a prompt together."""
    from fastrm.data.synthetic import generate_rows
    rows = [r for r in generate_rows(num_prompts, seed, responses_per_prompt=4, with_margin=False,
                                     length_scale=length_scale) if r["split"] == "train"]
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows:
        resp, sc = r["responses"], r["scores"]
        for i in range(len(resp)):
            for j in range(len(resp)):
                if sc[i] > sc[j] and resp[i] != resp[j]:
                    out.append({**_conversational(r["prompt"], resp[i], resp[j]),
                                "prompt_id": r["prompt_id"], "row": len(out)})
    return out


def make_plan(dataset: str, ds_cfg: dict, spec: dict, checkpoint_dir: str) -> dict[str, Any]:
    """Tokenizes the pairs with fastrm, checks them against ``apply_chat_template`` (TRL's
    tokenization), applies TRL's length filter and fastrm's length policy, draws the head."""
    from transformers import AutoTokenizer

    from fastrm.data.dataset import PreferenceDataset
    from fastrm.data.formats import PairTransform
    from fastrm.models.tokenizer import smollm2_tokenizer

    if dataset == "qa_feedback":
        from fastrm.data.dataset import default_shared_data_dir
        path = default_shared_data_dir() / "qa_feedback" / "pairs.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        rows = qa_feedback_rows(path, spec["seed"])
    else:
        rows = synthetic_rows(ds_cfg["num_prompts"], ds_cfg["length_scale"], spec["seed"])

    tok = smollm2_tokenizer(checkpoint_dir)
    transform = PairTransform({"prompt_id": "prompt_id"})
    fr = PreferenceDataset(tok, data=rows, transform=transform, on_identical="error",
                           progress=False)
    hf_tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    max_len = ds_cfg["max_length"]
    pairs, kept = [], []
    mismatched = 0
    for r, g in zip(rows, fr.groups):
        # TRL's tokens (apply_chat_template) are what both sides score; the prompt part is the
        # prompt's own template without its final "\n" (fastrm's split: up to the user's
        # <|im_end|>), the same for every pair of a prompt, so grouping can share it
        full = {s: hf_chat_ids(hf_tok, r["prompt"] + r[s]) for s in ("chosen", "rejected")}
        alone = hf_chat_ids(hf_tok, r["prompt"])[:-1]
        n = len(alone)
        if any(f[:n] != alone or len(f) <= n for f in full.values()):
            raise RuntimeError(f"row {r['row']}: the templated prompt is not a prefix of the pair")
        p = {"row": r["row"], "prompt_id": r["prompt_id"], "prompt": alone,
             "chosen": full["chosen"][n:], "rejected": full["rejected"][n:]}
        # fastrm's own tokenization of the same pair (apply_chat_template's ids, final "\n" included)
        mismatched += any(list(g.prompt_tokens) + list(g.responses[k]) != full[s]
                          for k, s in enumerate(("chosen", "rejected")))
        pairs.append(p)
        if max(len(p["prompt"]) + len(p[s]) for s in ("chosen", "rejected")) <= max_len:
            kept.append(p)
    # fastrm's own length policy on the same pairs (what fastrm would train on, nothing dropped)
    fr_trunc = PreferenceDataset(tok, data=rows, transform=transform, on_identical="error",
                                 max_seq_len=max_len, truncation="left_prompt", progress=False)
    # HF builds the embedding with padding_idx = config.pad_token_id: that row never gets a
    # gradient on the TRL side. SmolLM2's pad token is <|im_end|>, a real token of every turn,
    # so fastrm's side leaves that row's gradient out too (bench_trl.run_fastrm): the same update
    from transformers import AutoConfig
    padding_idx = AutoConfig.from_pretrained(checkpoint_dir).pad_token_id
    g = torch.Generator().manual_seed(spec["seed"])
    d = 576
    head = torch.randn(1, d, generator=g, dtype=torch.float64) / (d + 1) ** 0.5
    n_needed = (spec["warmup"] + spec["steps"]) * spec["batch_pairs"]
    if len(kept) < n_needed:
        raise ValueError(f"{dataset}: {len(kept)} pairs fit max_length={max_len}, the run needs "
                         f"{n_needed}; generate more or lower --steps")
    return {
        "dataset": dataset, "spec": {**spec, "max_length": max_len}, "rows": rows,
        "kept_pairs": kept, "checkpoint_dir": checkpoint_dir, "head_weight": head.float(),
        "embedding_padding_idx": padding_idx,
        "fastrm_tokenizer_mismatched_pairs": mismatched,
        "length_policy": {
            "pairs": len(pairs),
            "trl_dropped": len(pairs) - len(kept),
            "fastrm_left_prompt": {"dropped": fr_trunc.stats["comparisons_dropped_too_long"],
                                   "truncated_prompts": fr_trunc.stats["truncated_prompts"]},
        },
    }
