"""`fastrm generate` / `fastrm judge` entry points end to end (tiny model), and the shipped configs."""

from __future__ import annotations

import importlib
import json

import datasets
import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tiny_backend import local_backend_node

from fastrm.config import CONFIGS_DIR
from fastrm.judge.cli import main_generate, main_judge
from fastrm.judge.store import read_rows

TINY_BACKEND = OmegaConf.to_yaml({"backends": {"tiny": local_backend_node(seed=1, max_batch_size=4)}})


def test_generate_then_judge_with_calibrated_beta(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": q}) + "\n"
                               for i, q in enumerate(["hi", "what is 2+2?", "name a colour"])))
    gen_cfg = tmp_path / "gen.yaml"
    gen_cfg.write_text(TINY_BACKEND + f"""
prompts: {{path: {prompts}}}
output: {tmp_path}/gen.jsonl
batch_size: 4
progress: false
models:
  - {{name: strong, backend: tiny, strength: 2, sampling: {{temperature: 0.0, max_new_tokens: 6}}}}
  - {{name: weak, backend: tiny, strength: 1, sampling: {{temperature: 1.0, max_new_tokens: 6, n: 2, seed: 4}}}}
""")
    assert main_generate(["--config", str(gen_cfg), "batch_size=2"]) == 0
    gen = read_rows(tmp_path / "gen.jsonl")
    assert len(gen) == 3 * (1 + 2) and {r["model"] for r in gen} == {"strong", "weak"}

    # calibration set: simulated judgements with a known beta
    g = torch.Generator().manual_seed(0)
    d = torch.randn(4000, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(2.0 * d), generator=g)
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"score_diff": float(a), "label": float(b)}) + "\n" for a, b in zip(d, y)))

    judge_cfg = tmp_path / "judge.yaml"
    judge_cfg.write_text(TINY_BACKEND + f"""
judge: {{_component_: fastrm.judge.judge.MeanLogprobJudge, backend: tiny, scale: 0.05}}
input:
  path: {tmp_path}/gen.jsonl
  kind: generations
  pairing: {{strategy: strong_vs_weak, strengths: {{strong: 2, weak: 1}}}}
output: {tmp_path}/prefs.parquet
beta: 1.0
calibration: {{path: {cal}, diff_key: score_diff, label_key: label}}
batch_size: 3
progress: false
""")
    assert main_judge(["--config", str(judge_cfg)]) == 0
    stats = json.loads((tmp_path / "prefs.parquet.journal.stats.json").read_text())
    beta = stats["beta_fit"]["beta"]
    assert abs(beta - 2.0) < 4 * stats["beta_fit"]["stderr"] and stats["beta"] == beta
    rows = read_rows(tmp_path / "prefs.parquet")
    assert stats["pairing"]["candidate_pairs"] == 3 * 2  # strong x weak responses per prompt
    assert len(rows) == stats["labelled"] == stats["pairs"] - stats["dropped"]
    for r in rows:
        z = r["judge_logit"]
        assert r["margin"] == pytest.approx(abs(z) / beta, rel=1e-9)  # margin = |logit(p)| / beta
        assert {r["model_chosen"], r["model_rejected"]} == {"strong", "weak"}
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "prefs.parquet"), split="train")
    assert {"prompt", "chosen", "rejected", "margin"} <= set(ds.column_names)


def test_judge_explicit_pairs_and_bad_config(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "response1": "hello", "response2": "bye"}) + "\n")
    cfg = tmp_path / "j.yaml"
    cfg.write_text(TINY_BACKEND + f"""
judge: {{_component_: fastrm.judge.judge.MeanLogprobJudge, backend: tiny, scale: 0.01}}
input: {{path: {pairs}, kind: pairs}}
output: {tmp_path}/out.jsonl
progress: false
""")
    assert main_judge(["--config", str(cfg)]) == 0
    row = read_rows(tmp_path / "out.jsonl")[0]
    assert {row["chosen"], row["rejected"]} == {"hello", "bye"} and row["margin"] > 0
    with pytest.raises(ValueError, match="not defined under backends"):
        main_judge(["--config", str(cfg), "judge.backend=nope"])
    with pytest.raises(ValueError, match="input.kind"):
        main_judge(["--config", str(cfg), "input.kind=other"])
    with pytest.raises(SystemExit):
        main_judge(["--config", "no_such_config"])


def _components(node, out):
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            if k == "_component_":
                out.append(v)
            else:
                _components(v, out)
    elif isinstance(node, ListConfig):
        for v in node:
            _components(v, out)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS_DIR.glob("*.yaml") if p.name.startswith(("generate_", "judge_"))))
def test_shipped_configs_resolve(name):
    cfg = OmegaConf.load(CONFIGS_DIR / name)
    comps = _components(cfg, [])
    assert comps
    for c in comps:
        mod, attr = c.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), attr), c
    assert "output" in cfg and ("models" in cfg or "judge" in cfg)
