"""The model side of a recipe run: build the reward model from the config, choose what
trains, bind the head to the loss in one step module, shard it with FSDP2."""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from torchtune import config, training, utils

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss

log = utils.get_logger("INFO")


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Instantiates ``cfg.model`` (a :class:`fastrm.models.RewardModel`), loads the backbone
    through ``cfg.checkpointer`` and the head from ``cfg.head_checkpoint``, applies
    ``cfg.attention_backend``, the ``trainable`` policy, activation checkpointing and
    ``compile``. Returns ``(model, checkpointer)`` (``checkpointer`` is ``None`` without a
    ``checkpointer`` section)."""
    from fastrm.attention import check_backend
    from fastrm.models import load_base_weights
    from fastrm.models.reward_model import load_head

    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    if not hasattr(model, "head") or not hasattr(model, "decoder"):
        raise ValueError("model._component_ must build a fastrm.models.RewardModel "
                         "(e.g. fastrm.models.reward_model)")
    checkpointer = None
    if cfg.get("checkpointer") is not None:
        checkpointer = config.instantiate(cfg.checkpointer)
        state = checkpointer.load_checkpoint()
        report = load_base_weights(model, state[training.MODEL_KEY])
        utils.log_rank_zero(log, f"loaded {report.loaded} backbone tensors from "
                                 f"{getattr(checkpointer, '_checkpoint_dir', '?')}")
    if cfg.get("head_checkpoint"):
        load_head(model, str(cfg.head_checkpoint))
    if cfg.get("attention_backend"):
        model.attention_backend = check_backend(cfg.attention_backend)
    apply_trainable_policy(model, cfg.get("trainable"))
    if cfg.get("enable_activation_checkpointing", False):
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if cfg.get("compile", False):
        for layer in model.decoder.layers:
            layer.compile()
    return model.to(device), checkpointer


def apply_trainable_policy(model: nn.Module, trainable: Optional[DictConfig]) -> None:
    """``trainable: {last_n_layers: k, embeddings: false, final_norm: true}`` freezes the
    backbone except its last ``k`` layers (and the final norm / embeddings when asked); the
    reward head always trains. Without the section every parameter trains (LoRA builders set
    their own policy and must not be combined with this section)."""
    if trainable is None:
        return
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("config section 'trainable' cannot be combined with a LoRA model "
                         "(LoRA already trains only adapters + head); remove 'trainable'")
    k = int(trainable.get("last_n_layers", 0))
    layers = model.decoder.layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"trainable.last_n_layers={k} must lie in [0, {len(layers)}]")
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    if trainable.get("final_norm", k > 0):
        for p in model.decoder.norm.parameters():
            p.requires_grad_(True)
    if trainable.get("embeddings", False):
        for p in model.decoder.tok_embeddings.parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)


class RewardModelStep(nn.Module):
    """Reward model + loss in one module: ``step(batch) -> (loss, rewards [N])``.

    The loss is bound to the model's head once (:meth:`fastrm.RewardLoss.set_head`, as
    torchtune binds the output projection to its chunked loss); the head is used inside this
    module's forward, so under FSDP2 (this module is the root unit, which holds the head) its
    parameters are gathered there exactly as every other layer's are in theirs."""

    def __init__(self, model: nn.Module, loss_fn: RewardLoss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        loss_fn.set_head(model.head)

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn.head_loss(self.model(batch), batch)


def shard(step_module: RewardModelStep, device: torch.device, world_size: int,
          reshard_after_forward: bool = True):
    """FSDP2 over a mesh of the run's device type (:func:`~fastrm.training.distributed.device_mesh`):
    every decoder layer is its own unit, the root (embeddings, norm, head) the last. Returns
    the mesh."""
    from torch.distributed.fsdp import fully_shard

    from fastrm.training.distributed import device_mesh

    mesh = device_mesh(device, world_size)
    for layer in step_module.model.decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(step_module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return mesh
