"""``fastrm.config``: the config lookup every command line shares (a YAML path or a shipped
config's name, plus ``key=value`` overrides)."""

import argparse

import pytest
from omegaconf import OmegaConf

from fastrm.config import CONFIGS_DIR, list_configs, load_config, parse_config_args, resolve_config


def test_shipped_names_and_paths_resolve(tmp_path):
    shipped = CONFIGS_DIR / "tiny_llama3_synthetic.yaml"
    assert resolve_config("tiny_llama3_synthetic") == shipped
    assert resolve_config("tiny_llama3_synthetic.yaml") == shipped
    own = tmp_path / "mine.yml"
    own.write_text("a: 1\n")
    assert resolve_config(str(own)) == own.resolve()
    assert [p.stem for p in list_configs("decompose_")] == sorted(
        p.stem for p in CONFIGS_DIR.glob("*.yaml") if p.stem.startswith("decompose_"))


def test_unknown_config_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ValueError, match="neither a YAML file") as err:
        resolve_config("no_such_config", prefix="judge_")
    assert "judge_smollm2" in str(err.value) and "tiny_llama3_synthetic" not in str(err.value)
    with pytest.raises(ValueError, match="neither"):  # a path that does not exist
        resolve_config(str(tmp_path / "missing.yaml"))


def test_overrides_merge_and_bad_overrides_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: {b: 1, c: x}\n")
    cfg = load_config(str(path), ["a.b=3", "d=[1,2]"])
    assert OmegaConf.to_container(cfg) == {"a": {"b": 3, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ValueError, match="key=value"):
        load_config(str(path), ["a.b"])


def test_parse_config_args_keeps_options_and_exits_on_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--flag", action="store_true")
    args, cfg = parse_config_args(parser, ["--config", str(path), "--flag", "a=2"])
    assert args.flag and cfg.a == 2
    for argv in (["--config", "nope"], ["--config", str(path), "--unknown"]):
        with pytest.raises(SystemExit) as err:
            parse_config_args(argparse.ArgumentParser(prog="x"), argv)
        assert err.value.code == 2
    assert "key=value" in capsys.readouterr().err
