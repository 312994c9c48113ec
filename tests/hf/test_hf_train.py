"""``fastrm init --from HF_DIR`` + ``fastrm train`` for tiny random models of every family written
by transformers' ``save_pretrained``; the saved checkpoint is an HF reward model whose rewards in
transformers equal fastrm's. A save that fails half way loses nothing; a conversion that cannot
work fails at ``setup()``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm import cli
from fastrm.hf import load_reward_model
from fastrm.hf.init import init_config
from fastrm.recipes.reward_model import RewardModelRecipe
from fixtures.hf_models import FAMILIES, build_model_dir, check_hf_rewards
from fixtures.hf_tokenizers import conversations

import transformers  # the reference (dev extra, installed by make test)

SMALL = ["max_steps_per_epoch=2", "dataset.num_prompts=24", "validation_dataset.num_prompts=16",
         "dataset.length_scale=0.1", "validation_dataset.length_scale=0.1", "num_threads=1",
         "optimizer.lr=1e-3"]


def init_yaml(src: Path, tmp_path: Path, **kw) -> Path:
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(init_config(str(src), output_dir=str(tmp_path / "run"), max_seq_len=256,
                               device="cpu", **kw))
    return cfg


@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_init_train_save_per_family(family, tmp_path):
    src = build_model_dir(family, tmp_path / "base")
    cfg = init_yaml(src, tmp_path)
    text = cfg.read_text()
    assert f"decoder: fastrm.hf.families.{ 'llama' if family == 'mistral' else family}" in text
    with pytest.raises(SystemExit) as done:  # the recipe's entry point exits like `tune run`
        cli.main(["train", "--config", str(cfg), *SMALL])
    assert done.value.code in (None, 0)
    out = tmp_path / "run" / "latest"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"][0].endswith("ForSequenceClassification") and "mean" in saved
    check_hf_rewards(out)
    # trained weights, not the base ones
    base = transformers.AutoModelForCausalLM.from_pretrained(str(src)).model.state_dict()
    new = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).model.state_dict()
    assert any(not torch.equal(base[k], new[k]) for k in base)


@pytest.mark.slow  # two interpreter start-ups with torch + transformers: ~90 s on 2 busy cores
def test_fastrm_init_and_train_command_lines(tmp_path):
    """The commands the README gives, as subprocesses: ``fastrm init ... > rm.yaml`` then
    ``fastrm train --config rm.yaml max_steps_per_epoch=2`` exits 0."""
    src = build_model_dir("qwen2", tmp_path / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = subprocess.run([sys.executable, "-m", "fastrm.cli", "init", "--from", str(src),
                           "--output-dir", str(tmp_path / "run"), "--max-seq-len", "256",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert init.returncode == 0, init.stderr[-2000:]
    (tmp_path / "rm.yaml").write_text(init.stdout)
    train = subprocess.run([sys.executable, "-m", "fastrm.cli", "train", "--config",
                            str(tmp_path / "rm.yaml"), *SMALL], capture_output=True, text=True,
                           env=env, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    check_hf_rewards(tmp_path / "run" / "epoch_0", n=4)
    bad = subprocess.run([sys.executable, "-m", "fastrm.cli", "init", "--from", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "config.json" in bad.stderr


def test_init_reads_sharded_and_sequence_classification_dirs(tmp_path):
    """A sharded reward model written by transformers continues training: its score.weight is
    the starting head, and the data file given with --data is the dataset."""
    one = build_model_dir("qwen3", tmp_path / "seqcls", seqcls=True)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(one))
    src = tmp_path / "sharded"
    hf.save_pretrained(str(src), max_shard_size="60KB")
    transformers.AutoTokenizer.from_pretrained(str(one)).save_pretrained(str(src))
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    data = tmp_path / "pairs.jsonl"
    rows = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no"}]}
            for c in conversations(4, 24)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    cfg = init_yaml(src, tmp_path, data=str(data))
    text = cfg.read_text()
    assert "source: json" in text and "validation_dataset" not in text
    conf = OmegaConf.load(cfg)
    recipe = RewardModelRecipe(conf)
    recipe.setup(conf)
    assert torch.equal(recipe.model.head.weight.detach(), hf.score.weight.detach())
    recipe.train()
    recipe.cleanup()
    check_hf_rewards(tmp_path / "run" / "latest", n=4)


def test_init_refuses_what_it_cannot_train(tmp_path):
    src = build_model_dir("llama", tmp_path / "base")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="phi3")))
    with pytest.raises(ValueError, match="model_type 'phi3' .* not supported"):
        init_config(str(src))
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        init_config(str(src))


def test_init_bf16_config_keeps_small_updates(tmp_path):
    """``fastrm init --device cuda`` writes ``dtype: bf16``; its optimizer, applied to bf16
    weights at the config's lr, must move them as AdamW in float64 would (on average): plain
    ``torch.optim.AdamW`` rounds every one of these updates back to the old weight."""
    from torchtune import config as tt_config

    src = build_model_dir("llama", tmp_path / "base")
    conf = OmegaConf.create(init_config(str(src), device="cuda"))
    assert conf.dtype == "bf16"
    w = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = tt_config.instantiate(conf.optimizer, [w])
    steps, lr = 200, float(conf.optimizer.lr)
    for _ in range(steps):
        w.grad = torch.ones_like(w)  # constant gradient: every AdamW step is lr (float64 reference)
        opt.step()
    assert float(conf.optimizer.weight_decay) == 0.0
    expected = 1.0 - steps * lr
    assert abs(w.detach().double().mean().item() - expected) < 0.1 * steps * lr


def _recipe(tmp_path: Path, src: Path, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(init_yaml(src, tmp_path)), OmegaConf.from_dotlist(SMALL))
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return RewardModelRecipe(cfg), cfg


def test_unusable_conversion_fails_at_setup(tmp_path, monkeypatch):
    """A family whose conversion does not give transformers' keys fails in setup(), before any
    training step (the Qwen2-saved-with-the-Llama-converter crash of issue 19)."""
    from fastrm.hf import families

    src = build_model_dir("qwen2", tmp_path / "base")
    broken = dataclasses.replace(families.FAMILIES["qwen2"], tune_to_hf=families._permuted_tune_to_hf)
    monkeypatch.setitem(families.FAMILIES, "qwen2", broken)
    recipe, cfg = _recipe(tmp_path, src)
    with pytest.raises(ValueError, match="qwen2: a torchtune key has no HF name"):
        recipe.setup(cfg)
    assert not (tmp_path / "run" / "latest").exists()


def test_failure_mid_save_keeps_the_previous_checkpoint_and_resume_works(tmp_path, monkeypatch):
    from fastrm.hf import export

    src = build_model_dir("llama", tmp_path / "base")
    recipe, cfg = _recipe(tmp_path, src, save_every_n_steps=1)
    recipe.setup(cfg)
    run = tmp_path / "run"
    real = export._copy_tokenizer
    calls = {"n": 0}

    def fail_on_second_save(*args, **kwargs):  # model.safetensors + config.json are written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "_copy_tokenizer", fail_on_second_save)
    with pytest.raises(OSError, match="injected"):
        recipe.train()
    assert os.readlink(run / "latest") == "step_1" and not (run / "step_2").exists()
    step1 = run / "step_1"
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_state",
            "reward_stats.json"} <= {p.name for p in step1.iterdir()}
    assert (step1 / "training_state" / ".metadata").is_file()
    check_hf_rewards(step1, n=4)
    monkeypatch.setattr(export, "_copy_tokenizer", real)
    resumed, cfg2 = _recipe(tmp_path, src, save_every_n_steps=1, resume_from_checkpoint=True)
    resumed.setup(cfg2)
    assert resumed.global_step == 1
    resumed.train()
    resumed.cleanup()
    assert resumed.global_step == 2 and os.readlink(run / "latest") == "epoch_0"
    assert not list(run.glob(".*partial")) and not list(run.glob(".*.old"))
    check_hf_rewards(run / "latest", n=4)
