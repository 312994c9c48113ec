"""Memory plan of a reward-model run before any weight is loaded: ``fastrm plan``.

The model of the config is built on ``torch.device("meta")`` (shapes and dtypes, no storage:
a 70B model takes a fraction of a second and no memory), the config's trainable / LoRA policy is
applied, and the bytes each of ``N`` ranks holds are computed:

* **weights**: FSDP2 (``fully_shard``, as the recipe applies it for ``N > 1``) splits every
  parameter on dim 0 into ``N`` chunks padded to ``ceil(d0 / N)`` rows, which every rank
  allocates: ``sum_p ceil(d0_p / N) * (numel_p / d0_p) * itemsize``. One rank (``N = 1``) keeps
  every parameter whole. Buffers (the RoPE cache) are not sharded.
* **gradients**: the same sharded size for each trainable parameter, in the parameter's dtype
  (the recipe sets no FSDP mixed-precision policy: it trains the weights in ``dtype`` itself, as
  torchtune's recipes do, so there is no fp32 master copy).
* **optimizer state**: per trainable element and per trainable tensor, from the optimizer the
  config names (:func:`optimizer_state_layout`): ``torch.optim.AdamW`` / ``Adam`` keep
  ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (plus ``max_exp_avg_sq`` with
  ``amsgrad``) and a 4-byte fp32 ``step`` per tensor; ``fastrm.optim.AdamW`` keeps both in fp32
  whatever the parameter's dtype; ``torchao.optim.AdamW8bit`` keeps both
  states as uint8 codes plus one fp32 scale per ``block_size`` elements and a 256-entry fp32
  code book (a local shard under 4096 elements, or not a whole number of blocks, stays in the
  parameter's dtype); ``torch.optim.SGD`` keeps a
  momentum buffer when ``momentum > 0``. Other optimizers are measured by one step on two small
  CPU tensors of the training dtype (:func:`probe_optimizer_state`).
* **FSDP buffers** (``N > 1``): the root unit (embeddings, final norm, head) stays gathered
  from the forward to the end of the backward, a layer is gathered while the next one is
  prefetched, and one layer's full gradients exist before their reduce-scatter:
  ``root + 2 * layer + layer_trainable`` (unsharded bytes; the largest layer). With
  ``fsdp_reshard_after_forward: false`` every unit stays gathered from its forward to its
  backward: ``all parameters + layer_trainable``.
* **activations**: the bytes autograd keeps between the forward and the backward, per packed
  token (with checkpointing, plus the one layer the backward recomputes at a time:
  ``activation_recompute_bytes_per_token``), times the tokens of one micro-step on one rank
  (``packing.max_seq_len * packing.rows_per_step``), see :func:`activation_bytes_per_token`.

Activation formula (per packed token; ``s`` = bytes of the training dtype, ``D`` model dim,
``H, H_kv`` query / key-value heads of size ``d``, ``I`` MLP hidden dim, ``r`` LoRA rank, ``R``
key rows per token): fastrm's fused layers (:mod:`fastrm.models.fused`) keep, per layer that
takes part in the backward (it holds a trainable parameter, or its input carries a gradient)::

    2 (D s + 4)                  input and fp32 rstd of the two RMSNorms (their outputs are
                                 recomputed, never kept; no first rstd in a layer whose input
                                 carries no gradient and whose norm is frozen)
    + (2 H d + 2 R H_kv d) s     queries after RoPE, keys, values, attention output
    + 4 H                        fp32 log-sum-exp of the attention kernel
    + H d s                      a copy of the attention output for the output projection,
                                 only for backends that return a strided view (sdpa_segments,
                                 flex) and only when that projection trains (weight or LoRA)
    + 2 I s                      SwiGLU gate and up projections (the product is recomputed)
    + sum_LoRA r s               each LoRA module's ``lora_a`` output (``lora_dropout=0``)

plus, once per token: ``8`` (int64 token ids, when the embeddings train) + ``4 d`` (the fp32
RoPE cos/sin rows of the step, kept by each distinct rotary module) + ``D s + 4`` (input and rstd of the final
norm) + ``D s`` (the final hidden states, kept by the fused head + loss).
With activation checkpointing (``enable_activation_checkpointing``; torchtune's non-reentrant
wrapper around every layer) a layer that takes part keeps only its input, ``D s``, and the
backward recomputes one layer at a time, so the peak adds one layer's bytes above.
``R`` is 1 without prefix sharing; with it the flash / SDPA backends gather each response's
prompt keys next to its own (``T_k = T + sum`` of prompt lengths over the responses that see
them), so ``R = T_k / T``: at most 3 for pairs (``[prompt][chosen][rejected]``), which is the
default; groups of K responses can reach ``K + 1`` (pass ``--key-rows-per-token``).
Not counted (what the headroom is for): the CUDA context and NCCL buffers, allocator
fragmentation, the backward's temporary activation gradients, the head's ``[N, D]`` rows per
scored response. The formula is checked against measured runs in
``tests/training/test_memory_plan.py`` and ``benchmarks/bench_memory_plan.py``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

GIB = 1024 ** 3
#: bytes of per-row fp32 statistics (RMSNorm rstd, attention log-sum-exp)
FP32 = 4
#: backends whose output reaches the output projection as a strided view (copied there)
_COPYING_BACKENDS = ("sdpa_segments", "flex")
#: backends that gather each response's prefix keys beside its own (``R > 1``)
_GATHERING_BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments")
PAIR_KEY_ROWS = 3.0


@dataclass
class MemoryPlan:
    """Per-rank bytes of one training run (see the module docstring)."""

    gpus: int
    dtype: str
    device: str
    attention_backend: str
    activation_checkpointing: bool
    parameters: int
    trainable_parameters: int
    weights_bytes: int
    buffers_bytes: int
    gradients_bytes: int
    optimizer: str
    optimizer_bytes: int
    fsdp_buffers_bytes: int
    seq_len: int
    rows_per_step: int
    tokens_per_step: int
    key_rows_per_token: float
    activation_bytes_per_token: float
    activation_recompute_bytes_per_token: float
    activation_bytes_per_token_without_checkpointing: float
    activation_bytes_per_token_with_checkpointing: float
    activation_bytes: int
    total_bytes: int
    device_memory_bytes: int
    headroom: float

    @property
    def budget_bytes(self) -> int:
        return int(self.device_memory_bytes * (1.0 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(budget_bytes=self.budget_bytes, fits=self.fits)
        return d

    def table(self) -> str:
        """The plain-text table ``fastrm plan`` prints."""
        def gib(b: float) -> str:
            return f"{b / GIB:10.2f} GiB"

        ac = "on" if self.activation_checkpointing else "off"
        rows = [
            ("parameters", f"{self.parameters:,}"),
            ("trainable parameters", f"{self.trainable_parameters:,} "
                                     f"({100.0 * self.trainable_parameters / max(self.parameters, 1):.2f}%)"),
            ("ranks (FSDP2)", str(self.gpus)),
            ("dtype", self.dtype),
            ("attention backend", self.attention_backend),
            ("weights / rank", gib(self.weights_bytes)),
            ("buffers / rank", gib(self.buffers_bytes)),
            ("gradients / rank", gib(self.gradients_bytes)),
            (f"optimizer / rank ({self.optimizer})", gib(self.optimizer_bytes)),
            ("FSDP gathered buffers / rank", gib(self.fsdp_buffers_bytes)),
            ("activations / token, no checkpointing",
             f"{self.activation_bytes_per_token_without_checkpointing / 1024:10.1f} KiB"),
            ("activations / token, checkpointing (peak)",
             f"{self.activation_bytes_per_token_with_checkpointing / 1024:10.1f} KiB"),
            (f"tokens / step / rank ({self.rows_per_step} x {self.seq_len})",
             f"{self.tokens_per_step:,}"),
            (f"activations / rank (checkpointing {ac})", gib(self.activation_bytes)),
            ("total / rank", gib(self.total_bytes)),
            (f"device memory (budget at {self.headroom:.0%} headroom)",
             f"{gib(self.device_memory_bytes)} ({self.budget_bytes / GIB:.2f} GiB)"),
            ("fits", "yes" if self.fits else
             f"NO: over budget by {(self.total_bytes - self.budget_bytes) / GIB:.2f} GiB"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------ model
def planned_dtype(cfg: DictConfig) -> torch.dtype:
    """The training dtype the run will use. ``auto`` on CUDA is bf16 (the plan targets a
    bf16-capable GPU, sm80+, e.g. H100, whatever this machine has); elsewhere the recipe's rule
    (:func:`fastrm.training.dtype.resolve_dtype`)."""
    from fastrm.training.dtype import resolve_dtype

    name = str(cfg.get("dtype", "fp32"))
    device = torch.device(str(cfg.get("device", "cpu")))
    if name == "auto" and device.type == "cuda":
        return torch.bfloat16
    if device.type == "cuda":  # resolve without asking this machine's (absent) GPU
        from fastrm.training.dtype import DTYPES

        if name not in DTYPES:
            raise ValueError(f"dtype={name!r} is not known; choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    return resolve_dtype(name, device)


def build_meta_model(cfg: DictConfig, dtype: torch.dtype) -> nn.Module:
    """``cfg.model`` built on the meta device in ``dtype`` with ``cfg.trainable`` applied and
    activation checkpointing as configured (no weights are read, nothing is allocated)."""
    from torchtune import config, training

    from fastrm.training.model_setup import apply_trainable_policy

    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg.model)
    if not hasattr(model, "head") or not hasattr(model, "decoder"):
        raise ValueError("model._component_ must build a fastrm.models.RewardModel "
                         "(e.g. fastrm.models.reward_model)")
    apply_trainable_policy(model, cfg.get("trainable"))
    return model


def sharded_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements one rank allocates for a parameter of ``shape`` under FSDP2 over
    ``world_size`` ranks (dim 0 split into chunks of ``ceil(d0 / N)`` rows)."""
    if world_size <= 1 or len(shape) == 0:
        return math.prod(shape)
    return -(-shape[0] // world_size) * math.prod(shape[1:])


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


def _bytes(params, world_size: int, trainable_only: bool = False) -> int:
    return sum(sharded_numel(p.shape, world_size) * p.element_size() for p in params
               if p.requires_grad or not trainable_only)


def buffer_bytes(model: nn.Module) -> int:
    """Buffers (replicated on every rank), with the RoPE cache of each rotary module that the
    meta build left unbuilt counted as the recipe builds it (fp32 ``[max_seq_len, d / 2, 2]``)."""
    total, seen = 0, set()
    for _, b in model.named_buffers():
        if id(b) not in seen:
            seen.add(id(b))
            total += b.numel() * b.element_size()
    from fastrm.models.fused import FusedRotaryEmbedding

    ropes = {id(m.rope): m.rope for m in model.modules() if isinstance(m, FusedRotaryEmbedding)}
    for rope in ropes.values():
        if getattr(rope, "cache", None) is None:
            total += int(rope.max_seq_len) * int(rope.dim) * FP32
    return total


# -------------------------------------------------------------------------- optimizer
def optimizer_state_layout(optimizer_cfg: DictConfig, dtype: torch.dtype,
                           numel: int = 1 << 20) -> tuple[float, int]:
    """``(bytes per trainable element, bytes per trainable tensor)`` of the optimizer state for
    a parameter of ``numel`` elements in ``dtype`` (see the module docstring for the rules);
    an optimizer without a rule here is measured by :func:`probe_optimizer_state`."""
    path = str(optimizer_cfg["_component_"])
    name = path.rsplit(".", 1)[-1]
    s = torch.empty((), dtype=dtype).element_size()
    if path in ("torch.optim.AdamW", "torch.optim.Adam"):
        states = 3 if optimizer_cfg.get("amsgrad", False) else 2
        return float(states * s), FP32  # exp_avg(, max_exp_avg_sq), exp_avg_sq; fp32 step
    if path == "fastrm.optim.AdamW":  # exp_avg, exp_avg_sq in fp32 (or wider); fp32 step
        wide = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
        return float(2 * wide), FP32
    if path == "torch.optim.SGD":
        return (float(s) if float(optimizer_cfg.get("momentum", 0) or 0) > 0 else 0.0), 0
    if (path.startswith("torchao.optim.") and name in ("AdamW8bit", "Adam8bit")
            and not optimizer_cfg.get("amsgrad", False)):  # amsgrad: measured (probe)
        states = 2
        block = int(optimizer_cfg.get("block_size", 256))
        # torchao quantizes a state only when the (local) tensor has >= 4096 elements and a
        # whole number of blocks; it keeps the others in the parameter's dtype
        if numel < 4096 or numel % block:
            return float(states * s), FP32
        # uint8 codes + one fp32 scale per block, and a 256-entry fp32 code book per state
        return states * (1.0 + FP32 / block), FP32 + states * 256 * FP32
    return probe_optimizer_state(optimizer_cfg, dtype)


def probe_optimizer_state(optimizer_cfg: DictConfig, dtype: torch.dtype,
                          shape: Sequence[int] = (64, 64)) -> tuple[float, int]:
    """Measures ``(bytes per element, bytes per tensor)`` of the optimizer state: one step of
    the configured optimizer on a CPU parameter of ``shape`` in ``dtype`` and one on a
    parameter twice that size, and the line ``bytes = per_element * numel + per_tensor``
    through the two. A fit rather than a split by tensor size, because a quantized state is
    one tensor subclass whose inner tensors mix both kinds (torchao's ``AdamW8bit``: codes and
    block scales grow with the parameter, its 256-entry code book does not). Tensor
    subclasses count their inner tensors."""
    shape = tuple(int(d) for d in shape)
    n1, b1 = math.prod(shape), _state_bytes_after_one_step(optimizer_cfg, dtype, shape)
    big = (2 * shape[0],) + shape[1:]
    n2, b2 = math.prod(big), _state_bytes_after_one_step(optimizer_cfg, dtype, big)
    per_element = (b2 - b1) / (n2 - n1)
    return per_element, int(round(b1 - per_element * n1))


def _state_bytes_after_one_step(optimizer_cfg: DictConfig, dtype: torch.dtype,
                                shape: tuple[int, ...]) -> int:
    from torchtune import config

    p = nn.Parameter(torch.zeros(*shape, dtype=dtype))
    p.grad = torch.full_like(p, 1e-3)
    cfg = OmegaConf.to_container(optimizer_cfg, resolve=True)
    try:
        opt = config.instantiate(OmegaConf.create(cfg), [p])
    except (RuntimeError, ValueError, TypeError):  # e.g. fused=True for a device it lacks
        cfg.pop("fused", None)
        opt = config.instantiate(OmegaConf.create(cfg), [p])
    opt.step()
    return sum(_tensor_bytes(v) for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def optimizer_bytes(optimizer_cfg: DictConfig, params, world_size: int,
                    dtype: torch.dtype) -> int:
    """Per-rank optimizer-state bytes over the trainable ``params``."""
    total = 0.0
    for p in params:
        if not p.requires_grad:
            continue
        n = sharded_numel(p.shape, world_size)
        per_element, per_tensor = optimizer_state_layout(optimizer_cfg, p.dtype, n)
        total += per_element * n + per_tensor
    return int(math.ceil(total))


# ------------------------------------------------------------------------ activations
def planned_backend(cfg: DictConfig, model: nn.Module, dtype: torch.dtype) -> str:
    """The packed-attention backend the run would pick (``attention_backend`` of the config or
    the model, else the automatic rule of :func:`fastrm.attention.select_backend` for the
    config's device and dtype; on CUDA ``flash_attn`` and ``torch_varlen`` keep the same
    tensors, reported as ``flash_attn``)."""
    from fastrm.attention import check_backend
    from fastrm.attention.varlen import cpu_flash_unavailable_reason

    name = check_backend(cfg.get("attention_backend")) or check_backend(
        getattr(model, "attention_backend", None))
    if name == "reference":
        raise ValueError("attention_backend=reference is the O(T^2) test backend; the plan "
                         "models the training backends (flash_attn, torch_varlen, cpu_flash, "
                         "sdpa_segments, flex)")
    if name is not None:
        return name
    device = torch.device(str(cfg.get("device", "cpu")))
    if device.type == "cuda":
        return "flash_attn" if dtype in (torch.bfloat16, torch.float16) else "sdpa_segments"
    attn = model.decoder.layers[0].attn
    q = torch.empty(1, attn.num_heads, attn.head_dim, dtype=dtype)
    if dtype == torch.bfloat16 and not cpu_flash_unavailable_reason(q):
        return "cpu_flash"
    return "sdpa_segments"


def _lora_bytes(linear: nn.Module, s: int) -> float:
    from torchtune.modules.peft import LoRALinear

    if not isinstance(linear, LoRALinear):
        return 0.0
    if getattr(linear, "use_dora", False):
        raise NotImplementedError("the memory plan does not model DoRA (use_dora=True)")
    if isinstance(linear.dropout, nn.Dropout) and linear.dropout.p > 0:
        # what dropout keeps (mask dtype, a copy of the input) depends on the device's kernel
        raise NotImplementedError("the memory plan models lora_dropout=0 (the shipped "
                                  "configs); set lora_dropout=0.0 to plan")
    return float(linear.rank * s)


def _saves_input(linear: nn.Module) -> bool:
    from torchtune.modules.peft import LoRALinear

    return isinstance(linear, LoRALinear) or linear.weight.requires_grad


def layer_activation_bytes(layer: nn.Module, s: int, backend: str, key_rows: float,
                           grad_in: bool = True) -> float:
    """Per-token bytes one decoder layer keeps for its backward (the layer term of the module
    docstring's formula). ``grad_in``: the layer's input carries a gradient (else its first
    norm keeps no rstd unless its own scale trains).

    Raises:
        NotImplementedError: a layer the formula does not model (torchtune's own RMSNorm /
            FeedForward modules, q/k norms, RoPE other than fastrm's fused one).
    """
    from fastrm.models.fused import FusedRMSNorm, FusedRotaryEmbedding, FusedSwiGLU

    attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
    what = None
    if attn is None or mlp is None or not hasattr(attn, "q_proj"):
        what = f"{type(layer).__name__} (not a torchtune self-attention layer)"
    elif not (isinstance(layer.sa_norm, FusedRMSNorm) and isinstance(layer.mlp_norm, FusedRMSNorm)):
        what = f"norms of type {type(layer.sa_norm).__name__} (build with fused_ops=True)"
    elif not isinstance(mlp, FusedSwiGLU):
        what = (f"MLP {type(mlp).__name__} (fastrm fuses plain SwiGLU MLPs; LoRA on the MLP, "
                "apply_lora_to_mlp, keeps torchtune's)")
    elif getattr(attn, "q_norm", None) is not None:
        what = "attention with q/k norms"
    elif attn.pos_embeddings is not None and not isinstance(attn.pos_embeddings, FusedRotaryEmbedding):
        what = f"RoPE {type(attn.pos_embeddings).__name__}"
    if what is not None:
        raise NotImplementedError(f"the memory plan models fastrm's fused Llama-style layers; "
                                  f"this model has {what}")
    d, h, hk = attn.head_dim, attn.num_heads, attn.num_kv_heads
    dim = layer.sa_norm.normalized_shape[0]
    inter = mlp.w1.weight.shape[0]
    b = 2.0 * (dim * s + FP32)
    if not grad_in and not layer.sa_norm.scale.requires_grad:
        b -= FP32
    b += (2 * h * d + 2 * key_rows * hk * d) * s + FP32 * h
    if backend in _COPYING_BACKENDS and _saves_input(attn.output_proj):
        b += h * d * s
    b += 2 * inter * s
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj):
        b += _lora_bytes(lin, s)
    return b


def activation_bytes_per_token(model: nn.Module, dtype: torch.dtype, backend: str,
                               checkpointing: bool, key_rows: float = 1.0) -> tuple[float, float]:
    """``(kept, peak)`` bytes per packed token: what autograd keeps from the forward to the
    backward (plus the RoPE rows the rotary module holds), and the peak during the backward
    (with checkpointing: ``kept`` plus one recomputed layer). See the module docstring."""
    s = torch.empty((), dtype=dtype).element_size()
    dec = model.decoder
    dim = int(dec.tok_embeddings.embedding_dim)
    grad_in = any(p.requires_grad for p in dec.tok_embeddings.parameters())
    kept = 8.0 if grad_in else 0.0  # token ids, for the embedding gradient
    kept += rope_bytes_per_token(model, dtype)
    largest = 0.0
    for layer in dec.layers:
        active = grad_in or any(p.requires_grad for p in layer.parameters())
        per_layer = layer_activation_bytes(layer, s, backend, key_rows, grad_in)
        if checkpointing:
            if active:  # the layer's input, for the recompute
                kept += dim * s
                largest = max(largest, per_layer)
        elif active:
            kept += per_layer
        grad_in = grad_in or active
    if grad_in or any(p.requires_grad for p in dec.norm.parameters()):
        kept += dim * s + FP32
    kept += dim * s  # final hidden states, kept by the fused head + loss
    return kept, kept + largest


def rope_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> float:
    """The RoPE cos/sin rows of a step, ``d`` values in fp32 (fp64 for fp64) per token, held by
    each distinct rotary module (torchtune's Llama 3.1 builders share one across layers, some
    component builders make one per layer)."""
    from fastrm.models.fused import FusedRotaryEmbedding

    ropes = {id(m): m for layer in model.decoder.layers for m in layer.modules()
             if isinstance(m, FusedRotaryEmbedding)}
    acc = 8 if dtype == torch.float64 else FP32
    return float(sum(int(m.rope.dim) * acc for m in ropes.values()))


# ------------------------------------------------------------------------------ plan
def plan_memory(cfg: DictConfig, gpus: int, device_memory_gib: float = 80.0,
                key_rows_per_token: Optional[float] = None, headroom: float = 0.15) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` on ``gpus`` ranks of ``device_memory_gib`` each.

    Args:
        cfg: a reward-model recipe config (validated here; the checkpointer is not built).
        gpus: ranks the model is sharded over (FSDP2 for ``gpus > 1``).
        device_memory_gib: memory of one device.
        key_rows_per_token: ``R`` of the activation formula; default 1 without prefix sharing,
            3 (the bound for pairs) with ``packing.prefix_sharing`` on a gathering backend.
        headroom: fraction of device memory kept free for what the plan does not count.
    """
    from fastrm.training.config import validate_config

    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"--headroom must lie in [0, 1), got {headroom}")
    if device_memory_gib <= 0:
        raise ValueError(f"--device-memory-gib must be > 0, got {device_memory_gib}")
    validate_config(cfg)
    dtype = planned_dtype(cfg)
    model = build_meta_model(cfg, dtype)
    backend = planned_backend(cfg, model, dtype)
    prefix_sharing = cfg.packing.get("prefix_sharing", None) is not False
    if key_rows_per_token is None:
        key_rows_per_token = (PAIR_KEY_ROWS if prefix_sharing and backend in _GATHERING_BACKENDS
                              else 1.0)
    if key_rows_per_token < 1.0:
        raise ValueError(f"--key-rows-per-token must be >= 1 (keys per query token), got "
                         f"{key_rows_per_token}")
    params = _unique_params(model)
    checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
    no_ac, _ = activation_bytes_per_token(model, dtype, backend, False, key_rows_per_token)
    ac_kept, with_ac = activation_bytes_per_token(model, dtype, backend, True, key_rows_per_token)
    per_token = with_ac if checkpointing else no_ac
    recompute = with_ac - ac_kept if checkpointing else 0.0
    seq_len = int(cfg.packing.max_seq_len)
    rows = int(cfg.packing.get("rows_per_step", 1))
    tokens = seq_len * rows
    weights = _bytes(params, gpus)
    grads = _bytes(params, gpus, trainable_only=True)
    opt = optimizer_bytes(cfg.optimizer, params, gpus, dtype)
    fsdp = 0
    if gpus > 1:
        layers = list(model.decoder.layers)
        layer_ids = {id(p) for layer in layers for p in layer.parameters()}
        root = sum(p.numel() * p.element_size() for p in params if id(p) not in layer_ids)
        full = max(_bytes(_unique_params(layer), 1) for layer in layers)
        full_grads = max(_bytes(_unique_params(layer), 1, trainable_only=True) for layer in layers)
        if cfg.get("fsdp_reshard_after_forward", True):
            fsdp = root + 2 * full + full_grads
        else:  # every unit stays gathered from its forward to its backward
            fsdp = _bytes(params, 1) + full_grads
    activations = int(math.ceil(per_token * tokens))
    buffers = buffer_bytes(model)
    return MemoryPlan(
        gpus=gpus, dtype=str(dtype).replace("torch.", ""), device=str(cfg.get("device", "cpu")),
        attention_backend=backend, activation_checkpointing=checkpointing,
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        weights_bytes=weights, buffers_bytes=buffers, gradients_bytes=grads,
        optimizer=str(cfg.optimizer["_component_"]), optimizer_bytes=opt,
        fsdp_buffers_bytes=fsdp, seq_len=seq_len, rows_per_step=rows, tokens_per_step=tokens,
        key_rows_per_token=float(key_rows_per_token), activation_bytes_per_token=per_token,
        activation_recompute_bytes_per_token=recompute,
        activation_bytes_per_token_without_checkpointing=no_ac,
        activation_bytes_per_token_with_checkpointing=with_ac, activation_bytes=activations,
        total_bytes=weights + buffers + grads + opt + fsdp + activations,
        device_memory_bytes=int(device_memory_gib * GIB), headroom=float(headroom),
    )


# --------------------------------------------------------------------------- measure
def measure_activation_bytes(run, model: nn.Module) -> int:
    """Measured counterpart of the formula: bytes of the tensors autograd keeps while ``run()``
    executes (each storage once, the parameters excluded; :func:`fastrm.models.fused.
    saved_activation_bytes`) plus the RoPE rows the rotary modules hold after it."""
    from fastrm.models.fused import FusedRotaryEmbedding, saved_activation_bytes

    def held():
        for m in model.modules():
            if isinstance(m, FusedRotaryEmbedding) and m._memo is not None:
                yield m._memo[2]

    return saved_activation_bytes(run, exclude=model.parameters(), also=held)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_training_memory(cfg: DictConfig, tokenizer, steps: int = 3,
                            dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Measured counterpart of :func:`plan_memory` for ``gpus=1``: builds the model of ``cfg``
    as the recipe does (:func:`fastrm.training.model_setup.build_model`: checkpoint,
    trainable policy, activation checkpointing), runs ``steps`` real optimizer steps on CPU
    over the packed training data, and returns the actual storage bytes of the parameters,
    buffers, gradients (after the last backward) and optimizer state, and for each step the
    bytes autograd kept per packed token (:func:`measure_activation_bytes`)."""
    from torchtune import config

    from fastrm.training.model_setup import RewardModelStep, build_model
    from fastrm.training.step_data import build_step_data

    torch.manual_seed(int(cfg.get("seed", 0)))
    model, _ = build_model(cfg, torch.device("cpu"), dtype)
    step = RewardModelStep(model, config.instantiate(cfg.loss))
    data = build_step_data(cfg, "dataset", tokenizer, 1, 0, seed=0, train=True)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = config.instantiate(cfg.optimizer, params)
    per_token, tokens, grads = [], [], 0
    for i, batch in enumerate(data.epoch_steps(0)):
        if i == steps:
            break
        out: list = []
        kept = measure_activation_bytes(lambda: out.append(step(batch)), model)
        tokens.append(int(batch.tokens.shape[1]))
        per_token.append(kept / tokens[-1])
        out[0][0].backward()
        opt.step()
        grads = _storage_bytes(p.grad for p in params)
        opt.zero_grad(set_to_none=True)
        del out
    if len(per_token) < steps:
        raise ValueError(f"the training data gave {len(per_token)} steps, fewer than {steps}")
    return dict(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in params),
        weights_bytes=_storage_bytes(model.parameters()),
        buffers_bytes=_storage_bytes(b for _, b in model.named_buffers()),
        gradients_bytes=grads,
        optimizer_bytes=sum(v.untyped_storage().nbytes() for st in opt.state.values()
                            for v in st.values() if isinstance(v, torch.Tensor)),
        activation_bytes_per_token=per_token, tokens=tokens)


# ------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrm plan --config NAME_OR_PATH --gpus N [--json] [key=value ...]``."""
    from fastrm.config import parse_config_args

    parser = argparse.ArgumentParser(
        prog="fastrm plan",
        description="Per-rank memory of a reward-model config (model built on the meta device: "
                    "no weights are read, nothing is allocated).")
    parser.add_argument("--gpus", type=int, required=True, help="ranks (FSDP2 shards over them)")
    parser.add_argument("--device-memory-gib", type=float, default=80.0,
                        help="memory of one device in GiB (default 80: H100 80GB)")
    parser.add_argument("--key-rows-per-token", type=float, default=None,
                        help="attention key rows per token (prefix sharing; default 1, or 3 "
                             "with prefix sharing on a gathering backend)")
    parser.add_argument("--headroom", type=float, default=0.15,
                        help="fraction of device memory kept free (default 0.15)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, cfg = parse_config_args(parser, argv)
    try:
        plan = plan_memory(cfg, args.gpus, args.device_memory_gib, args.key_rows_per_token,
                           args.headroom)
    except (ValueError, NotImplementedError) as err:
        parser.error(str(err))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0
