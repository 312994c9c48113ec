"""Builders for reward models, usable from Python and from YAML ``_component_`` configs.

Examples (YAML, instantiated with ``torchtune.config.instantiate``)::

    model:
      _component_: fastrm.models.reward_model
      decoder: torchtune.models.llama3_2.llama3_2_1b     # any torchtune decoder builder
      attention_backend: null                             # auto

    model:
      _component_: fastrm.models.lora_reward_model
      decoder: torchtune.models.llama3_2.lora_llama3_2_1b
      lora_attn_modules: [q_proj, v_proj]
      lora_rank: 8
      lora_alpha: 16

Base weights are loaded afterwards from a torchtune checkpointer with
:func:`fastrm.models.reward_model.load_from_checkpointer`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from fastrm.models.reward_model import RewardModel, load_head

DecoderSpec = Union[nn.Module, str, Callable[..., nn.Module]]


def _import_object(path: str):
    """``"pkg.module.attr"`` -> the attribute (the longest importable module prefix wins)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        return obj
    raise ValueError(
        f"cannot import {path!r}: give a dotted path to a torchtune decoder builder such as "
        "'torchtune.models.llama3_2.llama3_2_1b'"
    )


def _build_decoder(decoder: DecoderSpec, builder_kwargs: dict) -> nn.Module:
    if isinstance(decoder, nn.Module):
        if builder_kwargs:
            raise ValueError(
                f"builder kwargs {sorted(builder_kwargs)} were given with an already built decoder"
            )
        return decoder
    fn = _import_object(decoder) if isinstance(decoder, str) else decoder
    if not callable(fn):
        raise ValueError(f"decoder must be a module, a builder or a dotted path, got {decoder!r}")
    return fn(**builder_kwargs)


def reward_model(
    decoder: DecoderSpec,
    *,
    head_init_std: Optional[float] = None,
    head_checkpoint: Optional[str] = None,
    attention_backend: Optional[str] = None,
    fused_ops: bool = True,
    **builder_kwargs,
) -> RewardModel:
    """A :class:`RewardModel` around a torchtune decoder.

    Args:
        decoder: a built ``TransformerDecoder``, a builder callable, or its dotted path (e.g.
            ``"torchtune.models.qwen2_5.qwen2_5_0_5b"``); builders get ``**builder_kwargs``.
        head_init_std: std of the fresh head (default ``1 / sqrt(D + 1)``).
        head_checkpoint: file with ``head.weight`` / ``head.bias`` to load instead.
        attention_backend: packed attention backend (``None``: automatic).
        fused_ops: lean RMSNorm / SwiGLU / RoPE modules (:mod:`fastrm.models.fused`; default);
            ``False`` keeps torchtune's own modules.
    """
    model = RewardModel(
        _build_decoder(decoder, builder_kwargs),
        head_init_std=head_init_std,
        attention_backend=attention_backend,
        fused_ops=fused_ops,
    )
    if head_checkpoint is not None:
        load_head(model, head_checkpoint)
    return model


def lora_reward_model(
    decoder: Union[str, Callable[..., nn.Module]],
    *,
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    head_init_std: Optional[float] = None,
    head_checkpoint: Optional[str] = None,
    attention_backend: Optional[str] = None,
    fused_ops: bool = True,
    set_trainable: bool = True,
    **builder_kwargs,
) -> RewardModel:
    """A LoRA reward model: a torchtune LoRA decoder builder (``lora_llama3_2_1b``,
    ``lora_qwen2_5_0_5b``, ``lora_llama3`` component builder, ...) plus a fully trained head.

    With ``set_trainable`` (default) only the adapters and the head require grad, via torchtune's
    ``get_adapter_params`` / ``set_trainable_params`` (the head declares itself an adapter, so a
    torchtune LoRA recipe that does the same thing also trains and saves it).
    ``apply_lora_to_output`` is refused: the LM output projection is removed.
    """
    if builder_kwargs.get("apply_lora_to_output"):
        raise ValueError(
            "apply_lora_to_output=True: a reward model has no LM output projection; drop it"
        )
    fn = _import_object(decoder) if isinstance(decoder, str) else decoder
    params = inspect.signature(fn).parameters
    kwargs = dict(builder_kwargs)
    kwargs.update(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )
    if "apply_lora_to_output" in params:
        kwargs["apply_lora_to_output"] = False
    model = reward_model(
        fn,
        head_init_std=head_init_std,
        head_checkpoint=head_checkpoint,
        attention_backend=attention_backend,
        fused_ops=fused_ops,
        **kwargs,
    )
    if set_trainable:
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        set_trainable_params(model, get_adapter_params(model))
    return model


def tiny_llama3(
    vocab_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    max_seq_len: int = 512,
    intermediate_dim: Optional[int] = None,
    rope_base: int = 500_000,
    norm_eps: float = 1e-5,
    seed: Optional[int] = None,
    output_scale: float = 1.0,
):
    """A small Llama 3 decoder from torchtune's component builder (tests, benchmarks, smoke
    configs; pair it with :class:`fastrm.data.tokenizer.ByteChatTokenizer`, ``vocab_size=261``).

    Args:
        seed: draw the random weights from this seed (without touching the global RNG), so a
            config gives the same model every time; ``None`` draws from the global RNG.
        output_scale: multiplies the LM output projection, so a random model's next-token
            distribution is peaked rather than nearly uniform (generation smoke runs).
    """
    from torchtune.models.llama3._component_builders import llama3

    def build():
        return llama3(
            vocab_size=vocab_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            embed_dim=embed_dim,
            max_seq_len=max_seq_len,
            intermediate_dim=intermediate_dim,
            rope_base=rope_base,
            norm_eps=norm_eps,
        )

    if seed is None:
        model = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
    if output_scale != 1.0:
        with torch.no_grad():
            model.output.weight.mul_(output_scale)
    return model


def tiny_lora_llama3(
    lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    max_seq_len: int = 512,
    intermediate_dim: Optional[int] = None,
    rope_base: int = 500_000,
    norm_eps: float = 1e-5,
    lora_rank: int = 4,
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
):
    """LoRA version of :func:`tiny_llama3` (torchtune's ``lora_llama3`` component builder)."""
    from torchtune.models.llama3._component_builders import lora_llama3

    return lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
    )


def tiny_llama3_reward_model(
    *,
    head_init_std: Optional[float] = None,
    attention_backend: Optional[str] = None,
    fused_ops: bool = True,
    **kwargs,
) -> RewardModel:
    """``reward_model(tiny_llama3(**kwargs))``: a complete tiny reward model in one component."""
    return reward_model(
        tiny_llama3(**kwargs), head_init_std=head_init_std, attention_backend=attention_backend,
        fused_ops=fused_ops,
    )
