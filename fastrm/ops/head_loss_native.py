"""Native C++ (CPU) backend of the fused reward head + loss: ``kernels/fused_reward_head.cpp``.

``torch.ops.fastrm.fused_reward_head_forward`` returns ``(rewards [N], loss [], dL/dr [N])``
(fp32, loss and ``dL/dr`` in closed form); ``torch.ops.fastrm.fused_reward_head_backward``
scales ``dL/dr`` by ``grad_output`` and writes the gathered rows of ``grad_hidden`` plus
``grad_weight [D]`` and ``grad_bias []`` (OpenMP-parallel over rows and over ``D``).
"""

from __future__ import annotations

import torch

from fastrm import _native
from fastrm.ops._common import HeadLossInputs

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


class NativeFusedRewardHeadLossFunction(torch.autograd.Function):
    """``(loss, rewards) = f(hidden [T, D], weight [D], bias [] | None, ...)`` via the C++ ops."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, chosen, rejected, margin, cweight,
                contrast_w, objective, label_smoothing, hinge_margin, centering):
        rewards, loss, dldr = torch.ops.fastrm.fused_reward_head_forward(
            hidden, weight, bias, positions, chosen, rejected, margin, cweight, contrast_w,
            objective, label_smoothing, hinge_margin, centering)
        ctx.save_for_backward(hidden, weight, positions, dldr)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(rewards)
        return loss, rewards

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_rewards):
        hidden, weight, positions, dldr = ctx.saved_tensors
        need_hidden = ctx.needs_input_grad[0]
        grad_hidden, grad_weight, grad_bias = torch.ops.fastrm.fused_reward_head_backward(
            hidden, weight, positions, dldr, grad_loss.detach(), need_hidden)
        return (
            grad_hidden if need_hidden else None,
            grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None,
            grad_bias.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None,
        ) + (None,) * 10


def native_head_loss(inp: HeadLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs :class:`NativeFusedRewardHeadLossFunction` on checked CPU inputs."""
    return NativeFusedRewardHeadLossFunction.apply(
        inp.hidden, inp.weight, inp.bias, inp.reward_positions, inp.chosen_index,
        inp.rejected_index, inp.margin, inp.comparison_weight, inp.contrast_weights, *inp.options())
