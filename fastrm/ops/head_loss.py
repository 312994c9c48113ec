"""The fused reward head + loss op: :func:`fused_reward_head_loss`, its module, the backend choice.

The backends live one per file: ``head_loss_triton.py`` (Triton kernels, CUDA or the CPU
interpreter), ``head_loss_native.py`` (the C++ op of ``kernels/fused_reward_head.cpp``, CPU) and
``head_loss_torch.py`` (plain torch); ``head_loss_contract.py`` holds what they share (input
checks, :class:`~fastrm.ops.head_loss_contract.LossOptions`, the closed form, the autograd base).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict
from typing import Optional

import torch
from torch import Tensor, nn

from fastrm.ops.head_loss_contract import HeadLossFunction, LossOptions, prepare_inputs

BACKENDS = ("triton", "native", "torch")
BACKEND_ENV = "FASTRM_HEAD_BACKEND"
#: backend -> (module, autograd Function); imported on first use (triton is not free to import)
_FUNCTIONS = {
    "triton": ("fastrm.ops.head_loss_triton", "TritonHeadLossFunction"),
    "native": ("fastrm.ops.head_loss_native", "NativeHeadLossFunction"),
    "torch": ("fastrm.ops.head_loss_torch", "TorchHeadLossFunction"),
}


def backend_unavailable_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device`` (empty string when it can)."""
    if backend == "torch":
        return ""
    if backend == "native":
        from fastrm.ops.head_loss_native import native_available, native_unavailable_reason

        if device.type != "cpu":
            return f"the native backend is CPU-only (hidden is on {device}); use 'triton' or 'torch'"
        return "" if native_available() else native_unavailable_reason()
    if backend == "triton":
        from fastrm.ops.head_loss_triton import triton_unavailable_reason

        return triton_unavailable_reason(device)
    raise ValueError(f"backend={backend!r} is not known; choose one of {', '.join(BACKENDS)} or None")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in order of preference."""
    device = torch.device(device)
    return [b for b in BACKENDS if not backend_unavailable_reason(b, device)]


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend to use: ``backend`` if given, else ``$FASTRM_HEAD_BACKEND``, else ``"triton"``
    on CUDA, ``"native"`` when the C++ op is built, ``"torch"`` otherwise. A backend that was
    asked for (argument or environment) but cannot run raises ``ValueError`` saying why."""
    source = "backend"
    if backend is None and os.environ.get(BACKEND_ENV):
        backend, source = os.environ[BACKEND_ENV].strip().lower(), f"${BACKEND_ENV}"
    if backend is None:
        if device.type == "cuda" and not backend_unavailable_reason("triton", device):
            return "triton"
        if device.type == "cpu" and not backend_unavailable_reason("native", device):
            return "native"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not known; choose one of {', '.join(BACKENDS)} "
                         f"or None (automatic)")
    reason = backend_unavailable_reason(backend, device)
    if reason:
        raise ValueError(f"{source}={backend!r} is unavailable: {reason}")
    return backend


def backend_function(backend: str) -> type[HeadLossFunction]:
    """The autograd Function of ``backend`` (one of :data:`BACKENDS`)."""
    module, name = _FUNCTIONS[backend]
    return getattr(importlib.import_module(module), name)


