"""Plain-torch backend of the fused reward head + loss (any device, no compiled code).

Same contract as the Triton and native backends (see :mod:`fastrm.ops.head_loss_contract`): the
forward gathers only the ``N`` scored rows of ``hidden`` (never the ``[T, 1]`` head output over
all tokens), computes the loss and ``dL/dr`` in closed form in fp32, and the backward only
scales by ``grad_output`` and scatters into the gathered rows.
"""

from __future__ import annotations

import torch

from fastrm.ops.head_loss_contract import HeadLossFunction, HeadLossInputs, loss_and_reward_grad


def unique_position_coefficients(
    positions: torch.Tensor, dldr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique_positions [U], coef [U])`` with ``coef_u = sum_{n: pos_n = u} dL/dr_n``.

    A row listed twice in ``reward_positions`` gets one gradient row equal to the sum of both
    contributions, accumulated in fp32 before the cast to ``hidden``'s dtype.
    """
    upos, inverse = torch.unique(positions, return_inverse=True)
    coef = torch.zeros(upos.shape[0], dtype=dldr.dtype, device=dldr.device)
    coef.index_add_(0, inverse, dldr)
    return upos, coef


class TorchHeadLossFunction(HeadLossFunction):
    """``(loss, rewards) = f(hidden [T, D], weight [D], bias [] | None)`` in plain torch."""

    @staticmethod
    def _forward(inp: HeadLossInputs):
        hidden, weight, bias = inp.hidden, inp.weight, inp.bias
        # autocast off: the reward dot products must accumulate in fp32 even under bf16 autocast
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            rows = hidden.index_select(0, inp.reward_positions).float()  # [N, D]: only the scored rows
            rewards = rows @ weight.float()
            if bias is not None:
                rewards = rewards + bias.float()
            loss, dldr = loss_and_reward_grad(rewards, inp)
        return loss, rewards, (inp.reward_positions, dldr)

    @staticmethod
    def _backward(hidden, weight, saved, grad_loss, needs):
        positions, dldr = saved
        upos, coef = unique_position_coefficients(positions, dldr)
        coef = coef * grad_loss.float()
        grad_hidden = grad_weight = grad_bias = None
        with torch.autocast(hidden.device.type, enabled=False):
            if needs[0]:
                # zeros, not empty: every row outside reward_positions must be exactly 0
                grad_hidden = torch.zeros_like(hidden)
                grad_hidden[upos] = (coef[:, None] * weight.float()[None, :]).to(hidden.dtype)
            if needs[1]:
                grad_weight = coef @ hidden.index_select(0, upos).float()
            if needs[2]:
                grad_bias = coef.sum()
        return grad_hidden, grad_weight, grad_bias
