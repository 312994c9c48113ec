"""Lean drop-in replacements for torchtune's per-layer modules (RMSNorm, SwiGLU MLP, RoPE).

:func:`fuse_layers` swaps, inside a torchtune decoder,

* :class:`torchtune.modules.RMSNorm` -> :class:`FusedRMSNorm` (:func:`fastrm.ops.rms_norm`),
* :class:`torchtune.modules.FeedForward` with plain bias-free ``nn.Linear`` projections and SiLU
  -> :class:`FusedSwiGLU` (:func:`fastrm.ops.swiglu_mlp`),
* interleaved RoPE (:class:`~torchtune.modules.RotaryPositionalEmbeddings`,
  :class:`~torchtune.models.llama3_1.Llama3ScaledRoPE`) -> :class:`FusedRotaryEmbedding`
  (:func:`fastrm.ops.apply_rope`),

the same math with the saved activations cut to what each backward needs (about half of a
layer's activation memory) and one pass per op (C++ kernels on CPU, Triton kernels on CUDA). Within
:func:`recompute_norm_outputs` (the reward model's packed forward uses it), a norm's output is
not kept for the projections that read it either: their backward recomputes it from the norm's
input, which the norm keeps anyway (one elementwise pass, two ``[T, D]`` tensors less per
layer). Parameter names and the state dict do not change (``sa_norm.scale``,
``mlp.w1.weight``, ...), so torchtune checkpoints,
FSDP2 ``fully_shard``, activation checkpointing, LoRA (adapted modules are left alone) and
``torch.compile`` (inductor gets the plain torch formulas) keep working. Anything else (other
norms, activations, Qwen2's half-split RoPE, LoRA MLPs) stays as it is.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from fastrm.ops.rms_norm import rms_norm, rms_norm_forward
from fastrm.ops.rope import apply_rope, rope_cos_sin
from fastrm.ops.swiglu import swiglu_mlp


def _torchtune_types():
    from torchtune.modules import FeedForward, MultiHeadAttention, RMSNorm, RotaryPositionalEmbeddings

    ropes: tuple = (RotaryPositionalEmbeddings,)
    try:
        from torchtune.models.llama3_1 import Llama3ScaledRoPE

        ropes += (Llama3ScaledRoPE,)
    except ImportError:  # pragma: no cover - other torchtune versions
        pass
    return RMSNorm, FeedForward, MultiHeadAttention, ropes


def _rms_norm_base():
    from torchtune.modules import RMSNorm

    return RMSNorm


class _NormRecipe:
    """A norm output's inputs; the output is rebuilt once and shared by every saved view."""

    __slots__ = ("x", "weight", "eps", "rebuilt")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self.x, self.weight, self.eps, self.rebuilt = x, weight, eps, None

    def output(self) -> torch.Tensor:
        if self.rebuilt is None:
            with torch.no_grad():
                y = rms_norm_forward(self.x.reshape(-1, self.x.shape[-1]), self.weight, self.eps)[0]
            # kept until the last backward node that saved a view of it is freed
            self.rebuilt = y
        return self.rebuilt


