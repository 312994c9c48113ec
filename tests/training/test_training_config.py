"""Config checks: unknown keys in any section fail with a "did you mean", component keys are
checked against the component's signature; optional sections can be turned off from the
command line (``~section`` and ``section=null``), through the parser ``tune run`` uses."""

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastrm.training.config import ConfigError, parse_args, validate_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml"


def tiny():
    return OmegaConf.load(TINY)


@pytest.mark.parametrize("key,value,match", [
    ("loss.centring_coefficient", 0.1,
     r"unknown key 'loss.centring_coefficient' \(did you mean 'centering_coefficient'\?\)"),
    ("optimizer.weight_decai", 0.1, r"'optimizer.weight_decai' \(did you mean 'weight_decay'\?\)"),
    ("lr_scheduler.num_warmup_step", 3,
     r"'lr_scheduler.num_warmup_step' \(did you mean 'num_warmup_steps'\?\)"),
    ("tokenizer.max_seq_length", 3, r"unknown key 'tokenizer.max_seq_length'"),
    ("packing.shuffle", True, r"unknown key 'packing.shuffle'"),
    ("packing.group_responses", True, r"unknown key 'packing.group_responses'"),
    ("packing.rows_per_stepp", 2, r"'packing.rows_per_stepp' \(did you mean 'rows_per_step'\?\)"),
    ("trainable.last_n_layer", 1, r"'trainable.last_n_layer' \(did you mean 'last_n_layers'\?\)"),
    ("cross_prompt.embeder", {"_component_": "fastrm.data.HashedNgramEmbedder"},
     r"'cross_prompt.embeder' \(did you mean 'embedder'\?\)"),
    ("cross_prompt.embedder", {"_component_": "fastrm.data.HashedNgramEmbedder", "dimm": 8},
     r"'cross_prompt.embedder.dimm' \(did you mean 'dim'\?\)"),
    ("loss._component_", "fastrm.NoSuchLoss", r"loss._component_='fastrm.NoSuchLoss' cannot be imported"),
])
def test_unknown_keys_in_any_section_name_the_closest_key(key, value, match):
    cfg = tiny()
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_known_keys_and_kwargs_components_pass():
    cfg = tiny()
    for key, value in {"loss.centering_coefficient": 0.1, "optimizer.betas": [0.9, 0.99],
                       "trainable.last_n_layers": 1, "trainable.final_norm": False,
                       "cross_prompt.embedder": {"_component_": "fastrm.data.HashedNgramEmbedder",
                                                 "dim": 64},
                       # DiskLogger and the dataset builders take **kwargs: any key passes here
                       "metric_logger.anything": 1}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    validate_config(cfg)


@pytest.mark.parametrize("spelling", ["~validation_dataset", "validation_dataset=null",
                                      "validation_dataset=None"])
def test_optional_section_turned_off_on_the_command_line(spelling):
    cfg = parse_args(["--config", str(TINY), spelling, "epochs=2"])
    assert cfg.get("validation_dataset") is None and cfg.epochs == 2
    assert cfg.dataset.split == "train"  # the rest of the config is untouched
    validate_config(cfg)


def test_removing_a_missing_or_nested_key_still_fails():
    with pytest.raises(ValueError, match="Could not find key validation_datasett"):
        parse_args(["--config", str(TINY), "~validation_datasett"])
    cfg = parse_args(["--config", str(TINY), "~loss.centering_coefficient"])
    assert "centering_coefficient" not in cfg.loss and cfg.loss.use_margin is True


def test_recipe_main_runs_without_validation_from_the_command_line(tmp_path, monkeypatch):
    """The entry point ``tune run`` calls, with ``~validation_dataset``: training runs and
    nothing is evaluated."""
    from fastrm.recipes.reward_model import RewardModelRecipe, recipe_main

    seen = []
    original = RewardModelRecipe.train

    def train(self):
        seen.append(self)
        original(self)

    monkeypatch.setattr(RewardModelRecipe, "train", train)
    monkeypatch.setattr(sys, "argv", [
        "reward_model.py", "--config", str(TINY), "~validation_dataset", f"output_dir={tmp_path}",
        "max_steps_per_epoch=2", "dataset.num_prompts=40", "dataset.length_scale=0.15",
        "dataset.max_seq_len=256", "packing.max_seq_len=512", "num_threads=1"])
    with pytest.raises(SystemExit) as exit_:
        recipe_main()
    assert exit_.value.code in (None, 0)
    (recipe,) = seen
    assert recipe.val_data is None and len(recipe.history) == 2
    assert not hasattr(recipe, "last_eval")
