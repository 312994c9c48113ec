"""The shipped SmolLM2 config end to end (issue 19's report): a checkpoint of
``smollm2_135m_synthetic`` loads in transformers as ``LlamaForSequenceClassification`` with no
missing keys, its pad token is not the reward token, and transformers' reward on
``apply_chat_template`` ids equals fastrm's."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf


from fixtures.hf_models import check_hf_rewards
from fixtures.recipes import run_recipe

CONFIG = Path(__file__).resolve().parents[2] / "fastrm" / "recipes" / "configs" / "smollm2_135m_synthetic.yaml"


@pytest.mark.slow  # SmolLM2-135M forward/backward in fp32 on CPU
def test_smollm2_checkpoint_is_an_hf_reward_model(smollm2_dir, tmp_path):
    import json

    cfg = OmegaConf.load(CONFIG)
    for k, v in {"output_dir": str(tmp_path / "run"), "prepare_checkpoint.output_dir": str(smollm2_dir),
                 "max_steps_per_epoch": 1, "dataset.num_prompts": 40, "validation_dataset.num_prompts": 20,
                 "test_dataset": None, "trainable.last_n_layers": 1, "packing.max_seq_len": 512,
                 "dataset.max_seq_len": 256, "validation_dataset.max_seq_len": 256, "num_threads": 2,
                 "metric_logger._component_": "torchtune.training.metric_logging.DiskLogger",
                 "dtype": "fp32"}.items():  # the parity acceptance is in fp32
        OmegaConf.update(cfg, k, v, force_add=True)
    run_recipe(cfg)
    out = tmp_path / "run" / "epoch_0"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["pad_token_id"] == 0  # <|endoftext|>, not <|im_end|> (2) as the base ships it
    check_hf_rewards(out, n=6)