class _SavedView:
    """A saved view of a norm output: its recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _NormRecipe, view: torch.Tensor) -> None:
        self.recipe = recipe
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def rebuild(self) -> torch.Tensor:
        return self.recipe.output().as_strided(self.size, self.stride, self.offset)


class NormOutputRecompute:
    """Saved-tensor hooks that drop :class:`FusedRMSNorm` outputs from what autograd keeps.

    The projections after a norm (q / k / v, the MLP's w1 / w3, the reward head) save the
    norm's output for their weight gradients; the norm itself keeps its input. Inside this
    context a saved norm output (or a view of it) is replaced by a recipe and recomputed from
    that input when the backward needs it: bit-identical values (same kernel, same input),
    ``2 x [T, D]`` fewer saved tensors per layer, one elementwise pass per norm in the backward.
    Outputs are recognised by storage and checked against a weak reference, so a reused
    address is never mistaken for a norm output.
    """

    def __init__(self) -> None:
        self._outputs: dict[int, tuple] = {}

    def register(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self._outputs[y.untyped_storage().data_ptr()] = (weakref.ref(y), _NormRecipe(x, weight, eps))

    def pack(self, t: torch.Tensor):
        entry = self._outputs.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        observer = getattr(_active, "observer", None)
        if entry is not None:
            y = entry[0]()
            if (y is not None and y.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                    and y.dtype == t.dtype and y.is_contiguous()):
                if observer is not None:  # the recipe keeps the norm's input alive
                    observer(entry[1].x)
                return _SavedView(entry[1], t)
        if observer is not None:
            observer(t)
        return t

    @staticmethod
    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _SavedView) else packed


_active = threading.local()


@contextlib.contextmanager
def recompute_norm_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this context, fused-norm outputs saved for the backward are recomputed instead
    of kept (see :class:`NormOutputRecompute`). A no-op under ``torch.compile`` tracing."""
    if not enabled or torch.compiler.is_compiling():
        yield
        return
    hooks = NormOutputRecompute()
    prev = getattr(_active, "hooks", None)
    _active.hooks = hooks
    try:
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            yield
    finally:
        _active.hooks = prev


def saved_activation_bytes(run, exclude=(), also=None) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``run()`` executes (each
    storage counted once; tensors sharing storage with ``exclude``, e.g. the parameters, are
    not counted). Counts what is kept after :func:`recompute_norm_outputs` has dropped norm
    outputs (and the norm inputs its recipes hold), so it measures the activation memory a
    backward will need. ``also()``: tensors held outside autograd after ``run()`` (caches)
    to count as well."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    # storage address -> (bytes, weak references to the tensors saved there): a tensor packed
    # by a graph node that is freed during the forward (nothing needed its gradient) is not
    # kept, and its address may be reused; only storages still referenced at the end count
    storages: dict[int, tuple[int, list]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            entry = storages.get(ptr)
            if entry is None or not any(r() is not None for r in entry[1]):
                entry = storages[ptr] = (t.untyped_storage().nbytes(), [])
            entry[1].append(weakref.ref(t))
        return t

    prev = getattr(_active, "observer", None)
    _active.observer = keep
    try:
        # outer hooks see what is saved outside fastrm's own (inner) hooks
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            result = run()  # held until counted: it keeps the graph alive
    finally:
        _active.observer = prev
    for t in (also() if also is not None else ()):
        keep(t)
    gc.collect()  # a freed node caught in a reference cycle would otherwise look kept
    total = sum(n for n, refs in storages.values() if any(r() is not None for r in refs))
    del result
    return total


class FusedRMSNorm(_rms_norm_base()):
    """torchtune's RMSNorm (same ``scale`` parameter and ``eps``) with the lean backward of
    :func:`fastrm.ops.rms_norm`. Input ``[..., D]``, output the same shape and dtype; inside
    :func:`recompute_norm_outputs` the output is not kept for later ops' backward."""

    @classmethod
    def from_module(cls, norm: nn.Module) -> "FusedRMSNorm":
        """A FusedRMSNorm sharing ``norm``'s ``scale`` parameter (meta tensors included)."""
        new = cls(norm.normalized_shape[0], eps=norm.eps)
        new.scale = norm.scale
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, self.scale, self.eps)
        hooks = getattr(_active, "hooks", None)
        if hooks is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            hooks.register(y, x, self.scale, self.eps)
        return y


def _feed_forward_base():
    from torchtune.modules import FeedForward

    return FeedForward


class FusedSwiGLU(_feed_forward_base()):
    """torchtune's SwiGLU FeedForward (the same ``w1``, ``w2``, ``w3`` modules) computed by
    :func:`fastrm.ops.swiglu_mlp`, which saves ``x``, ``w1(x)`` and ``w3(x)`` only.
    Input ``[..., D]`` -> ``[..., D]``."""

    @staticmethod
    def supports(mlp: nn.Module) -> bool:
        """True for a FeedForward whose three projections are bias-free ``nn.Linear`` and
        whose activation is SiLU (LoRA / quantized projections are not)."""
        lins = (getattr(mlp, "w1", None), getattr(mlp, "w2", None), getattr(mlp, "w3", None))
        return (all(type(m) is nn.Linear and m.bias is None for m in lins)
                and isinstance(getattr(mlp, "activation", None), nn.SiLU))

    @classmethod
    def from_module(cls, mlp: nn.Module) -> "FusedSwiGLU":
        return cls(gate_proj=mlp.w1, down_proj=mlp.w2, up_proj=mlp.w3, activation=mlp.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)


class FusedRotaryEmbedding(nn.Module):
    """Wraps a torchtune interleaved RoPE module (kept as ``self.rope``: its ``cache`` buffer
    and ``rope_init`` stay where torchtune's recipes look for them) and rotates with
    :func:`fastrm.ops.apply_rope`.

    ``forward(x [b, s, n_h, h_d], *, input_pos [b, s] | None)`` -> same shape and dtype, like
    torchtune's. The gathered ``cos_sin`` is reused while the same ``input_pos`` tensor comes
    back (q and k of every layer of a step share one).
    """

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope
        self._memo: Optional[tuple] = None

    def _cos_sin(self, input_pos: Optional[torch.Tensor], b: int, s: int,
                 dtype: torch.dtype) -> torch.Tensor:
        cache = self.rope.cache
        compiling = torch.compiler.is_compiling()
        # inference tensors (torch.inference_mode: scoring) have no version counter; the memo
        # is still keyed on the tensor's identity
        key = (cache.data_ptr(), cache.dtype, dtype, b, s,
               None if input_pos is None else
               (-1 if input_pos.is_inference() else input_pos._version))
        if not compiling and self._memo is not None:
            ref, memo_key, cs = self._memo
            if memo_key == key and (input_pos is None or ref() is input_pos):
                return cs
        cs = rope_cos_sin(cache, input_pos, s, dtype)
        if input_pos is None and b > 1:
            cs = cs.repeat(b, 1, 1)
        if not compiling:
            self._memo = (None if input_pos is None else weakref.ref(input_pos), key, cs)
        return cs

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not getattr(self.rope, "is_cache_built", True):
            raise RuntimeError("RoPE cache is not built. Please call rope_init() first.")
        b, s = x.shape[0], x.shape[1]
        return apply_rope(x, self._cos_sin(input_pos, b, s, x.dtype))


@dataclass
class FuseReport:
    """What :func:`fuse_layers` replaced (module names) and what it left and why."""

    rms_norm: list[str] = field(default_factory=list)
    swiglu: list[str] = field(default_factory=list)
    rope: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def fuse_layers(decoder: nn.Module) -> FuseReport:
    """Replaces torchtune's RMSNorm, SwiGLU FeedForward and interleaved RoPE modules under
    ``decoder`` with the fused ones above (idempotent; shared modules stay shared).

    Returns a :class:`FuseReport`; modules of those kinds that could not be replaced (a LoRA
    MLP, another activation) are listed in ``kept`` with the reason.
    """
    RMSNorm, FeedForward, MultiHeadAttention, ropes = _torchtune_types()
    report = FuseReport()
    shared_rope: dict[int, FusedRotaryEmbedding] = {}
    for parent_name, parent in list(decoder.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is RMSNorm:
                setattr(parent, child_name, FusedRMSNorm.from_module(child))
                report.rms_norm.append(name)
            elif type(child) is FeedForward:
                if FusedSwiGLU.supports(child):
                    setattr(parent, child_name, FusedSwiGLU.from_module(child))
                    report.swiglu.append(name)
                else:
                    report.kept[name] = ("FeedForward with adapted / biased projections or a "
                                         "non-SiLU activation")
            elif (isinstance(parent, MultiHeadAttention) and child_name == "pos_embeddings"
                  and type(child) in ropes):
                if id(child) not in shared_rope:
                    shared_rope[id(child)] = FusedRotaryEmbedding(child)
                    report.rope.append(name)
                setattr(parent, child_name, shared_rope[id(child)])
    return report
