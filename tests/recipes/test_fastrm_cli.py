"""The ``fastrm`` console script: ls, cp, prepare's error path, and train on 2 processes from a
directory outside the repository."""

import json
import os
import subprocess
import sys

from omegaconf import OmegaConf

from fastrm.cli import main
from fastrm.config import CONFIGS_DIR


def test_ls_lists_recipes_and_every_shipped_config(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for cfg in CONFIGS_DIR.glob("*.yaml"):
        assert cfg.stem in out
    assert "reward_model.py" in out


def test_cp_copies_a_config_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "tiny_llama3_synthetic", str(dest)]) == 0
    assert OmegaConf.load(dest) == OmegaConf.load(CONFIGS_DIR / "tiny_llama3_synthetic.yaml")
    try:
        main(["cp", "tiny_llama3_synthetic", str(dest)])
    except SystemExit as err:
        assert "exists" in str(err)
    else:
        raise AssertionError("cp overwrote an existing file without --force")


def test_train_two_processes_from_any_directory(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastrm.cli", "train", "--nproc_per_node", "2", "--config",
         "tiny_llama3_synthetic", f"output_dir={out}", "max_steps_per_epoch=2",
         "dataset.num_prompts=80", "validation_dataset.num_prompts=40",
         "metric_logger._component_=torchtune.training.metric_logging.DiskLogger"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert (out / "latest" / "reward_model.safetensors").exists()
