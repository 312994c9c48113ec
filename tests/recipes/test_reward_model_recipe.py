"""The reward-model recipe end to end on a tiny random Llama 3 and the synthetic set:
loss falls, two FSDP2 processes match one, save + resume reproduces the losses, bad configs
fail before training with the key named."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.training.config import ConfigError, validate_config
from fastrm.recipes.reward_model import RewardModelRecipe
from fixtures.recipes import run_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml"


def tiny_cfg(tmp_path: Path, **overrides) -> OmegaConf:
    cfg = OmegaConf.load(TINY)
    base = {
        "output_dir": str(tmp_path / "run"),
        "dataset.num_prompts": 160, "validation_dataset.num_prompts": 160,
        "dataset.length_scale": 0.15, "validation_dataset.length_scale": 0.15,
        "packing.max_seq_len": 512, "dataset.max_seq_len": 256,
        "validation_dataset.max_seq_len": 256,
        "metric_logger._component_": "torchtune.training.metric_logging.DiskLogger",
        "num_threads": 1,
    }
    base.update(overrides)
    for k, v in base.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def losses(recipe_or_dir) -> list[float]:
    if isinstance(recipe_or_dir, RewardModelRecipe):
        return [h["loss"] for h in recipe_or_dir.history]
    return [h["loss"] for h in json.loads((Path(recipe_or_dir) / "history.json").read_text())]


def test_loss_falls_and_checkpoint_is_complete(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps_per_epoch=None, epochs=2, **{"optimizer.lr": 3e-3,
                                                                    "packing.rows_per_step": 2})
    recipe = run_recipe(cfg)
    ls = losses(recipe)
    assert len(ls) >= 12
    first, last = sum(ls[:4]) / 4, sum(ls[-4:]) / 4
    assert last < first - 0.02, f"loss did not fall: first {first:.4f}, last {last:.4f}"
    for key in ("accuracy", "margin", "reward_mean", "reward_std", "tokens_per_second", "lr",
                "peak_rss_gib"):
        assert key in recipe.history[-1]
    out = Path(cfg.output_dir) / "latest"
    from safetensors.torch import load_file

    saved = load_file(str(out / "reward_model.safetensors"))  # no HF base: fastrm's keys
    want = recipe.model.state_dict()
    assert set(saved) == set(want) and "head.bias" not in saved
    for k, v in saved.items():
        torch.testing.assert_close(v, want[k].cpu())
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["reward_std"] > 0 and 0 <= stats["val_accuracy"] <= 1
    assert (out / "training_state" / ".metadata").exists()
    assert not list(Path(cfg.output_dir).glob(".*partial"))  # built aside, renamed into place


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_resume_reproduces_uninterrupted_losses(tmp_path, activation_checkpointing):
    common = {"max_steps_per_epoch": 6, "epochs": 2, "packing.rows_per_step": 2,
              "enable_activation_checkpointing": activation_checkpointing}
    full = run_recipe(tiny_cfg(tmp_path / "full", **common))
    # the same run with a checkpoint every 3 steps, killed right after the one at step 9
    part_cfg = tiny_cfg(tmp_path / "part", save_every_n_steps=3, **common)
    interrupted = RewardModelRecipe(part_cfg)
    interrupted.setup(part_cfg)
    _train_until(interrupted, stop_step=9)
    resumed = run_recipe(tiny_cfg(tmp_path / "part", resume_from_checkpoint=True, **common))
    want, got = losses(full), losses(resumed)
    assert len(got) == len(want) == 12
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    # steps 10-12 ran after the resume (model, optimizer, scheduler, data position restored)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-7)


def _train_until(recipe: RewardModelRecipe, stop_step: int) -> None:
    """Runs ``recipe.train`` and aborts right after the checkpoint of ``stop_step``."""

    class Crash(Exception):
        pass

    original = recipe.save_checkpoint

    def save_then_crash(tag, epoch_done):
        out = original(tag, epoch_done)
        if recipe.global_step == stop_step:
            raise Crash
        return out

    recipe.save_checkpoint = save_then_crash
    with pytest.raises(Crash):
        recipe.train()
    recipe.metric_logger.close()


def test_two_processes_match_one(tmp_path):
    """FSDP2 on 2 CPU ranks (gloo), 1 row per rank per step, equals 1 rank with 2 rows."""
    one = run_recipe(tiny_cfg(tmp_path / "one", max_steps_per_epoch=4,
                              **{"packing.rows_per_step": 2}))
    # parameters gathered in every forward and backward (no resharding in between): the same
    # step (the default, resharding, runs in tests/recipes/test_fastrm_cli.py)
    cfg2 = tiny_cfg(tmp_path / "two", max_steps_per_epoch=4, fsdp_reshard_after_forward=False,
                    **{"packing.rows_per_step": 1})
    path = tmp_path / "two.yaml"
    OmegaConf.save(cfg2, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["tune", "run", "--nproc_per_node", "2", "fastrm/recipes/reward_model.py",
         "--config", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FSDP2 over a cpu mesh of 2 ranks" in proc.stdout + proc.stderr
    two = losses(cfg2.output_dir)
    assert len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(losses(one)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("edit,match", [
    (lambda c: OmegaConf.update(c, "gradient_acumulation_steps", 2, force_add=True),
     "gradient_acumulation_steps.*did you mean 'gradient_accumulation_steps'"),
    (lambda c: c.pop("loss"), "missing the required section 'loss'"),
    (lambda c: OmegaConf.update(c, "packing.rows_per_stepp", 2, force_add=True), "packing.rows_per_stepp"),
    (lambda c: OmegaConf.update(c, "dtype", "fp16"), "dtype"),
])
def test_bad_config_names_the_key(tmp_path, edit, match):
    cfg = tiny_cfg(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=match):
        RewardModelRecipe(cfg)


def test_dataset_without_chosen_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": "a", "rejected": "b"})
                             for i in range(4)))
    cfg = tiny_cfg(tmp_path)
    cfg.dataset = OmegaConf.create({"_component_": "fastrm.datasets.preference_dataset",
                                    "source": "json", "data_files": str(bad), "progress": False})
    cfg.pop("validation_dataset")
    recipe = RewardModelRecipe(cfg)
    with pytest.raises(ValueError, match="chosen"):
        recipe.setup(cfg)
    assert not hasattr(recipe, "model")
    recipe.metric_logger.close()


def test_cross_prompt_training_attaches_prompt_embeddings(tmp_path):
    """loss.cross_prompt: every scored response carries its group's prompt embedding, steps
    hold similar prompts, and the recipe trains with the contrast loss."""
    from fastrm.data.cross_prompt import HashedNgramEmbedder
    from fastrm.data.tokenizer import ByteChatTokenizer
    from fastrm.training.step_data import build_step_data

    cfg = tiny_cfg(tmp_path, max_steps_per_epoch=3, **{"loss.cross_prompt": True,
                                                        "loss.use_margin": True,
                                                        "loss.temperature": 0.5})
    data = build_step_data(cfg, "dataset", ByteChatTokenizer(), 1, 0, seed=0, train=True)
    data.packed.set_epoch(0)
    batch = data.packed[1]
    emb = batch.prompt_embeddings
    assert emb.shape[0] == batch.reward_positions.shape[0]
    groups = data.packed.step_groups(1)
    want = HashedNgramEmbedder()(groups)
    k = 0
    for g, e in zip(groups, want):
        for _ in g.responses:
            torch.testing.assert_close(emb[k], e.float())
            k += 1
    assert k == emb.shape[0]
    recipe = run_recipe(cfg)
    assert len(recipe.history) == 3 and all(torch.isfinite(torch.tensor(losses(recipe))))


def test_evaluate_on_grouped_data_matches_direct_computation(tmp_path):
    """Eval statistics over groups of K > 2 responses: reward mean/std over every scored
    response (N != 2P), accuracy and margin per comparison, loss with the training normalizer."""
    from fastrm import RewardLoss
    from fastrm.data.tokenizer import ByteChatTokenizer
    from fastrm.datasets import synthetic_preference_dataset
    from fastrm.models import tiny_llama3_reward_model
    from fastrm.training.evaluation import evaluate
    from fastrm.training.model_setup import RewardModelStep
    from fastrm.training.step_data import StepData

    torch.manual_seed(0)
    groups = synthetic_preference_dataset(ByteChatTokenizer(), split="validation", num_prompts=120,
                                          responses_per_prompt=4, length_scale=0.15,
                                          max_seq_len=256, progress=False)
    data = StepData(groups, OmegaConf.create({"max_seq_len": 1024, "rows_per_step": 1}),
                    world_size=1, rank=0, seed=0, train=False)
    model = tiny_llama3_reward_model(vocab_size=261, max_seq_len=2048)
    loss_fn = RewardLoss(weighting="group")
    step = RewardModelStep(model, loss_fn).eval()
    with torch.no_grad():
        got = evaluate(step, loss_fn, data, torch.device("cpu"), show_progress=False)
        rewards, diffs, loss_sum, groups_seen = [], [], 0.0, 0
        for i in range(len(data.packed)):
            batch = data.packed[i]
            r = model.rewards(batch).double()
            rewards.append(r)
            diffs.append(r[batch.chosen_index] - r[batch.rejected_index])
            g = int(batch.group_index.unique().numel())
            loss_sum += float(loss_fn.comparison_loss(r, batch.chosen_index, batch.rejected_index,
                                                      group_index=batch.group_index)) * g
            groups_seen += g
    r, d = torch.cat(rewards), torch.cat(diffs)
    assert r.numel() != 2 * d.numel()
    assert got["reward_mean"] == pytest.approx(r.mean().item(), rel=1e-5, abs=1e-7)
    assert got["reward_std"] == pytest.approx(r.std(unbiased=False).item(), rel=1e-4)
    assert got["accuracy"] == pytest.approx((d > 0).double().mean().item())
    assert got["margin"] == pytest.approx(d.mean().item(), rel=1e-5, abs=1e-7)
    assert got["loss"] == pytest.approx(loss_sum / groups_seen, rel=1e-5)


def test_attention_backend_key_sets_the_models_backend(tmp_path):
    """``attention_backend:`` in the recipe config (README) reaches the model; the dense
    reference backend trains to the same losses as the automatic choice."""
    auto = run_recipe(tiny_cfg(tmp_path / "auto", max_steps_per_epoch=3, validation_dataset=None))
    ref = run_recipe(tiny_cfg(tmp_path / "ref", max_steps_per_epoch=3, validation_dataset=None,
                              attention_backend="reference"))
    assert auto.model.attention_backend is None and ref.model.attention_backend == "reference"
    torch.testing.assert_close(torch.tensor(losses(ref)), torch.tensor(losses(auto)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'nope' is not known"):
        run_recipe(tiny_cfg(tmp_path / "bad", max_steps_per_epoch=1, validation_dataset=None,
                            attention_backend="nope"))


def test_gradient_accumulation_equals_one_larger_step(tmp_path):
    """``gradient_accumulation_steps: 2`` with 1 row per micro-step computes the step of 2
    rows at once (the loss is normalized by the comparisons of the whole step)."""
    common = {"max_steps_per_epoch": 3, "validation_dataset": None}
    big = run_recipe(tiny_cfg(tmp_path / "big", **common, **{"packing.rows_per_step": 2}))
    accum = run_recipe(tiny_cfg(tmp_path / "accum", gradient_accumulation_steps=2, **common,
                                **{"packing.rows_per_step": 1}))
    assert len(losses(accum)) == 3
    torch.testing.assert_close(torch.tensor(losses(accum)), torch.tensor(losses(big)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(accum.model.head.weight, big.model.head.weight, rtol=1e-4, atol=1e-6)


def test_optional_keys_do_what_the_readme_says(tmp_path):
    """``trainable``, ``head_checkpoint``, ``test_dataset``, ``eval_every_n_steps``,
    ``eval_max_steps``, ``save_final_checkpoint`` in one run."""
    from fastrm.models.reward_model import write_head

    head = tmp_path / "head.safetensors"
    w = torch.randn(1, 64) * 0.1
    write_head(head, w)
    test_split = {"_component_": "fastrm.datasets.synthetic_preference_dataset", "split": "test",
                  "num_prompts": 400, "length_scale": 0.15, "max_seq_len": 256, "progress": False}
    cfg = tiny_cfg(tmp_path, max_steps_per_epoch=4, head_checkpoint=str(head),
                   trainable={"last_n_layers": 1}, test_dataset=test_split, eval_every_n_steps=2,
                   eval_max_steps=2, save_final_checkpoint=False)
    recipe = RewardModelRecipe(cfg)
    recipe.setup(cfg)
    model = recipe.model
    assert torch.equal(model.head.weight.detach(), w)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    last = f"decoder.layers.{len(model.decoder.layers) - 1}."
    assert trains and all(n.startswith((last, "decoder.norm.", "head.")) for n in trains)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    evals = []
    original = recipe.evaluate

    def evaluate(data=None, prefix="val"):
        evals.append((recipe.global_step, prefix))
        return original(data, prefix)

    recipe.evaluate = evaluate
    recipe.train()
    recipe.cleanup()
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    assert not torch.equal(model.head.weight.detach(), w)
    assert evals == [(2, "val"), (4, "val"), (4, "val"), (4, "test")]
    # eval_max_steps: the comparisons of the first two validation steps only
    val = recipe.val_data
    want = sum(val.packed[i].num_comparisons for i in range(2))
    assert recipe.last_eval["comparisons"] == want < sum(
        val.packed[i].num_comparisons for i in range(len(val.packed)))
    test = json.loads((Path(cfg.output_dir) / "test_results.json").read_text())
    assert set(test) >= {"accuracy", "loss", "reward_mean", "category/refusal"}
    assert not (Path(cfg.output_dir) / "epoch_0").exists()  # save_final_checkpoint: false


@pytest.mark.parametrize("dtype", ["bf16", "auto"])
def test_dtype_key(tmp_path, dtype):
    from fastrm.training.dtype import resolve_dtype

    recipe = run_recipe(tiny_cfg(tmp_path, dtype=dtype, max_steps_per_epoch=2,
                                 validation_dataset=None))
    want = torch.bfloat16 if dtype == "bf16" else resolve_dtype("auto", "cpu")
    assert recipe.dtype == want
    assert {p.dtype for p in recipe.model.parameters()} == {want}
    assert len(losses(recipe)) == 2 and all(torch.isfinite(torch.tensor(losses(recipe))))


@pytest.mark.slow
def test_compile_key_trains_compiled_layers(tmp_path):
    plain = run_recipe(tiny_cfg(tmp_path / "plain", max_steps_per_epoch=2, validation_dataset=None))
    compiled = run_recipe(tiny_cfg(tmp_path / "compiled", max_steps_per_epoch=2,
                                   validation_dataset=None, compile=True))
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.decoder.layers)
    torch.testing.assert_close(torch.tensor(losses(compiled)), torch.tensor(losses(plain)),
                               rtol=1e-4, atol=1e-5)


def test_every_config_key_the_readme_documents_is_used_by_a_test():
    """The README's recipe section names config keys; each must appear in a recipe test or in
    the tiny config every recipe test loads."""
    import re

    from fastrm.training.config import OPTIONAL, REQUIRED

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The recipe"):readme.index("## Layout")]
    documented = {k for k in re.findall(r"`([a-z_]+)", section) if k in REQUIRED + OPTIONAL}
    assert {"attention_backend", "trainable", "test_dataset", "compile"} <= documented
    used = TINY.read_text() + "".join(p.read_text() for p in
                                      (REPO / "tests").glob("*/test_*.py"))
    missing = sorted(k for k in documented if not re.search(rf"\b{k}\b", used))
    assert not missing, f"documented recipe keys no test uses: {missing}"


def _with_optimizer(cfg, optimizer: dict):
    cfg.optimizer = OmegaConf.create(optimizer)  # replaced whole, not merged into the tiny one
    return cfg


def test_bf16_run_with_stochastic_rounding_adamw_resumes_exactly(tmp_path):
    """``optimizer: fastrm.optim.AdamW`` on bf16 weights: the fp32 moments and the rounding's
    random stream go through the DCP training state, so a resumed run repeats the uninterrupted
    one bit for bit; the logged lr is a plain float (history.json is JSON)."""
    common = {"dtype": "bf16", "max_steps_per_epoch": 4, "validation_dataset": None}
    opt = {"_component_": "fastrm.optim.AdamW", "lr": 1e-3, "weight_decay": 0.01}
    full = run_recipe(_with_optimizer(tiny_cfg(tmp_path / "full", **common), opt))
    part_cfg = _with_optimizer(tiny_cfg(tmp_path / "part", save_every_n_steps=2, **common), opt)
    interrupted = RewardModelRecipe(part_cfg)
    interrupted.setup(part_cfg)
    _train_until(interrupted, stop_step=2)
    resumed = run_recipe(_with_optimizer(tiny_cfg(tmp_path / "part", resume_from_checkpoint=True,
                                                  **common), opt))
    assert {p.dtype for p in resumed.model.parameters()} == {torch.bfloat16}
    state = next(iter(resumed.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32
    assert losses(resumed) == losses(full) and len(losses(full)) == 4
    history = json.loads((tmp_path / "part" / "run" / "history.json").read_text())
    assert all(isinstance(h["lr"], float) for h in history)


def test_a_tensor_learning_rate_is_logged_as_a_number(tmp_path):
    """Optimizers such as torchao's keep ``lr`` as a tensor; the log and history.json take a
    float (this crashed cleanup's JSON dump at the end of a run)."""
    recipe = run_recipe(_with_optimizer(
        tiny_cfg(tmp_path, max_steps_per_epoch=2, validation_dataset=None),
        {"_component_": "fixtures.optimizers.adamw_tensor_lr", "lr": 1e-3}))
    assert isinstance(recipe.optimizer.param_groups[0]["lr"], torch.Tensor)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in recipe.history])
    assert all(isinstance(h["lr"], float) for h in history)
