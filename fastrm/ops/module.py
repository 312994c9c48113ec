"""``FusedRewardHeadLoss``: a thin ``nn.Module`` over :func:`fastrm.ops.fused_reward_head_loss`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastrm.functional import check_objective
from fastrm.ops._common import BACKENDS
from fastrm.ops.dispatch import fused_reward_head_loss


class FusedRewardHeadLoss(nn.Module):
    """Holds the loss options; ``forward`` scores ``hidden [T, D]`` at ``reward_positions [N]``
    with the head ``(weight [D], bias)`` and returns ``(loss, rewards [N])``.

    Args:
        objective: ``"bradley_terry"`` or ``"hinge"``.
        label_smoothing: Bradley-Terry label smoothing ``eps`` in ``[0, 0.5)``.
        hinge_margin: margin of the hinge objective.
        centering_coefficient: reward-centering coefficient (arXiv 2312.09244), ``>= 0``.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (automatic).

    Example (torchtune-style config)::

        loss:
          _component_: fastrm.ops.FusedRewardHeadLoss
          objective: bradley_terry
          centering_coefficient: 0.01
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
        check_objective(objective)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not known; choose one of "
                             f"{', '.join(BACKENDS)} or None")
        self.objective = objective
        self.label_smoothing = float(label_smoothing)
        self.hinge_margin = float(hinge_margin)
        self.centering_coefficient = float(centering_coefficient)
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        reward_positions: torch.Tensor,
        chosen_index: torch.Tensor,
        rejected_index: torch.Tensor,
        margin: Optional[torch.Tensor] = None,
        comparison_weight: Optional[torch.Tensor] = None,
        contrast_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`fastrm.ops.fused_reward_head_loss` for shapes."""
        return fused_reward_head_loss(
            hidden, weight, bias, reward_positions, chosen_index, rejected_index, margin,
            comparison_weight, objective=self.objective, label_smoothing=self.label_smoothing,
            hinge_margin=self.hinge_margin, centering_coefficient=self.centering_coefficient,
            contrast_weights=contrast_weights, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, label_smoothing={self.label_smoothing}, "
                f"hinge_margin={self.hinge_margin}, "
                f"centering_coefficient={self.centering_coefficient}, backend={self.backend!r}")
