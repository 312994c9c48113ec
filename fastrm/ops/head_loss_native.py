"""Native C++ (CPU) backend of the fused reward head + loss: ``kernels/fused_reward_head.cpp``.

``torch.ops.fastrm.fused_reward_head_forward`` returns ``(rewards [N], loss [], dL/dr [N])``
(fp32, loss and ``dL/dr`` in closed form); ``torch.ops.fastrm.fused_reward_head_backward``
scales ``dL/dr`` by ``grad_output`` and writes the gathered rows of ``grad_hidden`` plus
``grad_weight [D]`` and ``grad_bias []`` (OpenMP-parallel over rows and over ``D``).
"""

from __future__ import annotations

import torch

from fastrm import _native
from fastrm.ops.head_loss_contract import HeadLossFunction, HeadLossInputs

FORWARD_OP = "fused_reward_head_forward"
BACKWARD_OP = "fused_reward_head_backward"


def native_available() -> bool:
    """True when the extension is built and registers both ops."""
    return _native.has_op(FORWARD_OP) and _native.has_op(BACKWARD_OP)


def native_unavailable_reason() -> str:
    """Why :func:`native_available` is ``False`` (empty when it is ``True``)."""
    if native_available():
        return ""
    reason = _native.unavailable_reason()
    if reason:
        return reason
    return (f"fastrm._C is loaded but lacks torch.ops.fastrm.{FORWARD_OP}: it was built before "
            f"kernels/fused_reward_head.cpp existed; rebuild with `python setup.py build_ext --inplace`")


class NativeHeadLossFunction(HeadLossFunction):
    """``(loss, rewards) = f(hidden [T, D], weight [D], bias [] | None)`` via the C++ ops."""

    @staticmethod
    def _forward(inp: HeadLossInputs):
        o = inp.options
        rewards, loss, dldr = torch.ops.fastrm.fused_reward_head_forward(
            inp.hidden, inp.weight, inp.bias, inp.reward_positions, inp.chosen_index,
            inp.rejected_index, inp.margin, inp.comparison_weight, inp.contrast_weights,
            o.objective, o.label_smoothing, o.hinge_margin, o.centering_coefficient)
        return loss, rewards, (inp.reward_positions, dldr)

    @staticmethod
    def _backward(hidden, weight, saved, grad_loss, needs):
        positions, dldr = saved
        return torch.ops.fastrm.fused_reward_head_backward(
            hidden, weight, positions, dldr, grad_loss.detach(), needs[0])
