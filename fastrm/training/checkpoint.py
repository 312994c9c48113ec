"""Checkpoint I/O of a recipe run, every file written atomically.

``output_dir/<tag>/`` holds

* the backbone as the base checkpoint was given: HF safetensors + the base checkpoint's config
  and tokenizer files for torchtune's ``FullModelHFCheckpointer`` (LoRA adapters merged),
  ``backbone.pt`` (torchtune names) otherwise;
* ``reward_head.safetensors``: ``head.weight [1, D]``, ``head.bias [1]``
  (:func:`fastrm.models.reward_model.write_head`, the one head-file format; the recipe's
  ``head_checkpoint`` reads it back with the shape check);
* ``reward_stats.json``: reward mean/std on the validation split, to normalize rewards;
* ``recipe_state.pt``: trainable weights, optimizer, scheduler, data position, history;
* ``rng_rank<r>.pt``: each rank's torch / CUDA / numpy / python RNG states.

``output_dir/latest`` links to the newest tag.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from torchtune import training

from fastrm._io import atomic_path, atomic_symlink

HEAD_FILE = "reward_head.safetensors"
STATS_FILE = "reward_stats.json"
RECIPE_STATE_FILE = "recipe_state.pt"


# ---------------------------------------------------------------------- gather / scatter
def full_state_dict(model: nn.Module, is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """Full CPU state dict (gathered from shards under FSDP one tensor at a time,
    :func:`~fastrm.training.distributed.iter_full_tensors`); empty on ranks > 0."""
    from fastrm.training.distributed import iter_full_tensors

    return {k: v for k, v in iter_full_tensors(model, is_rank_zero) if v is not None}


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                              is_rank_zero: bool) -> dict:
    if dist.is_initialized():
        return training.get_full_optimizer_state_dict(module, optimizer, is_rank_zero)
    return optimizer.state_dict()


def load_trainable_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Loads the saved trainable parameters (the frozen rest comes from the base checkpoint)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=False,
                                                                 strict=False))
        return
    missing = set(sd) - set(model.state_dict())
    if missing:
        raise KeyError(f"checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(sd, strict=False)


def load_optimizer_state(module: nn.Module, optimizer, sd: dict, device: torch.device) -> None:
    if dist.is_initialized():
        training.load_from_full_optimizer_state_dict(module, optimizer, sd, device)
    else:
        optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------- files
def save_head(out: Path, model_sd: dict[str, torch.Tensor]) -> None:
    """``out/reward_head.safetensors`` from a full :class:`RewardModel` state dict."""
    from fastrm.models.reward_model import write_head

    write_head(out / HEAD_FILE, model_sd["head.weight"], model_sd["head.bias"])


def save_reward_stats(out: Path, stats: dict[str, Any], step: int) -> None:
    with atomic_path(out / STATS_FILE) as tmp:
        tmp.write_text(json.dumps({
            "reward_mean": stats.get("reward_mean"), "reward_std": stats.get("reward_std"),
            "val_accuracy": stats.get("accuracy"), "step": step,
            "note": "normalize rewards as (r - reward_mean) / reward_std",
        }, indent=2))


def save_backbone(cfg: DictConfig, checkpointer: Any, backbone_sd: dict[str, torch.Tensor],
                  out: Path) -> None:
    """Saves the backbone so users load it back the way they loaded the base model: HF
    safetensors + the base checkpoint's config/tokenizer files for an HF checkpointer (LoRA
    adapters merged), torchtune's format otherwise."""
    if any("lora_" in k for k in backbone_sd):
        from torchtune.modules.peft import get_merged_lora_ckpt

        backbone_sd = get_merged_lora_ckpt(dict(backbone_sd), rank=int(cfg.model.lora_rank),
                                           alpha=float(cfg.model.lora_alpha))
    from torchtune.training import FullModelHFCheckpointer

    if not isinstance(checkpointer, FullModelHFCheckpointer):
        with atomic_path(out / "backbone.pt") as tmp:
            torch.save(backbone_sd, tmp)
        return
    from torchtune.models import convert_weights

    src = Path(checkpointer._checkpoint_dir)
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_sd = convert_weights.tune_to_hf(
        backbone_sd, num_heads=hf_cfg["num_attention_heads"],
        num_kv_heads=hf_cfg["num_key_value_heads"], dim=hf_cfg["hidden_size"],
        head_dim=hf_cfg.get("head_dim"))
    hf_sd.pop("lm_head.weight", None)
    if not hf_cfg.get("tie_word_embeddings", False):
        # the reward model dropped the LM head; keep the file loadable as a causal LM
        base = load_base_lm_head(src)
        if base is not None:
            hf_sd["lm_head.weight"] = base
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            with atomic_path(out / name) as tmp:
                shutil.copy(src / name, tmp)


def load_base_lm_head(src: Path) -> Optional[torch.Tensor]:
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(str(f))
        if "lm_head.weight" in sd:
            return sd["lm_head.weight"]
    return None


def save_recipe_state(out: Path, state: dict[str, Any]) -> None:
    with atomic_path(out / RECIPE_STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_recipe_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / RECIPE_STATE_FILE).exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {ckpt}/{RECIPE_STATE_FILE} does not exist; run "
            f"without resuming first, or point output_dir at the run to resume")
    return torch.load(ckpt / RECIPE_STATE_FILE, map_location="cpu", weights_only=False)


def point_latest(output_dir: Path, tag: str) -> None:
    """``output_dir/latest`` -> ``tag``."""
    atomic_symlink(tag, output_dir / "latest")


# ---------------------------------------------------------------------- RNG
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: torch (CPU), numpy, python, and the CUDA generator of
    ``device`` when it is a GPU (dropout and sampling on the GPU draw from it)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restores :func:`rng_state`; a CUDA run resumed from a checkpoint without a CUDA state
    (or the other way round) restores the rest and warns that it cannot be exact."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif (device.type == "cuda") != ("cuda" in state):
        warnings.warn(f"the checkpoint's RNG state {'has' if 'cuda' in state else 'lacks'} a CUDA "
                      f"generator but this run is on {device}; the resumed run cannot reproduce "
                      "the uninterrupted one exactly", stacklevel=2)


def save_rng_state(out: Path, rank: int, device: torch.device) -> None:
    with atomic_path(out / f"rng_rank{rank}.pt") as tmp:
        torch.save(rng_state(device), tmp)


def load_rng_state(ckpt: Path, rank: int, device: torch.device) -> None:
    set_rng_state(torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=False), device)