def fused_reward_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    reward_positions: Tensor,
    chosen_index: Tensor,
    rejected_index: Tensor,
    margin: Optional[Tensor] = None,
    comparison_weight: Optional[Tensor] = None,
    *,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
    centering_coefficient: float = 0.0,
    contrast_weights: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Reward head + pairwise loss + its gradient in one op, without the ``[T, 1]`` head output.

    ``rewards = hidden[reward_positions].float() @ weight.float() + bias`` and the loss of
    :func:`fastrm.functional.comparison_loss` over ``(chosen_index, rejected_index)`` pairs, or
    of :func:`fastrm.functional.contrast_loss` (cross-prompt RPO) when ``contrast_weights`` is
    given. The forward computes the loss and ``dL/dr`` together in closed form; the backward
    scales by ``grad_output`` and scatters into the ``N`` gathered rows of ``hidden`` (every
    other row of ``grad_hidden`` is exactly zero; a row used several times accumulates).

    Args:
        hidden: ``[T, D]`` packed hidden states, fp32, bf16 or fp16.
        weight: ``[D]`` or ``[1, D]`` reward-head weight (hidden's dtype or fp32).
        bias: ``[1]``, ``[]`` or ``None``.
        reward_positions: ``[N]`` int64 rows of ``hidden`` to score (repeats allowed).
        chosen_index, rejected_index: ``[P]`` int64 indices into the ``N`` rewards (contrast
            mode: ``[Bc]`` and ``[Br]``); a response may appear in several comparisons.
        margin: ``[P]`` finite margins subtracted from ``r_c - r_r`` (contrast mode: ``[Bc]``
            on the diagonal, needs ``Bc == Br``). Gets no gradient.
        comparison_weight: ``[P]`` non-negative weights; the loss is
            ``sum_p w_p l_p / sum_p w_p`` (pair mode only).
        objective, label_smoothing, hinge_margin, centering_coefficient: as in
            :func:`fastrm.functional.comparison_loss`.
        contrast_weights: ``[Bc, Br]`` cross-prompt weights (e.g.
            :func:`fastrm.functional.prompt_similarity_weights`); gets no gradient.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (``$FASTRM_HEAD_BACKEND``,
            else triton on CUDA, native on CPU when built, else torch).

    Returns:
        ``(loss, rewards)``: fp32 scalar loss (differentiable w.r.t. ``hidden``, ``weight``,
        ``bias``) and detached fp32 ``rewards [N]``.

    Raises:
        ValueError: on malformed input (naming the argument) or an unavailable backend.
    """
    options = LossOptions(objective, label_smoothing, hinge_margin, centering_coefficient)
    inp = prepare_inputs(hidden, weight, bias, reward_positions, chosen_index, rejected_index,
                         margin, comparison_weight, options=options,
                         contrast_weights=contrast_weights)
    return backend_function(resolve_backend(backend, inp.hidden.device)).apply_inputs(inp)


class FusedRewardHeadLoss(nn.Module):
    """Holds the loss options; ``forward`` scores ``hidden [T, D]`` at ``reward_positions [N]``
    with the head ``(weight [D], bias)`` and returns ``(loss, rewards [N])``.

    Args:
        objective: ``"bradley_terry"`` or ``"hinge"``.
        label_smoothing: Bradley-Terry label smoothing ``eps`` in ``[0, 0.5)``.
        hinge_margin: margin of the hinge objective.
        centering_coefficient: reward-centering coefficient (arXiv 2312.09244), ``>= 0``.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (automatic).

    Example (``hidden [T, D]`` from a packed forward, ``batch`` a
    :class:`fastrm.data.batch.PackedBatch`, ``head`` an ``nn.Linear(D, 1)``)::

        loss_fn = FusedRewardHeadLoss(objective="bradley_terry", centering_coefficient=0.01)
        loss, rewards = loss_fn(hidden, head.weight, head.bias, batch.reward_positions,
                                batch.chosen_index, batch.rejected_index, batch.margin)

    In a torchtune config the recipe's ``loss:`` is :class:`fastrm.RewardLoss`, which runs this
    op through ``RewardLoss.from_hidden``; choose the backend there::

        loss:
          _component_: fastrm.RewardLoss
          centering_coefficient: 0.01
          backend: triton
    """

    def __init__(
        self,
        objective: str = "bradley_terry",
        label_smoothing: float = 0.0,
        hinge_margin: float = 1.0,
        centering_coefficient: float = 0.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.options = LossOptions(objective, label_smoothing, hinge_margin, centering_coefficient)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not known; choose one of "
                             f"{', '.join(BACKENDS)} or None")
        self.backend = backend

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                reward_positions: Tensor, chosen_index: Tensor, rejected_index: Tensor,
                margin: Optional[Tensor] = None, comparison_weight: Optional[Tensor] = None,
                contrast_weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """See :func:`fused_reward_head_loss` for shapes."""
        return fused_reward_head_loss(
            hidden, weight, bias, reward_positions, chosen_index, rejected_index, margin,
            comparison_weight, contrast_weights=contrast_weights, backend=self.backend,
            **asdict(self.options))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items())
        return f"{fields}, backend={self.backend!r}"
