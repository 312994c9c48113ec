"""The ``fastrm`` console script: ls, cp, prepare's error path, and train on 2 processes from a
directory outside the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def _train_args(*argv):
    from fastrm.cli import build_parser

    args, rest = build_parser().parse_known_args(["train", "--config", "tiny_llama3_synthetic", *argv])
    return args, rest


def test_multi_node_torchrun_command_line():
    """The torchrun command of each node: c10d rendezvous at the endpoint, node 0 hosts it."""
    from fastrm.cli import _check_nodes, resolve_config, torchrun_command

    cfg = resolve_config("tiny_llama3_synthetic")
    for rank in (0, 1):
        args, rest = _train_args("--nnodes", "2", "--node_rank", str(rank), "--rdzv_endpoint",
                                 "10.0.0.1:29400", "--nproc_per_node", "8", "--rdzv_id", "job7",
                                 "max_steps_per_epoch=3")
        _check_nodes(args)
        assert torchrun_command(args, cfg, rest) == [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8",
            "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29400",
            "--rdzv_id", "job7", "--rdzv_conf", f"is_host={int(rank == 0)}",
            "-m", "fastrm.recipes.reward_model", "--config", str(cfg), "max_steps_per_epoch=3"]
    args, rest = _train_args("--nproc_per_node", "2")
    assert torchrun_command(args, cfg, rest)[3:7] == ["--nproc_per_node", "2", "--standalone", "-m"]
    args, rest = _train_args("--nproc_per_node", "1")
    assert torchrun_command(args, cfg, rest)[3:6] == ["--nproc_per_node", "1", "-m"]
    args, _ = _train_args("--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "1", "--rdzv-id", "x")
    assert (args.nnodes, args.rdzv_endpoint, args.node_rank, args.rdzv_id) == (2, "h:1", 1, "x")
    assert _train_args()[0].rdzv_id == "fastrm"
    for bad, match in [(["--nnodes", "2"], "needs --rdzv_endpoint"),
                       (["--nnodes", "2", "--rdzv_endpoint", "h:1", "--node_rank", "2"], "node_rank=2"),
                       (["--rdzv_endpoint", "h:1"], "need --nnodes > 1"),
                       (["--nnodes", "0"], "must be >= 1")]:
        with pytest.raises(SystemExit, match=match):
            _check_nodes(_train_args(*bad)[0])


def _logged_losses(out: Path) -> list[float]:
    """Losses of the training steps, read from the DiskLogger's file."""
    import re

    (log,) = (out / "logs").glob("log_*.txt")
    return [float(m.group(1)) for m in re.finditer(r"^Step \d+ \| loss:(\S+)", log.read_text(), re.M)]


@pytest.mark.slow
def test_two_nodes_on_loopback_reproduce_one_process(tmp_path, free_port):
    """Two `fastrm train` commands as two 1-process nodes meeting at 127.0.0.1 (torchrun's c10d
    rendezvous), 1 packed row each per step, equal one process with 2 rows per step."""
    common = ["--config", "tiny_llama3_synthetic", "max_steps_per_epoch=3",
              "dataset.num_prompts=80", "validation_dataset.num_prompts=40",
              "dataset.length_scale=0.15", "validation_dataset.length_scale=0.15",
              "packing.max_seq_len=512", "dataset.max_seq_len=256",
              "validation_dataset.max_seq_len=256", "num_threads=1", "fsdp_reshard_after_forward=False",
              f"data_cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "fastrm.cli", "train", "--nnodes", "2", "--node_rank", str(r),
         "--rdzv_endpoint", endpoint, *common, f"output_dir={tmp_path / 'two'}",
         "packing.rows_per_step=1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[1][-3000:] + outs[0][-3000:]
    one = subprocess.run([sys.executable, "-m", "fastrm.cli", "train", *common,
                          f"output_dir={tmp_path / 'one'}", "packing.rows_per_step=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two, ref = _logged_losses(tmp_path / "two"), _logged_losses(tmp_path / "one")
    assert len(two) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_top_level_help_describes_every_command_and_each_delegate_has_its_own_help(capsys):
    from fastrm import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "see --help" not in text and "``" not in text  # plain text, not reST markup
    for name in ("ls", "cp", "train", "prepare", "plan", "init", "generate", "judge",
                 "decompose", "score", "eval", "serve"):
        assert f"\n    {name} " in text, name
    # a delegated command's --help reaches the command's own parser (it exits 0 with a usage)
    for name in ("plan", "init", "score", "eval", "serve"):
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: fastrm {name}" in capsys.readouterr().out, name
