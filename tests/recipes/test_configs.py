"""Every shipped config validates; the real-data config loads its data through the same
builders and packing the recipe uses."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune import config

from fastrm.cli import list_configs
from fastrm.data.tokenizer import ByteChatTokenizer
from fastrm.training.config import validate_config
from fastrm.training.step_data import StepData

CONFIGS = [c for c in list_configs() if not c.stem.startswith(("generate_", "judge_", "decompose_"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_recipe_configs_validate(path: Path):
    cfg = OmegaConf.load(path)
    validate_config(cfg)
    header = path.read_text().splitlines()[:20]
    assert any("tune run fastrm/recipes/reward_model.py" in line for line in header), \
        "a config's header names the command that runs it"


def test_qa_feedback_config_loads_every_pair(shared_data):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "fastrm/recipes/configs/smollm2_135m_qa_feedback.yaml")
    tok = ByteChatTokenizer()  # no checkpoint needed; a byte is ~1/4 of a SmolLM2 token, so
    cfg.dataset.max_seq_len *= 4  # lengths scale by 4 to keep the config's truncation policy
    cfg.packing.max_seq_len *= 4
    ds = config.instantiate(cfg.dataset, tokenizer=tok, progress=False)
    assert sum(g.num_comparisons for g in ds) == 2104  # the train split, none dropped
    assert ds.stats["comparisons_dropped_too_long"] == 0
    data = StepData(ds, cfg.packing, world_size=1, rank=0, seed=0, train=True)
    # a unit is a whole question (its prompt once, all its answers: ~1-4k tokens here), so rows
    # fill less evenly than single pairs would (0.80 against 0.95); nothing is padded (a step is
    # one flat [1, T] row), so fill only sets how evenly the steps are sized
    assert data.packed.epoch_fill_rate > 0.75
    assert data.packed.stats.split_groups == 0  # every question fits a row whole
    assert data.packed.stats.prompt_tokens_saved > 0
