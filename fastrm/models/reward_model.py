"""A reward model around any torchtune ``TransformerDecoder``, trained on packed batches.

The decoder's LM output projection is replaced by :class:`torch.nn.Identity` (logits are never
computed) and a :class:`RewardHead` ``D -> 1`` scores hidden states, only at the positions that
are asked for (one per response, ``N << T``). Attention inside every layer is packed
variable-length attention (:mod:`fastrm.attention`): a flat row ``[1, T]`` holds many sequences
(segments) and each attends causally within itself plus, optionally, to a shared prompt prefix.

Shapes: ``T`` packed tokens, ``D`` embedding dim, ``N`` scored responses, ``S`` segments.

The module tree stays torchtune-like (``model.decoder.layers[i]`` are
``TransformerSelfAttentionLayer``), so ``torchtune.training.set_activation_checkpointing`` and
FSDP2 ``fully_shard`` per layer + root work unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from fastrm.attention import VarlenMetadata, check_backend, enable_varlen_attention
from fastrm.data.batch import PackedBatch
from fastrm.models.fused import recompute_norm_outputs

log = logging.getLogger(__name__)

#: LM-head keys a torchtune checkpointer returns that a reward model has no use for.
LM_HEAD_KEYS = ("output.weight", "output.bias")


class RewardHead(nn.Linear):
    """``r = h @ w``: hidden ``[..., D]`` -> reward ``[..., 1]``, no bias.

    Bias-free like HF's ``*ForSequenceClassification.score`` (so a saved checkpoint gives the
    same rewards in transformers, TRL, OpenRLHF and vLLM): a bias shifts every reward by the
    same amount, which no pairwise loss sees, and centering (``RewardLoss(center_rewards=...)``)
    acts through the weights.

    Marked as a torchtune adapter (``adapter_params()``), so torchtune's PEFT utilities
    (``get_adapter_params`` + ``set_trainable_params``, adapter checkpoints) train and save the
    head alongside the LoRA weights: with LoRA the backbone is frozen but the head is fully
    trained.

    Args:
        embed_dim: ``D``.
        init_std: weights ``~ N(0, init_std^2)``. Default ``1 / sqrt(D + 1)`` (the
            initialisation of TRL / OpenRLHF reward heads).
    """

    def __init__(self, embed_dim: int, init_std: Optional[float] = None) -> None:
        self.init_std = init_std
        super().__init__(embed_dim, 1, bias=False)

    def reset_parameters(self) -> None:
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(self.in_features + 1)
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def adapter_params(self) -> list[str]:
        """Parameter names torchtune's ``get_adapter_params`` treats as trainable adapters."""
        return ["weight"]


