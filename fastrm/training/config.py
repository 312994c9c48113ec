"""The reward-model recipe's config: checked before anything is built, and parsed from the
command line with optional sections that can be turned off.

A typo in a key (``gradient_acumulation_steps``, ``loss.centring_coefficient``) or a missing
section fails at once with a message that names the key and the closest known one, not after
the model has loaded or, worse, silently ignored. Keys of a ``_component_`` section are
checked against the signature of the callable it names (one that takes ``**kwargs`` accepts
any key); keys of the plain sections (``packing``, ``trainable``, ``cross_prompt``) against the
keys the recipe reads.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import inspect
import sys
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

REQUIRED = ("output_dir", "model", "tokenizer", "dataset", "loss", "optimizer", "packing")

OPTIONAL = (
    "seed", "device", "dtype", "checkpointer", "prepare_checkpoint", "head_checkpoint",
    "validation_dataset", "test_dataset", "lr_scheduler", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "clip_grad_norm", "enable_activation_checkpointing", "compile",
    "save_every_n_steps", "save_final_checkpoint", "resume_from_checkpoint", "metric_logger",
    "log_every_n_steps", "trainable", "eval_every_n_steps", "eval_max_steps", "attention_backend",
    "fsdp_reshard_after_forward", "num_threads", "cross_prompt", "data_cache_dir", "dataloader",
    "max_shard_size",
)

#: keys of the plain (non-component) sections, as the recipe reads them
PLAIN_SECTIONS = {
    "packing": ("max_seq_len", "rows_per_step", "prefix_sharing"),
    "trainable": ("last_n_layers", "embeddings", "final_norm"),
    "cross_prompt": ("embedder",),
    "dataloader": ("num_workers", "pin_memory", "persistent_workers"),
}

#: the dtypes the recipe trains in (fp16 needs loss scaling, which the recipe does not do)
RECIPE_DTYPES = ("fp32", "bf16", "auto")


class ConfigError(ValueError):
    """A config key is unknown, missing or has a bad value."""


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_component(node: Any) -> bool:
    return (OmegaConf.is_dict(node) or isinstance(node, dict)) and "_component_" in node


def resolve_component(path: str) -> Callable:
    """The object a ``_component_`` dotted path names (``pkg.module.attr[.attr...]``)."""
    parts = str(path).split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {path!r}")


def _check_component(node: DictConfig, where: str) -> None:
    """Every key of component section ``where`` is a parameter of its ``_component_``."""
    path = node["_component_"]
    if path is None:
        raise ConfigError(f"config section {where!r} has _component_: null; remove the section "
                          f"to turn it off (~{where} or {where}=null on the command line)")
    try:
        fn = resolve_component(path)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}._component_={path!r} cannot be imported: {e}") from None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in node.keys():
            if key != "_component_" and key not in names:
                raise ConfigError(f"unknown key '{where}.{key}'{_suggest(str(key), names)}: "
                                  f"{path} takes {', '.join(names)}")
    _check_children(node, where)


def _check_children(node: DictConfig, where: str) -> None:
    for key, value in node.items_ex(resolve=False):
        if _is_component(value):
            _check_component(value, f"{where}.{key}")


def validate_config(cfg: DictConfig) -> None:
    """Raises :class:`ConfigError` naming the first unknown or missing key, or bad value."""
    known = REQUIRED + OPTIONAL
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(
                f"unknown config key {key!r}{_suggest(str(key), known)}; known keys: "
                f"{', '.join(sorted(known))}"
            )
    for key in REQUIRED:
        if key not in cfg or cfg[key] is None:
            raise ConfigError(f"config is missing the required section {key!r}")
    for section in ("model", "tokenizer", "dataset", "loss", "optimizer"):
        if not _is_component(cfg[section]):
            raise ConfigError(f"config section {section!r} needs a '_component_' to instantiate")
    for section, keys in PLAIN_SECTIONS.items():
        node = cfg.get(section)
        if node is None:
            continue
        if not OmegaConf.is_dict(node):
            raise ConfigError(f"config section {section!r} must be a mapping with keys "
                              f"{', '.join(keys)}")
        for key in node.keys():
            if key not in keys:
                raise ConfigError(f"unknown key '{section}.{key}'{_suggest(str(key), keys)}; "
                                  f"known: {', '.join(keys)}")
        _check_children(node, section)
    if "max_seq_len" not in cfg.packing:
        raise ConfigError("config is missing 'packing.max_seq_len'")
    for key, value in cfg.items_ex(resolve=False):
        if _is_component(value):
            _check_component(value, str(key))
    dtype = cfg.get("dtype", "fp32")
    if dtype not in RECIPE_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: use fp32, bf16 or auto (bf16 where the hardware is fast at it)")
    cache_dir = cfg.get("data_cache_dir", None)
    if cache_dir is not None and not isinstance(cache_dir, (str, bool)):
        raise ConfigError(f"data_cache_dir={cache_dir!r}: give a folder, or null / false to turn "
                          "the data cache off")
    workers = (cfg.get("dataloader") or {}).get("num_workers", None)
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"dataloader.num_workers must be an integer >= 0, got {workers!r}")
    gas = cfg.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ConfigError(f"gradient_accumulation_steps must be an integer >= 1, got {gas!r}")
    if cfg.get("resume_from_checkpoint") and not cfg.get("output_dir"):
        raise ConfigError("resume_from_checkpoint needs output_dir (where the run saved its state)")


# ---------------------------------------------------------------------- command line
_OFF_VALUES = ("null", "none", "~")


def merge_yaml_and_cli_args(yaml_args: argparse.Namespace, cli_args: list[str]) -> DictConfig:
    """torchtune's merge of the YAML config and ``key=value`` overrides, plus turning a whole
    ``_component_`` section off: ``~validation_dataset`` removes it, ``validation_dataset=null``
    sets it to ``null`` (how users skip evaluation). torchtune alone refuses both: it does not
    remove component sections ("Could not find key") and reads ``section=null`` as
    ``section._component_=null``."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    yaml_kwargs = vars(yaml_args)
    nulled: list[str] = []
    rest: list[str] = []
    for arg in cli_args:
        if arg.startswith("~"):
            key, off = arg[1:], True
        else:
            key, sep, value = arg.partition("=")
            off = bool(sep) and value.strip().lower() in _OFF_VALUES
        if off and "." not in key and _is_component(yaml_kwargs.get(key)):
            del yaml_kwargs[key]
            if not arg.startswith("~"):
                nulled.append(key)
            continue
        rest.append(arg)
    cfg = _merge_yaml_and_cli_args(argparse.Namespace(**yaml_kwargs), rest)
    for key in nulled:
        OmegaConf.update(cfg, key, None, force_add=True)
    return cfg


def parse_args(argv: list[str], description: str = "") -> DictConfig:
    """``--config <yaml> [key=value | ~key ...]`` -> the merged config (what ``tune run``
    hands a recipe)."""
    from torchtune.config._parse import TuneRecipeArgumentParser

    parser = TuneRecipeArgumentParser(description=description,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    yaml_args, cli_args = parser.parse_known_args(argv)
    return merge_yaml_and_cli_args(yaml_args, cli_args)


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """Decorator for a recipe's main function, like ``torchtune.config.parse``, with
    :func:`merge_yaml_and_cli_args` (optional sections can be turned off)."""

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sys.exit(recipe_main(parse_args(sys.argv[1:], recipe_main.__doc__ or "")))

    return wrapper
