"""Config lookup for the command lines: a YAML path or the name of a shipped config, plus
``key=value`` overrides.

``fastrm train`` / ``cp``, ``fastrm generate`` / ``judge`` and ``fastrm decompose`` all take
``--config NAME_OR_PATH``: an existing ``.yaml`` / ``.yml`` file, or the name of a config shipped
in ``fastrm/recipes/configs/`` (with or without ``.yaml``). Overrides use OmegaConf's dotted
list syntax (``pca.num_heads=16 output_dir=/tmp/x``), as ``tune run`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIGS_DIR = Path(__file__).resolve().parent / "recipes" / "configs"
_SUFFIXES = (".yaml", ".yml")


def list_configs(prefix: str = "") -> list[Path]:
    """The shipped configs whose name starts with ``prefix``, sorted."""
    return sorted(CONFIGS_DIR.glob(f"{prefix}*.yaml"))


def resolve_config(name: str, prefix: str = "") -> Path:
    """The config file ``name`` stands for: a YAML path, or a shipped config name.

    Args:
        name: a path ending in ``.yaml`` / ``.yml`` that exists, or a shipped config's name.
        prefix: the shipped configs to list in the error (``"decompose_"``: the decompose ones).

    Raises:
        ValueError: ``name`` is neither; the message lists the shipped configs.
    """
    path = Path(name)
    if path.suffix in _SUFFIXES and path.is_file():
        return path.resolve()
    shipped = CONFIGS_DIR / (name if name.endswith(_SUFFIXES) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(c.stem for c in list_configs(prefix))
    raise ValueError(f"config {name!r} is neither a YAML file nor a shipped config ({names})")


def load_config(name: str, overrides: Sequence[str] = (), prefix: str = "") -> DictConfig:
    """The config ``name`` (see :func:`resolve_config`) with ``key=value`` overrides merged.

    Raises:
        ValueError: an unknown config, or an override without ``=``.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}")
    cfg = OmegaConf.load(resolve_config(name, prefix))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg  # type: ignore[return-value]


def parse_config_args(parser, argv: Optional[Sequence[str]], prefix: str = ""):
    """Parses ``--config NAME_OR_PATH [options] [key=value ...]`` with ``parser`` (which gets
    the ``--config`` argument here) and loads the config.

    Returns:
        ``(args, cfg)``: the parsed options and the config with the overrides merged. A bad
        config name or override exits through ``parser.error`` (status 2, message on stderr).
    """
    parser.add_argument("--config", required=True,
                        help="YAML path or the name of a shipped config (fastrm ls)")
    parser.epilog = parser.epilog or "key=value ...: config overrides (OmegaConf dot-list)"
    args, overrides = parser.parse_known_args(None if argv is None else list(argv))
    try:
        return args, load_config(args.config, overrides, prefix)
    except ValueError as err:
        parser.error(str(err))
