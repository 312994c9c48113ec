"""Checks a reward-model training config before anything is built.

A typo in a key (``gradient_acumulation_steps``) or a missing section should fail at once with
a message that names the key, not after the model has loaded or, worse, be silently ignored.
"""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

REQUIRED = ("output_dir", "model", "tokenizer", "dataset", "loss", "optimizer", "packing")

OPTIONAL = (
    "seed", "device", "dtype", "checkpointer", "prepare_checkpoint", "head_checkpoint",
    "validation_dataset", "test_dataset", "lr_scheduler", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "clip_grad_norm", "enable_activation_checkpointing", "compile",
    "save_every_n_steps", "save_final_checkpoint", "resume_from_checkpoint", "metric_logger",
    "log_every_n_steps", "trainable", "eval_every_n_steps", "eval_max_steps", "attention_backend",
    "fsdp_reshard_after_forward", "num_threads", "cross_prompt",
)

PACKING_KEYS = ("max_seq_len", "rows_per_step", "prefix_sharing", "shuffle", "group_responses")
TRAINABLE_KEYS = ("last_n_layers", "embeddings", "final_norm")


class ConfigError(ValueError):
    """A config key is unknown, missing or has a bad value."""


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        if not OmegaConf.is_dict(cfg[section]) or "_component_" not in cfg[section]:
            raise ConfigError(f"config section {section!r} needs a '_component_' to instantiate")
    for key in cfg.packing.keys():
        if key not in PACKING_KEYS:
            raise ConfigError(f"unknown key 'packing.{key}'{_suggest(str(key), PACKING_KEYS)}; "
                              f"known: {', '.join(PACKING_KEYS)}")
    if "max_seq_len" not in cfg.packing:
        raise ConfigError("config is missing 'packing.max_seq_len'")
    if cfg.get("trainable") is not None:
        for key in cfg.trainable.keys():
            if key not in TRAINABLE_KEYS:
                raise ConfigError(f"unknown key 'trainable.{key}'; known: {', '.join(TRAINABLE_KEYS)}")
    dtype = cfg.get("dtype", "fp32")
    if dtype not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"dtype={dtype!r}: use fp32, bf16 or auto (bf16 where the hardware is fast at it)")
    gas = cfg.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ConfigError(f"gradient_accumulation_steps must be an integer >= 1, got {gas!r}")
    if cfg.get("resume_from_checkpoint") and not cfg.get("output_dir"):
        raise ConfigError("resume_from_checkpoint needs output_dir (where the run saved its state)")
