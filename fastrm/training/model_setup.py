"""The model side of a recipe run: build the reward model from the config (in one process,
or on the meta device and sharded with FSDP2 over several ranks, each materialising only its
shards), initialise what no checkpoint holds (head, adapters) the same way on both paths,
choose what trains, bind the head to the loss in one step module."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from torchtune import config, training, utils

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss

log = utils.get_logger("INFO")


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                seed: Optional[int] = None) -> tuple[nn.Module, Any]:
    """Instantiates ``cfg.model`` (a :class:`fastrm.models.RewardModel`) on ``device``, loads
    the backbone through ``cfg.checkpointer``, initialises the parameters the base checkpoint
    does not hold (:func:`fresh_parameters`, from ``seed``: the reward head unless a head file
    is given, LoRA adapters), loads the head from ``cfg.head_checkpoint``, then applies
    :func:`configure_model`. Returns ``(model, checkpointer)`` (``checkpointer`` is ``None``
    without a ``checkpointer`` section). This is the one-process path; several ranks build
    with :func:`build_sharded_step_module`."""
    from fastrm.models import load_base_weights
    from fastrm.models.reward_model import load_head

    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    _check_reward_model(model)
    if seed is not None:
        fresh = fresh_parameters(model, seed, head=head_file(cfg) is None)
        with torch.no_grad():
            for name, value in fresh.items():
                model.get_parameter(name).copy_(value)
    checkpointer = None
    if cfg.get("checkpointer") is not None:
        checkpointer = config.instantiate(cfg.checkpointer)
        state = checkpointer.load_checkpoint()
        report = load_base_weights(model, state[training.MODEL_KEY])
        del state
        utils.log_rank_zero(log, f"loaded {report.loaded} backbone tensors from "
                                 f"{getattr(checkpointer, '_checkpoint_dir', '?')}")
    init_dora_magnitudes(model)
    if cfg.get("head_checkpoint"):
        load_head(model, str(cfg.head_checkpoint))
    configure_model(model, cfg)
    return model.to(device), checkpointer


def _check_reward_model(model: nn.Module) -> None:
    if not hasattr(model, "head") or not hasattr(model, "decoder"):
        raise ValueError("model._component_ must build a fastrm.models.RewardModel "
                         "(e.g. fastrm.models.reward_model)")


def configure_model(model: nn.Module, cfg: DictConfig) -> None:
    """What the config asks of a built model besides its weights: ``attention_backend``, the
    ``trainable`` policy, activation checkpointing, ``compile`` (the same on both paths)."""
    from fastrm.attention import check_backend

    if cfg.get("attention_backend"):
        model.attention_backend = check_backend(cfg.attention_backend)
    apply_trainable_policy(model, cfg.get("trainable"))
    if cfg.get("enable_activation_checkpointing", False):
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if cfg.get("compile", False):
        for layer in model.decoder.layers:
            layer.compile()


def head_file(cfg: DictConfig) -> Optional[str]:
    """The reward-head file a config loads: ``head_checkpoint`` (loaded last, so it wins) or
    the model builder's own ``head_checkpoint`` argument; ``None`` for a fresh head."""
    path = cfg.get("head_checkpoint") or cfg.model.get("head_checkpoint")
    return None if path is None else str(path)


#: offset of the seed the fresh head / adapters are drawn from, so they are not the first
#: draws of the stream the backbone's random initialisation (same config seed) starts with
FRESH_SEED_OFFSET = 104_729


def _lora_modules(model: nn.Module):
    from torchtune.modules.peft import DoRALinear, LoRALinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]


class _AdapterPair(nn.Module):
    """CPU stand-in for a LoRA / DoRA module: its ``lora_a`` and ``lora_b`` only, which is all
    torchtune's ``initialize_parameters`` touches."""

    def __init__(self, lora_a: nn.Module, lora_b: nn.Module) -> None:
        super().__init__()
        self.lora_a, self.lora_b = lora_a, lora_b


