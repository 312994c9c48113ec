"""Resume from the sharded (DCP) training state on another number of ranks: the state saved
at step 4 of a 6-step run (2 epochs of 3, base weights from an HF checkpoint) by N ranks,
loaded by M ranks, continues with the losses of the uninterrupted run (2 -> 1 by default;
2 -> 2 and 1 -> 2 are slow tests). N ranks with ``rows_per_step = r`` see the rows of one rank
with ``rows_per_step = N * r``, so every run trains on the same global batches."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.models.random_hf import write_random_llama_checkpoint
from fastrm.recipes.reward_model import RewardModelRecipe
from fixtures.recipes import run_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml"
ARCH = dict(vocab_size=261, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=2048)
GLOBAL_ROWS = 2


def cfg_for(tmp_path: Path, name: str, world: int, **overrides):
    base = tmp_path / "base"
    ckpt = (write_random_llama_checkpoint(base, seed=11, layers_per_file=1, **ARCH)
            if not (base / "config.json").exists() else None)
    cfg = OmegaConf.load(TINY)
    values = {
        "output_dir": str(tmp_path / name),
        "dataset.num_prompts": 120, "validation_dataset.num_prompts": 40,
        "dataset.length_scale": 0.15, "validation_dataset.length_scale": 0.15,
        "dataset.max_seq_len": 256, "validation_dataset.max_seq_len": 256,
        "packing.max_seq_len": 512, "packing.rows_per_step": GLOBAL_ROWS // world,
        "epochs": 2, "max_steps_per_epoch": 3, "save_every_n_steps": 2,
        "fsdp_reshard_after_forward": False, "num_threads": 1,
        "checkpointer": ckpt or json.loads((tmp_path / "ckpt.json").read_text()),
        # the checkpoint's own (byte-level) tokenizer: the run exports an HF reward model
        "tokenizer": {"_component_": "fastrm.models.tokenizer.hf_tokenizer", "path": str(base)},
    }
    if ckpt is not None:
        (tmp_path / "ckpt.json").write_text(json.dumps(ckpt))
    values.update(overrides)
    for k, v in values.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def run(cfg, world: int) -> list[dict]:
    """Runs the recipe (in this process for 1 rank, ``tune run`` for more); its history."""
    if world == 1:
        recipe = run_recipe(cfg)
    else:
        path = Path(cfg.output_dir + ".yaml")
        OmegaConf.save(cfg, path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(["python3", "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", str(world),
                               "fastrm/recipes/reward_model.py", "--config", str(path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((Path(cfg.output_dir) / "history.json").read_text())


def resume_copy(tmp_path: Path, src: str, dst: str, tag: str = "step_4") -> None:
    """``dst``: the run ``src`` as it stood after saving ``tag`` (later checkpoints and the
    history removed, ``latest`` pointing at ``tag``)."""
    shutil.copytree(tmp_path / src, tmp_path / dst, symlinks=True)
    for p in (tmp_path / dst).iterdir():
        if p.name not in (tag, "logs"):
            (shutil.rmtree if p.is_dir() and not p.is_symlink() else os.unlink)(p)
    (tmp_path / dst / "latest").symlink_to(tag)


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported HF directory, single file or shards (as its index lists)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


def check_resume(tmp_path: Path, save_world: int, load_world: int) -> None:
    want = run(cfg_for(tmp_path, "one", 1), 1)
    # the saver writes its HF reward models in shards (max_shard_size), gathered tensor by tensor
    saver = run(cfg_for(tmp_path, "saver", save_world, max_shard_size="40KB"), save_world)
    assert (tmp_path / "saver" / "step_4" / "training_state" / ".metadata").exists()
    assert len(list((tmp_path / "saver" / "step_4" / "training_state").glob("*.distcp"))) == save_world
    resume_copy(tmp_path, "saver", "resumed")
    got = run(cfg_for(tmp_path, "resumed", load_world, resume_from_checkpoint=True), load_world)
    assert [h["step"] for h in got] == list(range(1, 7))
    loss = lambda hist: torch.tensor([h["loss"] for h in hist])  # noqa: E731
    # the saver (N ranks) is the uninterrupted run on N ranks; steps 5-6 ran after the resume
    torch.testing.assert_close(loss(saver), loss(want), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss(got), loss(want), rtol=1e-4, atol=1e-5)
    assert loss(want)[-1] != loss(want)[0]
    # the final HF reward models (gathered onto rank 0 one tensor at a time) agree too
    assert len(json.loads((tmp_path / "saver" / "epoch_1" / "model.safetensors.index.json")
                          .read_text())["weight_map"]) > 0
    assert not (tmp_path / "saver" / "epoch_1" / "model.safetensors").exists()
    ref = hf_weights(tmp_path / "one" / "epoch_1")
    for run_dir in ("saver", "resumed"):
        got_sd = hf_weights(tmp_path / run_dir / "epoch_1")
        assert set(got_sd) == set(ref) and "score.weight" in ref
        for k, v in ref.items():
            torch.testing.assert_close(got_sd[k], v, rtol=1e-4, atol=1e-5, msg=f"{run_dir}: {k}")


def test_state_saved_on_two_ranks_resumes_on_one(tmp_path):
    check_resume(tmp_path, save_world=2, load_world=1)


@pytest.mark.slow
def test_state_saved_on_two_ranks_resumes_on_two(tmp_path):
    check_resume(tmp_path, save_world=2, load_world=2)


@pytest.mark.slow
def test_state_saved_on_one_rank_resumes_on_two(tmp_path):
    check_resume(tmp_path, save_world=1, load_world=2)


def test_resume_with_another_global_batch_is_refused(tmp_path):
    run(cfg_for(tmp_path, "one", 1, epochs=1, max_steps_per_epoch=2), 1)
    cfg = cfg_for(tmp_path, "one", 1, epochs=1, max_steps_per_epoch=2, resume_from_checkpoint=True,
                  **{"packing.rows_per_step": 1})
    recipe = RewardModelRecipe(cfg)
    with pytest.raises(ValueError, match=r"took 2 packed rows.*set packing.rows_per_step=2"):
        recipe.setup(cfg)


def test_max_shard_size_key(tmp_path):
    """``max_shard_size``: the exported HF reward model is sharded as transformers shards it and
    holds the trained model's weights; a bad value fails at setup, before training."""
    import transformers

    from fastrm.hf.families import to_hf

    cfg = cfg_for(tmp_path, "sharded", 1, max_shard_size=30_000, epochs=1, max_steps_per_epoch=1,
                  save_every_n_steps=None, validation_dataset=None)
    recipe = run_recipe(cfg)
    out = tmp_path / "sharded" / "epoch_0"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    want = to_hf({k: v.detach() for k, v in recipe.model.state_dict().items()},
                 json.loads((tmp_path / "base" / "config.json").read_text()))
    got = hf_weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].contiguous()) for k in want)
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    bad = cfg_for(tmp_path, "bad", 1, max_shard_size="lots")
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        RewardModelRecipe(bad).setup(bad)
