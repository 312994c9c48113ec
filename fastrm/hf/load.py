"""Read HF model directories into fastrm: :func:`load_reward_model` (a trained reward model,
fastrm's export or any ``*ForSequenceClassification`` directory written by transformers) and
:class:`HFCheckpointer` (a torchtune-style checkpointer over any supported HF directory, causal
LM or reward model, single-file or sharded, for training configs)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file

from fastrm.hf.families import HEAD_KEY, build_decoder, family_for, from_hf, read_config

__all__ = ["HFCheckpointer", "LoadedRewardModel", "load_hf_state_dict", "load_reward_model"]


def weight_files(directory: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of an HF directory: the shards named by
    ``model.safetensors.index.json``, else ``model.safetensors``, else every ``*.safetensors``."""
    d = Path(directory).expanduser()
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3]}")
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no model.safetensors (nor an index or other "
                                "*.safetensors files); fastrm reads safetensors checkpoints only")
    return files


def load_hf_state_dict(directory: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory's safetensors files, HF names."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        sd.update(load_file(str(f)))
    return sd


@dataclass
class LoadedRewardModel:
    """What :func:`load_reward_model` returns.

    Attributes:
        model: the :class:`fastrm.models.RewardModel` (eval mode).
        tokenizer: the directory's :class:`fastrm.models.tokenizer.HFChatTokenizer` (its chat
            template; the reward is read at the last token of a conversation).
        reward_mean, reward_std: ``config.json``'s ``mean`` / ``std`` (OpenRLHF's keys) or None;
            normalize as ``(r - reward_mean) / reward_std``.
        config: the ``config.json`` contents.
    """

    model: Any
    tokenizer: Any
    reward_mean: Optional[float]
    reward_std: Optional[float]
    config: dict


def load_reward_model(path: Union[str, os.PathLike], *, dtype: Union[str, torch.dtype] = torch.float32,
                      device: Union[str, torch.device] = "cpu",
                      attention_backend: Optional[str] = None,
                      max_seq_len: Optional[int] = None) -> LoadedRewardModel:
    """Loads an HF reward model directory (a fastrm checkpoint, or any
    ``LlamaForSequenceClassification`` / ``Qwen2...`` / ``Qwen3...`` / ``Mistral...`` /
    ``Gemma...`` directory with ``num_labels=1``) as a fastrm :class:`~fastrm.models.RewardModel`.

    Args:
        path: the directory (``config.json``, safetensors weights with ``score.weight``,
            tokenizer files).
        dtype: parameter dtype (``torch.float32``, ``"bf16"``...).
        device: where the model goes.
        attention_backend: packed attention backend (None: automatic).
        max_seq_len: RoPE cache length (default the config's ``max_position_embeddings``).

    Raises:
        ValueError: not a reward model (no ``score.weight``: a causal LM; train one with
            ``fastrm init --from DIR``), an unsupported family, or keys that do not match.
    """
    from fastrm.models.reward_model import RewardModel, load_base_weights
    from fastrm.models.tokenizer import HFChatTokenizer
    from fastrm.training.dtype import resolve_dtype

    d = Path(path).expanduser()
    config = read_config(d)
    family_for(config)
    sd = from_hf(load_hf_state_dict(d), config)
    if HEAD_KEY not in sd:
        raise ValueError(f"{d} has no score.weight: it is not a reward model (a causal LM?); "
                         "train a reward model from it with `fastrm init --from DIR > rm.yaml`")
    dtype = resolve_dtype(dtype, torch.device(device)) if isinstance(dtype, str) else dtype
    from torchtune.training import set_default_dtype

    with set_default_dtype(dtype), torch.device(device):
        model = RewardModel(build_decoder(config, max_seq_len), attention_backend=attention_backend)
    load_base_weights(model, {k: v.to(dtype) for k, v in sd.items()})
    model.eval()
    tokenizer = HFChatTokenizer(d)
    return LoadedRewardModel(model=model, tokenizer=tokenizer, reward_mean=config.get("mean"),
                             reward_std=config.get("std"), config=config)


class HFCheckpointer:
    """torchtune-style checkpointer (``load_checkpoint() -> {"model": state_dict}``) over an
    HF model directory of any supported family: a causal LM (``lm_head`` dropped by fastrm) or
    a reward model (``score.weight`` is returned as ``head.weight``, so training continues
    from it), one file or shards (``model.safetensors.index.json``).

    fastrm's recipe saves through :mod:`fastrm.hf.export`, not through this class.

    Args:
        checkpoint_dir: the HF directory.
        output_dir: unused (torchtune's checkpointer signature).
    """

    def __init__(self, checkpoint_dir: str, output_dir: Optional[str] = None, **_: Any) -> None:
        self._checkpoint_dir = Path(checkpoint_dir).expanduser()
        self._config = read_config(self._checkpoint_dir)
        self.family = family_for(self._config)
        self._output_dir = output_dir

    def load_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        sd = from_hf(load_hf_state_dict(self._checkpoint_dir), self._config)
        out = {k[len("decoder."):] if k.startswith("decoder.") else k: v for k, v in sd.items()}
        return {"model": out}

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("fastrm saves reward models with fastrm.hf.export")