@torch.no_grad()
def fresh_parameters(model: nn.Module, seed: int, *, head: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU values of the parameters a base checkpoint does not hold: LoRA / DoRA adapters
    (torchtune's ``initialize_parameters``: ``lora_a`` Kaiming-uniform, ``lora_b`` zeros) in
    module order, then the reward head (its ``reset_parameters``; skipped with ``head=False``),
    drawn from the CPU generator seeded with ``seed + FRESH_SEED_OFFSET`` (the global RNG is
    left as it was).

    Works on a model on the meta device (each small module is copied, materialised on the CPU
    and initialised there), so a model built on the meta device and sharded starts from exactly
    the head and adapters of the one built in one process. Keys are ``model``'s parameter
    names. DoRA magnitudes depend on the loaded base weights: :func:`init_dora_magnitudes`."""
    import copy

    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + FRESH_SEED_OFFSET)
        for name, m in _lora_modules(model):
            pair = _AdapterPair(copy.deepcopy(m.lora_a), copy.deepcopy(m.lora_b)).to_empty(device="cpu")
            type(m).initialize_parameters(pair)
            for k, v in pair.state_dict().items():
                out[f"{name}.{k}"] = v
            if hasattr(m, "magnitude"):  # DoRA: a placeholder until init_dora_magnitudes
                out[f"{name}.magnitude"] = torch.ones(m.magnitude.shape, dtype=m.magnitude.dtype)
        if head:
            h = copy.deepcopy(model.head).to_empty(device="cpu")
            h.reset_parameters()
            out.update({f"head.{k}": v for k, v in h.state_dict().items()})
    return out


@torch.no_grad()
def init_dora_magnitudes(model: nn.Module) -> None:
    """DoRA magnitudes from the loaded base weights (torchtune's ``initialize_dora_magnitude``;
    it must run after the base weights and adapters are in place)."""
    for m in model.modules():
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()


def build_sharded_step_module(cfg: DictConfig, loss_fn: RewardLoss, device: torch.device,
                              dtype: torch.dtype, world_size: int, rank: int, seed: int,
                              reshard_after_forward: bool = True) -> tuple["RewardModelStep", Any]:
    """The several-rank path, as torchtune's distributed recipes build: the model is
    instantiated on the meta device (no memory), configured (:func:`configure_model`), wrapped
    in :class:`RewardModelStep` and sharded (:func:`shard`); then every rank materialises only
    its own shards, RoPE caches are built (``rope_init``) and the full state dict is sent
    from rank 0 tensor by tensor (``set_model_state_dict(full_state_dict=True,
    broadcast_from_rank0=True)``, what ``training.load_from_full_model_state_dict`` calls).

    Rank 0 reads the base checkpoint through the config's torchtune checkpointer (one read of
    the files, every checkpointer and model type torchtune converts; the other ranks hold no
    full copy at any time); the head and adapters come from :func:`fresh_parameters` (or the
    head file), so they equal the one-process path's. Without a checkpointer the random
    backbone is the "checkpoint": rank 0 builds the model on the CPU exactly as
    :func:`build_model` does and sends its weights. Returns ``(step_module, checkpointer)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from fastrm.models import load_base_weights
    from fastrm.models.reward_model import LM_HEAD_KEYS, read_head

    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg.model)
    _check_reward_model(model)
    checkpointer = None
    if cfg.get("checkpointer") is not None:
        checkpointer = config.instantiate(cfg.checkpointer)
    full_sd: dict[str, torch.Tensor] = {}
    if rank == 0:
        if checkpointer is None:
            torch.manual_seed(seed)
            cpu_model, _ = build_model(cfg, torch.device("cpu"), dtype, seed=seed)
            full_sd = {k: v for k, v in cpu_model.state_dict().items()}
            del cpu_model
        else:
            path = head_file(cfg)
            # the same order as build_model: fresh head / adapters, then the checkpoint (whose
            # head.weight, from a reward-model base, wins), then the head file
            full_sd = fresh_parameters(model, seed, head=path is None)
            base = checkpointer.load_checkpoint()[training.MODEL_KEY]
            with warnings.catch_warnings():  # on meta: checks names and shapes, copies nothing
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
                load_base_weights(model, base)
            for k, v in base.items():
                name = k[len("decoder."):] if k.startswith("decoder.") else k
                if name not in LM_HEAD_KEYS:
                    full_sd[name if name.startswith("head.") else f"decoder.{name}"] = v
            del base
            utils.log_rank_zero(log, f"rank 0 read {len(full_sd)} tensors from "
                                     f"{getattr(checkpointer, '_checkpoint_dir', '?')}")
            if path is not None:
                full_sd.update({f"head.{k}": v for k, v in read_head(path, model.embed_dim).items()})
            if getattr(model.head, "bias", None) is not None:  # a custom head: files have no bias
                full_sd.setdefault("head.bias", torch.zeros(model.head.bias.shape))
    configure_model(model, cfg)
    step_module = RewardModelStep(model, loss_fn)
    shard(step_module, device, world_size, reshard_after_forward)
    with training.set_default_dtype(dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):  # RoPE caches are buffers no checkpoint holds
                m.rope_init()
    # the state dict's names (activation checkpointing's wrapper is not part of them)
    expected = model.state_dict()
    if rank == 0:
        unknown = sorted(set(full_sd) - set(expected))
        if unknown:
            raise ValueError(f"state dict names not in the model: {unknown[:8]}")
        full_sd = {k: v.to(expected[k].dtype) for k, v in full_sd.items()}
    set_model_state_dict(model, full_sd, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=True))
    del full_sd
    if checkpointer is not None:
        init_dora_magnitudes(model)
    training.validate_no_params_on_meta_device(model)
    return step_module, checkpointer


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
