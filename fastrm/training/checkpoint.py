"""Checkpoint I/O of a recipe run.

``output_dir/<tag>/`` is built in ``output_dir/.<tag>.partial/`` and renamed into place when
every file is written (:func:`fastrm._io.commit_dir`); ``output_dir/latest`` moves to it last.
A failure while saving leaves the previous checkpoint, its training state and ``latest`` as
they were. It holds

* the reward model (:class:`ModelWriter`, LoRA adapters merged): when the base model came from
  an HF directory (the checkpointer's ``checkpoint_dir`` has a ``config.json``), a standard HF
  reward model (:mod:`fastrm.hf.export`: ``config.json`` with
  ``<Family>ForSequenceClassification``, ``model.safetensors`` with ``score.weight``, or
  shards + ``model.safetensors.index.json`` above the config's ``max_shard_size``, default
  "5GB"; converted and written one layer at a time as the tensors are gathered, so rank 0
  never holds the full model; the tokenizer files); otherwise ``reward_model.safetensors``
  (fastrm's ``decoder.*`` / ``head.weight`` keys);
* ``reward_stats.json``: reward mean/std on the validation split, to normalize rewards (also in
  ``config.json`` as OpenRLHF's ``mean`` / ``std``);
* ``training_state/``: the resumable state, sharded with torch.distributed.checkpoint
  (:mod:`fastrm.training.training_state`: trainable shards, optimizer, RNG per rank, data
  position, history).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from fastrm._io import atomic_path, atomic_symlink

STATS_FILE = "reward_stats.json"


# ---------------------------------------------------------------------- gather
def iter_model_tensors(model: nn.Module, is_rank_zero: bool
                       ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """The model's ``(key, CPU tensor)`` entries, gathered from shards under FSDP one tensor
    at a time (:func:`~fastrm.training.distributed.iter_full_tensors`); ``None`` tensors on
    ranks > 0."""
    from fastrm.training.distributed import iter_full_tensors

    return iter_full_tensors(model, is_rank_zero)


# ---------------------------------------------------------------------- files
MODEL_FILE = "reward_model.safetensors"


class ModelWriter:
    """Writes the reward model of a run into a checkpoint directory, in the format decided once
    at ``setup()`` from the config (see the module docstring).

    Args:
        cfg: the run's config.
        checkpointer: the run's checkpointer (or None); its ``_checkpoint_dir`` locates the base
            HF directory.
        tokenizer: the run's tokenizer; an :class:`~fastrm.models.tokenizer.HFChatTokenizer`
            is exported as it was used, any other tokenizer is replaced by the base directory's.
    """

    def __init__(self, cfg: DictConfig, checkpointer: Any, tokenizer: Any) -> None:
        self.lora_rank: Optional[int] = None  # from the model's LoRA layers (check())
        self.lora_alpha: Optional[float] = None
        self.hf_config: Optional[dict] = None
        self.tokenizer = None
        self.generation_config: Optional[Path] = None
        from fastrm.hf.export import MAX_SHARD_SIZE, parse_shard_size

        #: the config's ``max_shard_size`` (bytes or "5GB"-like; checked here, before training)
        self.max_shard_size = parse_shard_size(cfg.get("max_shard_size", None) or MAX_SHARD_SIZE)
        src = getattr(checkpointer, "_checkpoint_dir", None)
        if src is None or not (Path(src) / "config.json").is_file():
            return
        from fastrm.hf.families import family_for, read_config
        from fastrm.models.tokenizer import HFChatTokenizer

        src = Path(src)
        self.hf_config = read_config(src)
        family_for(self.hf_config)  # an unsupported family fails here, before training
        if isinstance(tokenizer, HFChatTokenizer):
            self.tokenizer = tokenizer
        elif (src / "tokenizer.json").is_file():
            self.tokenizer = HFChatTokenizer(src)
        else:
            raise ValueError(f"the base model {src} is an HF directory without tokenizer.json and the "
                             "run's tokenizer is not an HF tokenizer: an exported reward model needs "
                             "its tokenizer files; use fastrm.models.tokenizer.hf_tokenizer")
        self.generation_config = src / "generation_config.json"

    @property
    def hf(self) -> bool:
        return self.hf_config is not None

    def check(self, model: nn.Module) -> None:
        """Everything a save needs, checked on the model's real state-dict keys and shapes (no
        copies): the family's conversion round trip against transformers' class, and a pad
        token for the tokenizer. LoRA rank / alpha are read from the adapted layers here.
        Raises ValueError before any training."""
        model_sd = {n.replace("._checkpoint_wrapped_module", ""): v for n, v in model.state_dict().items()}
        for m in model.modules():
            if "lora_a" in dict(m.named_children()) and hasattr(m, "rank") and hasattr(m, "alpha"):
                self.lora_rank, self.lora_alpha = int(m.rank), float(m.alpha)
                break
        if not self.hf:
            return
        from fastrm.hf.export import choose_pad_token
        from fastrm.hf.families import check_conversion

        check_conversion(model_sd, self.hf_config)
        choose_pad_token(self.tokenizer)

    def write(self, out: Path, tensors: Iterable[tuple[str, Optional[torch.Tensor]]],
              stats: dict[str, Any], is_rank_zero: bool = True) -> None:
        """The reward model files into the folder ``out`` (the caller makes the folder atomic).
        ``tensors``: the model's ``(key, tensor)`` stream, :func:`iter_model_tensors`; every
        rank must call this (under FSDP each sharded entry is a collective), only rank 0
        writes. An HF export is converted and written one decoder layer at a time into
        bounded safetensors shards (:func:`fastrm.hf.export.write_hf_directory`), so rank 0
        never holds the full model; the fastrm-format file is one safetensors file, assembled
        on rank 0."""
        if not is_rank_zero:
            for _ in tensors:  # take part in each gather
                pass
            return
        from fastrm.hf.export import iter_layers, merge_lora, write_hf_directory

        if not self.hf:
            sd: dict[str, torch.Tensor] = {}
            for group in iter_layers(tensors):
                sd.update(merge_lora(group, self.lora_rank, self.lora_alpha))
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out / MODEL_FILE),
                      metadata={"format": "pt"})
            return
        write_hf_directory(out, tensors, self.hf_config, self.tokenizer,
                           reward_mean=stats.get("reward_mean"), reward_std=stats.get("reward_std"),
                           generation_config=self.generation_config,
                           max_shard_size=self.max_shard_size, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)


def save_reward_stats(out: Path, stats: dict[str, Any], step: int) -> None:
    with atomic_path(out / STATS_FILE) as tmp:
        tmp.write_text(json.dumps({
            "reward_mean": stats.get("reward_mean"), "reward_std": stats.get("reward_std"),
            "val_accuracy": stats.get("accuracy"), "step": step,
            "note": "normalize rewards as (r - reward_mean) / reward_std",
        }, indent=2))


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