class RewardModel(nn.Module):
    """Reward model: torchtune decoder without LM head + :class:`RewardHead`.

    Args:
        decoder: a torchtune ``TransformerDecoder``; its ``output`` is replaced by
            ``nn.Identity`` and its attention modules get packed varlen attention.
        head: the reward head; default a fresh ``RewardHead(D, head_init_std)``.
        head_init_std: init std of a fresh head (default ``1 / sqrt(D + 1)``).
        attention_backend: attention backend for packed batches (``None`` / ``"auto"``,
            ``"flash_attn"``, ``"torch_varlen"``, ``"flex"``, ``"sdpa_segments"``, ``"reference"``);
            the env var ``FASTRM_ATTENTION_BACKEND`` applies when this is ``None``.
        fused_ops: replace torchtune's RMSNorm, SwiGLU MLP and RoPE modules with the lean
            ones of :mod:`fastrm.models.fused` (same parameters and math, about half the
            activation memory; default). ``False`` keeps torchtune's modules.

    State-dict keys: ``decoder.*`` (torchtune names under ``decoder.``), ``head.weight [1, D]``
    (a custom ``head`` may add ``head.bias``; HF export needs the bias-free :class:`RewardHead`).
    """

    def __init__(
        self,
        decoder: nn.Module,
        head: Optional[nn.Linear] = None,
        *,
        head_init_std: Optional[float] = None,
        attention_backend: Optional[str] = None,
        fused_ops: bool = True,
    ) -> None:
        super().__init__()
        from torchtune.modules import TransformerDecoder

        if not isinstance(decoder, TransformerDecoder):
            raise ValueError(
                f"decoder must be a torchtune TransformerDecoder, got {type(decoder).__name__}"
            )
        # The LM projection (vocab x D, possibly tied to the embeddings) is never evaluated.
        decoder.output = nn.Identity()
        enable_varlen_attention(decoder)
        self.fuse_report = None
        if fused_ops:
            from fastrm.models.fused import fuse_layers

            self.fuse_report = fuse_layers(decoder)
        #: packed forward: norm outputs are recomputed in the backward instead of kept
        #: (fastrm.models.fused.recompute_norm_outputs; only with fused_ops)
        self.recompute_norm_outputs = fused_ops
        self.decoder = decoder
        self.embed_dim = int(decoder.tok_embeddings.embedding_dim)
        if head is None:
            head = RewardHead(self.embed_dim, head_init_std)
        if head.in_features != self.embed_dim or head.out_features != 1:
            raise ValueError(
                f"head must map D={self.embed_dim} -> 1, got {head.in_features} -> {head.out_features}"
            )
        self.head = head
        self.attention_backend = check_backend(attention_backend)

    # ------------------------------------------------------------------------------------------
    # packed path
    # ------------------------------------------------------------------------------------------
    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        segment_prefix: Optional[torch.Tensor] = None,
        *,
        metadata: Optional[VarlenMetadata] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states of a packed row (what the LM head would have seen).

        Args:
            tokens: ``[1, T]`` token ids.
            position_ids: ``[1, T]`` RoPE positions (restart at 0 per sequence / prompt;
                a response with a prefix continues from the prefix length).
            cu_seqlens: ``[S + 1]`` segment boundaries.
            segment_prefix: ``[S, 2]`` prefix ranges or ``None``.
            metadata: prebuilt :class:`VarlenMetadata` (then ``cu_seqlens`` is ignored).

        Returns:
            ``[T, D]`` hidden states in the decoder's dtype.
        """
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must be one packed row [1, T], got {tuple(tokens.shape)}")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.shape != tokens.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} must match tokens {tuple(tokens.shape)}"
            )
        device = tokens.device
        if metadata is None:
            if cu_seqlens is None:
                raise ValueError("hidden_states needs cu_seqlens (or metadata)")
            metadata = VarlenMetadata.build(
                cu_seqlens.to(device),
                None if segment_prefix is None else segment_prefix.to(device),
                backend=self.attention_backend,
            )
        t = tokens.shape[1]
        if metadata.total_tokens != t:
            raise ValueError(f"cu_seqlens ends at {metadata.total_tokens} but tokens has T={t}")
        # RoPE indexes its cache with the positions: an out-of-range id would be a device
        # assert on CUDA, so check here (one host sync for both bounds)
        min_pos, max_pos = (int(x) for x in torch.stack(torch.aminmax(position_ids)).tolist())
        if max_pos >= self.decoder.max_seq_len or min_pos < 0:
            raise ValueError(
                f"position_ids must lie in [0, max_seq_len={self.decoder.max_seq_len}), got "
                f"[{min_pos}, {max_pos}]: a sequence is longer than the model's RoPE cache; pack "
                "with a smaller max_seq_len or build the decoder with a larger max_seq_len"
            )
        dec = self.decoder
        with recompute_norm_outputs(self.recompute_norm_outputs and self.fuse_report is not None):
            h = dec.tok_embeddings(tokens)
            for layer in dec.layers:
                h = layer(h, mask=metadata, input_pos=position_ids)
            # norm of [T, D] (not a view of [1, T, D]): FSDP2 hooks the root's output for
            # backward and warns about views that an in-place op could detach from that hook
            return dec.norm(h[0])

    def forward(self, batch: PackedBatch, *, return_rewards: bool = False) -> torch.Tensor:
        """``[T, D]`` hidden states of ``batch`` (for the fused head + loss), or ``[N]`` rewards
        at ``batch.reward_positions`` when ``return_rewards``."""
        hidden = self.hidden_states(
            batch.tokens, batch.position_ids, batch.cu_seqlens, batch.segment_prefix
        )
        if not return_rewards:
            return hidden
        return self.score(hidden, batch.reward_positions)

    def rewards(self, batch: PackedBatch) -> torch.Tensor:
        """``[N]`` float32 rewards, the head evaluated at ``batch.reward_positions`` only."""
        return self(batch, return_rewards=True)

    def score(self, hidden: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``head(hidden[positions])`` as ``[N]`` float32. The rows are selected first, so the
        head never sees ``[T, D]`` (``hidden`` may also be an already selected ``[N, D]``)."""
        if positions is not None:
            hidden = hidden.index_select(0, positions.to(hidden.device))
        # [N, 1] -> [N] float32; a (one-element) sum rather than squeeze so the result is a new
        # tensor, not a view (FSDP2 registers its pre-backward hook on the root's output)
        return self.head(hidden).sum(-1, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------
    # padded path (baselines, evaluation, models without varlen support)
    # ------------------------------------------------------------------------------------------
    def forward_padded(
        self,
        tokens: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        *,
        return_rewards: bool = False,
    ) -> torch.Tensor:
        """Plain causal forward of a right-padded batch (baselines, evaluation, models without
        packed attention).

        Args:
            tokens: ``[B, L]`` token ids, sequence ``b`` in ``tokens[b, :lengths[b]]``, padding
                after it (causal attention means real tokens never see the padding).
            lengths: ``[B]`` real lengths in ``[1, L]``; required with ``return_rewards``.
            return_rewards: return ``[B]`` float32 rewards at each last real token instead.

        Returns:
            ``[B, L, D]`` final-norm hidden states (rows past a sequence's length are padding
            garbage), or ``[B]`` rewards.

        Under FSDP2 call :func:`register_fsdp_forward_methods` once after ``fully_shard`` so this
        method unshards the root parameters like ``forward`` does.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got {tuple(tokens.shape)}")
        if lengths is not None:
            if lengths.shape != (tokens.shape[0],):
                raise ValueError(f"lengths must be [B] = [{tokens.shape[0]}], got {tuple(lengths.shape)}")
            if bool(((lengths < 1) | (lengths > tokens.shape[1])).any()):
                raise ValueError(f"lengths must lie in [1, L={tokens.shape[1]}]")
        elif return_rewards:
            raise ValueError("forward_padded(return_rewards=True) needs lengths")
        dec = self.decoder
        h = dec.tok_embeddings(tokens)
        for layer in dec.layers:
            h = layer(h)  # mask=None -> torchtune's own causal SDPA
        h = dec.norm(h)
        if not return_rewards:
            return h
        idx = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(h[idx, lengths.to(tokens.device) - 1])

    def rewards_padded(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 rewards at each right-padded sequence's last real token."""
        return self.forward_padded(tokens, lengths, return_rewards=True)


def register_fsdp_forward_methods(model: RewardModel) -> None:
    """After ``fully_shard(model)``: lets ``model.forward_padded`` (and so ``rewards_padded``)
    run FSDP2's unshard / reshard hooks like ``forward``. ``forward``, ``rewards`` (which calls
    ``forward``) need nothing. ``hidden_states`` is the body of ``forward``: under FSDP2 call
    ``model(batch)`` instead."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "forward_padded")


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_base_weights` did: keys dropped (LM head) and adapter keys left at init."""

    dropped: list[str] = field(default_factory=list)
    adapter_keys_initialised: list[str] = field(default_factory=list)
    loaded: int = 0
    head_loaded: bool = False


def _adapter_keys(decoder: nn.Module) -> set[str]:
    from torchtune.modules.peft import get_adapter_params

    return set(get_adapter_params(decoder).keys())


def load_base_weights(
    model: RewardModel, state_dict: Mapping[str, torch.Tensor]
) -> LoadReport:
    """Loads a torchtune base-model state dict (``checkpointer.load_checkpoint()["model"]``) into
    ``model.decoder``.

    The LM head (``output.weight``) is dropped and reported; every other decoder key must be
    present and match, except LoRA / DoRA adapter weights, which keep their initialisation
    (``lora_b`` starts at zero, so the model equals the base model). Keys may carry a
    ``decoder.`` prefix. A ``head.weight`` key (a reward-model checkpoint, e.g. an HF
    ``score.weight`` read by :class:`fastrm.hf.HFCheckpointer`) is loaded into the head
    (``report.head_loaded``); without it the head is not touched.

    Raises:
        ValueError: listing missing or unexpected keys.
    """
    report = LoadReport()
    sd: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        name = k[len("decoder."):] if k.startswith("decoder.") else k
        if name in LM_HEAD_KEYS:
            report.dropped.append(name)
            continue
        if k.startswith("head."):
            head[k[len("head."):]] = v
            continue
        sd[name] = v
    missing, unexpected = model.decoder.load_state_dict(sd, strict=False)
    adapters = _adapter_keys(model.decoder)
    real_missing = [k for k in missing if k not in adapters]
    if real_missing or unexpected:
        raise ValueError(
            "base checkpoint does not match the decoder: "
            f"missing {real_missing[:8]}{'...' if len(real_missing) > 8 else ''} "
            f"({len(real_missing)}), unexpected {list(unexpected)[:8]} ({len(unexpected)}); "
            "check model_type / the builder the checkpoint was made for"
        )
    if head:  # a reward model checkpoint (HFCheckpointer maps score.weight to head.weight)
        if set(head) != {"weight"} or tuple(head["weight"].shape) != (1, model.embed_dim):
            raise ValueError(f"checkpoint head {sorted(head)} does not fit a bias-free head D={model.embed_dim} -> 1")
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
        report.head_loaded = True
    report.adapter_keys_initialised = sorted(k for k in missing if k in adapters)
    report.loaded = len(sd)
    if report.dropped:
        log.info("reward model: dropped LM-head keys %s from the base checkpoint", report.dropped)
    return report


def load_from_checkpointer(
    model: RewardModel, checkpointer, head_checkpoint: Optional[str] = None
) -> LoadReport:
    """Loads base weights through a torchtune checkpointer (``FullModelHFCheckpointer``,
    ``FullModelMetaCheckpointer``, ...) and the head from ``head_checkpoint`` if given (else the
    head stays freshly initialised)."""
    ckpt = checkpointer.load_checkpoint()
    report = load_base_weights(model, ckpt["model"])
    if head_checkpoint is not None:
        load_head(model, head_checkpoint)
    return report


HEAD_KEYS = ("head.weight",)


def head_state_dict(model: RewardModel) -> dict[str, torch.Tensor]:
    """``{"head.weight": [1, D]}`` (detached, CPU)."""
    return {f"head.{k}": v.detach().cpu() for k, v in model.head.state_dict().items()}


def _check_zero_bias(bias: Optional[torch.Tensor], where: str) -> None:
    if bias is not None and bool(torch.count_nonzero(bias.detach().float())):
        raise ValueError(
            f"{where} has a non-zero bias ({bias.detach().float().reshape(-1)[:1].item():.6g}): "
            "fastrm reward heads have no bias (as HF's score); a bias adds the same constant to "
            "every reward and cancels in every comparison. Drop it (or fold it into your reward "
            "normalization) and save the weight alone")


def write_head(path: str | os.PathLike, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> None:
    """Writes a reward head file: ``head.weight [1, D]`` (the :class:`RewardModel` state-dict
    key), as safetensors for a ``.safetensors`` path, a torch file otherwise, atomically.
    ``bias`` must be None or zero (heads are bias-free). The one writer of head files:
    :func:`save_head` and the decomposed heads use it."""
    from fastrm._io import atomic_path

    _check_zero_bias(bias, "the head to write")
    sd = {"head.weight": weight.detach().reshape(1, -1).cpu().contiguous()}
    with atomic_path(path) as tmp:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)


def read_head(path: str | os.PathLike, embed_dim: int) -> dict[str, torch.Tensor]:
    """Reads a reward head into ``{"weight": [1, D]}`` (a bias-free ``nn.Linear(D, 1)`` state
    dict), checking its shape against ``embed_dim``. Accepts a file written by
    :func:`write_head`; older head files with a ``head.bias`` (or un-prefixed ``weight`` /
    ``bias``) when that bias is zero; and an HF reward model directory (or its safetensors
    file), whose ``score.weight`` is the head."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"head checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        from fastrm.hf.load import load_hf_state_dict

        sd = load_hf_state_dict(path)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if "score.weight" in sd:  # an HF *ForSequenceClassification checkpoint
        sd = {k[len("score."):]: v for k, v in sd.items() if k.startswith("score.")}
    sd = {k[len("head."):] if k.startswith("head.") else k: v for k, v in sd.items()}
    if set(sd) not in ({"weight"}, {"weight", "bias"}):
        raise ValueError(
            f"head checkpoint {path!r} must hold head.weight (or an HF score.weight), got {sorted(sd)[:6]}"
        )
    if "bias" in sd:
        if sd["bias"].numel() != 1:
            raise ValueError(f"head.bias in {path!r} has shape {tuple(sd['bias'].shape)}, expected (1,)")
        _check_zero_bias(sd.pop("bias"), f"head checkpoint {path!r}")
    if tuple(sd["weight"].shape) != (1, embed_dim):
        raise ValueError(f"head.weight in {path!r} has shape {tuple(sd['weight'].shape)}, "
                         f"expected {(1, embed_dim)} (a head for a model with D={embed_dim})")
    return sd


def save_head(model: RewardModel, path: str) -> None:
    """Writes ``model``'s head with :func:`write_head`."""
    write_head(path, model.head.weight, model.head.bias)


def load_head(model: RewardModel, path: str) -> None:
    """Loads a head (:func:`read_head`: shape checked) into ``model.head``, cast to the head's
    dtype."""
    sd = read_head(path, model.embed_dim)
    if model.head.bias is not None:  # a custom head with a bias: the file's bias is zero
        sd["bias"] = torch.zeros_like(model.head.bias)
    model.head.load_state_dict(sd)
