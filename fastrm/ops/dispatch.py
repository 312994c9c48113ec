"""The public fused reward head + loss function and the choice of backend."""

from __future__ import annotations

import os
from typing import Optional

import torch

from fastrm.ops._common import BACKENDS, HeadLossInputs, prepare_inputs

BACKEND_ENV = "FASTRM_HEAD_BACKEND"


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
        from fastrm.ops.fused_reward_head import triton_unavailable_reason

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


def _run(backend: str, inp: HeadLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from fastrm.ops.fused_reward_head import triton_head_loss

        return triton_head_loss(inp)
    if backend == "native":
        from fastrm.ops.head_loss_native import native_head_loss

        return native_head_loss(inp)
    from fastrm.ops.head_loss_torch import torch_head_loss

    return torch_head_loss(inp)


def fused_reward_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    reward_positions: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    comparison_weight: Optional[torch.Tensor] = None,
    *,
    objective: str = "bradley_terry",
    label_smoothing: float = 0.0,
    hinge_margin: float = 1.0,
    centering_coefficient: float = 0.0,
    contrast_weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    inp = prepare_inputs(
        hidden, weight, bias, reward_positions, chosen_index, rejected_index, margin,
        comparison_weight, objective=objective, label_smoothing=label_smoothing,
        hinge_margin=hinge_margin, centering_coefficient=centering_coefficient,
        contrast_weights=contrast_weights)
    return _run(resolve_backend(backend, inp.hidden.device), inp)
