"""The contract of the fused reward head + loss: its inputs, what a backend computes, the closed form.

Every backend (``head_loss_triton``, ``head_loss_native``, ``head_loss_torch``) receives the same
checked arguments (:class:`HeadLossInputs`, options in :class:`LossOptions`), subclasses
:class:`HeadLossFunction` (one autograd signature for all of them) and computes in its forward:

* ``rewards [N]`` fp32: ``r_n = hidden[reward_positions[n]] . weight + bias``;
* the loss and ``dL/dr [N]`` together in closed form, so the backward is only a scale by
  ``grad_output`` and a scatter into the gathered rows of ``hidden``
  (``grad_hidden[pos_n] += g * dL/dr_n * weight``, ``grad_weight = g * sum_n dL/dr_n *
  hidden[pos_n]``, ``grad_bias = g * sum_n dL/dr_n``).

Closed form, pair mode (``P`` comparisons, weights ``w_p``, ``s_p = w_p / sum_q w_q``)::

    delta_p = r[c_p] - r[j_p] - m_p
    L       = sum_p s_p * (l(delta_p) + cc * (r[c_p] + r[j_p])**2)
    dL/dr_n = sum_{p: c_p = n} s_p * ( l'(delta_p) + 2 cc (r[c_p] + r[j_p]))
            + sum_{p: j_p = n} s_p * (-l'(delta_p) + 2 cc (r[c_p] + r[j_p]))

Contrast (cross-prompt RPO) mode (``W [Bc, Br]``, ``m_ij = margin_i`` on the diagonal only)::

    delta_ij = r[c_i] - r[j_j] - m_ij
    L        = (1 / Bc) sum_ij W_ij (l(delta_ij) + cc (r[c_i] + r[j_j])**2)
    dL/dr[c_i] += (1 / Bc) sum_j W_ij ( l'(delta_ij) + 2 cc (r[c_i] + r[j_j]))
    dL/dr[j_j] += (1 / Bc) sum_i W_ij (-l'(delta_ij) + 2 cc (r[c_i] + r[j_j]))

``l`` and ``l'`` are :func:`fastrm.functional.pairwise_objective` and
:func:`fastrm.functional.pairwise_objective_grad`, written here in overflow-free form
(:func:`loss_and_reward_grad`, the torch backend's forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastrm.functional import OBJECTIVES, check_objective

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: integer codes of the objectives, shared with the Triton kernels and the C++ op
OBJECTIVE_CODES = {name: i for i, name in enumerate(OBJECTIVES)}


@dataclass(frozen=True)
class LossOptions:
    """The non-tensor loss options, checked on construction (``ValueError`` naming the option).

    A new loss option is a field here (plus its use in each backend's loss computation); the
    autograd signature of the backends does not change.
    """

    objective: str = "bradley_terry"
    label_smoothing: float = 0.0
    hinge_margin: float = 1.0
    centering_coefficient: float = 0.0

    def __post_init__(self) -> None:
        check_objective(self.objective)
        for name in ("label_smoothing", "hinge_margin", "centering_coefficient"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not 0.0 <= self.label_smoothing < 0.5:  # eps >= 0.5 would invert the preference labels
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.objective != "bradley_terry":
            raise ValueError(f"label_smoothing only applies to objective='bradley_terry', "
                             f"got objective={self.objective!r}; set label_smoothing=0")
        if self.centering_coefficient < 0:
            raise ValueError(f"centering_coefficient must be >= 0, got {self.centering_coefficient}")


@dataclass
class HeadLossInputs:
    """Checked, normalized arguments of :func:`fastrm.ops.fused_reward_head_loss`.

    ``hidden [T, D]`` (last dim contiguous), ``weight [D]`` and ``bias []`` are views of the
    caller's tensors, so autograd routes their gradients back to the original shapes.
    ``reward_positions [N]``, ``chosen_index``, ``rejected_index`` are int64 and contiguous;
    ``margin``, ``comparison_weight`` and ``contrast_weights`` are fp32 (or ``None``).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    reward_positions: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor]
    comparison_weight: Optional[torch.Tensor]
    contrast_weights: Optional[torch.Tensor]
    options: LossOptions

    @property
    def contrast(self) -> bool:
        return self.contrast_weights is not None


def _check_tensor(name: str, value, want_float: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if want_float and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if not want_float and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(
            f"{name} must be an integer tensor (int64 indices), got dtype {value.dtype}; "
            f"convert it with .long()")


def _check_index(name: str, idx: torch.Tensor, upper: int, what: str) -> torch.Tensor:
    _check_tensor(name, idx, want_float=False)
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            bad = int(((idx < 0) | (idx >= upper)).nonzero()[0])
            raise ValueError(
                f"{name}[{bad}] = {int(idx[bad])} is out of range: {name} must lie in "
                f"[0, {upper}) ({what})")
    return idx.to(torch.int64).contiguous()


def _check_float_vector(name: str, value: torch.Tensor, length: int, what: str) -> torch.Tensor:
    _check_tensor(name, value, want_float=True)
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] ({what}), got {tuple(value.shape)}")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise ValueError(f"{name} of comparison {bad} is not finite ({float(value[bad])}); "
                         f"drop or fix that comparison")
    return value.detach().to(torch.float32).contiguous()


def prepare_inputs(
    hidden,
    weight,
    bias,
    reward_positions,
    chosen_index,
    rejected_index,
    margin=None,
    comparison_weight=None,
    *,
    options: LossOptions,
    contrast_weights=None,
) -> HeadLossInputs:
    """Checks every tensor argument (``ValueError`` naming the field and the fix) and normalizes
    them; ``options`` were checked when the :class:`LossOptions` was built.

    Index range checks read the index tensors' min/max, one host sync each on CUDA: cheap
    next to a forward pass and far cheaper than an out-of-bounds gather inside a kernel.
    """
    _check_tensor("hidden", hidden, want_float=True)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, D] (flatten [1, T, D] with hidden[0]), "
                         f"got shape {tuple(hidden.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    t, d = hidden.shape
    if t == 0 or d == 0:
        raise ValueError(f"hidden must be non-empty, got shape {tuple(hidden.shape)}")
    if hidden.stride(1) != 1:  # kernels read rows with unit stride
        hidden = hidden.contiguous()

    _check_tensor("weight", weight, want_float=True)
    if tuple(weight.shape) not in ((d,), (1, d)):
        raise ValueError(f"weight must have shape [D] or [1, D] with D={d} (hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in (hidden.dtype, torch.float32):
        raise ValueError(f"weight dtype {weight.dtype} must be hidden's ({hidden.dtype}) or float32")
    weight = weight.reshape(d)  # a view: autograd maps the gradient back to [1, D]
    if bias is not None:
        _check_tensor("bias", bias, want_float=True)
        if bias.numel() != 1 or bias.dim() > 1:
            raise ValueError(f"bias must have shape [1] or [] (or be None), got {tuple(bias.shape)}")
        bias = bias.reshape(())

    for name, v in (("weight", weight), ("bias", bias), ("reward_positions", reward_positions),
                    ("chosen_index", chosen_index), ("rejected_index", rejected_index),
                    ("margin", margin), ("comparison_weight", comparison_weight),
                    ("contrast_weights", contrast_weights)):
        if isinstance(v, torch.Tensor) and v.device != hidden.device:
            raise ValueError(f"{name} is on {v.device} but hidden is on {hidden.device}; "
                             f"move it with .to(hidden.device)")

    positions = _check_index("reward_positions", reward_positions, t, f"rows of hidden, T={t}")
    n = positions.shape[0]
    if n == 0:
        raise ValueError("reward_positions is empty: there is no response to score")
    chosen = _check_index("chosen_index", chosen_index, n, f"indices into the N={n} rewards")
    rejected = _check_index("rejected_index", rejected_index, n, f"indices into the N={n} rewards")
    if chosen.numel() == 0 or rejected.numel() == 0:
        raise ValueError("chosen_index and rejected_index must be non-empty: the batch has no comparison")

    w_contrast = None
    if contrast_weights is not None:
        bc, br = chosen.shape[0], rejected.shape[0]
        _check_tensor("contrast_weights", contrast_weights, want_float=True)
        if tuple(contrast_weights.shape) != (bc, br):
            raise ValueError(f"contrast_weights must have shape [Bc, Br] = [{bc}, {br}] "
                             f"(len(chosen_index), len(rejected_index)), got "
                             f"{tuple(contrast_weights.shape)}")
        if not bool(torch.isfinite(contrast_weights).all()):
            raise ValueError("contrast_weights has non-finite entries")
        if comparison_weight is not None:
            raise ValueError("comparison_weight does not apply in contrast mode: put per-pair "
                             "weights into contrast_weights (the loss is divided by Bc)")
        if margin is not None and bc != br:
            raise ValueError(f"margin needs paired data in contrast mode (Bc == Br), got "
                             f"Bc={bc}, Br={br}; pass margin=None")
        w_contrast = contrast_weights.detach().to(torch.float32).contiguous()
        m_len, m_what = bc, "one per chosen response, the diagonal pairs"
    else:
        if chosen.shape[0] != rejected.shape[0]:
            raise ValueError(f"chosen_index ({chosen.shape[0]}) and rejected_index "
                             f"({rejected.shape[0]}) must have the same length P")
        m_len, m_what = chosen.shape[0], "one per comparison"

    m = None if margin is None else _check_float_vector("margin", margin, m_len, m_what)
    cw = None
    if comparison_weight is not None:
        cw = _check_float_vector("comparison_weight", comparison_weight, m_len, m_what)
        if bool((cw < 0).any()):
            bad = int((cw < 0).nonzero()[0])
            raise ValueError(f"comparison_weight of comparison {bad} is negative ({float(cw[bad])}); "
                             f"weights must be >= 0")
        if float(cw.sum()) <= 0:
            raise ValueError("comparison_weight sums to 0: the weighted mean is undefined; "
                             "give at least one comparison a positive weight")

    return HeadLossInputs(
        hidden=hidden, weight=weight, bias=bias, reward_positions=positions,
        chosen_index=chosen, rejected_index=rejected, margin=m, comparison_weight=cw,
        contrast_weights=w_contrast, options=options,
    )


# ----------------------------------------------------------------------------- closed form
def objective_value_and_grad(
    delta: torch.Tensor, objective: str, label_smoothing: float, hinge_margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l(delta), l'(delta))`` elementwise, overflow-free (softplus / sigmoid)."""
    if objective == "bradley_terry":
        eps = label_smoothing
        # -logsigmoid(x) = softplus(-x); d/dx softplus(-x) = -sigmoid(-x)
        value = (1.0 - eps) * F.softplus(-delta)
        s = torch.sigmoid(-delta)
        grad = -(1.0 - eps) * s
        if eps:
            value = value + eps * F.softplus(delta)
            grad = grad + eps * (1.0 - s)
        return value, grad
    return torch.relu(hinge_margin - delta), -(delta < hinge_margin).to(delta.dtype)


def loss_and_reward_grad(rewards: torch.Tensor, inp: HeadLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (0-d) and ``dL/dr [N]`` for ``rewards [N]`` in their own dtype (the torch backend's
    closed form; see the module docstring for the formulas)."""
    o = inp.options
    obj, eps, hm, cc = o.objective, o.label_smoothing, o.hinge_margin, o.centering_coefficient
    n = rewards.shape[0]
    dldr = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    r_c = rewards[inp.chosen_index]
    r_r = rewards[inp.rejected_index]
    if inp.contrast:
        bc = r_c.shape[0]
        delta = r_c[:, None] - r_r[None, :]
        if inp.margin is not None:
            delta = delta - torch.diag(inp.margin.to(delta.dtype))
        w = inp.contrast_weights.to(delta.dtype) / bc
        value, grad = objective_value_and_grad(delta, obj, eps, hm)
        if cc:
            s = r_c[:, None] + r_r[None, :]
            value = value + cc * s * s
            g_c, g_r = grad + 2 * cc * s, -grad + 2 * cc * s
        else:
            g_c, g_r = grad, -grad
        loss = (w * value).sum()
        dldr.index_add_(0, inp.chosen_index, (w * g_c).sum(1))
        dldr.index_add_(0, inp.rejected_index, (w * g_r).sum(0))
        return loss, dldr
    delta = r_c - r_r
    if inp.margin is not None:
        delta = delta - inp.margin.to(delta.dtype)
    if inp.comparison_weight is None:
        scale = torch.full_like(delta, 1.0 / delta.shape[0])
    else:
        cw = inp.comparison_weight.to(delta.dtype)
        scale = cw / cw.sum()
    value, grad = objective_value_and_grad(delta, obj, eps, hm)
    if cc:
        s = r_c + r_r
        value = value + cc * s * s
        g_c, g_r = grad + 2 * cc * s, -grad + 2 * cc * s
    else:
        g_c, g_r = grad, -grad
    loss = (scale * value).sum()
    dldr.index_add_(0, inp.chosen_index, scale * g_c)
    dldr.index_add_(0, inp.rejected_index, scale * g_r)
    return loss, dldr


# ------------------------------------------------------------------- the backends' autograd
class HeadLossFunction(torch.autograd.Function):
    """``(loss, rewards) = f(hidden [T, D], weight [D], bias [] | None)``: the autograd shell of
    every backend.

    Only ``hidden``, ``weight`` and ``bias`` are autograd inputs (positional, so their gradients
    reach the caller's tensors); the rest of the checked :class:`HeadLossInputs` (indices,
    margins, weights, :class:`LossOptions`) rides along as one argument that gets no gradient.
    ``rewards`` is returned detached. A backend subclasses this and implements:

    * ``_forward(inp) -> (loss [] fp32, rewards [N] fp32, saved)``: ``saved`` is a tuple of the
      tensors its backward needs besides ``hidden`` and ``weight``;
    * ``_backward(hidden, weight, saved, grad_loss, needs) -> (grad_hidden, grad_weight [D],
      grad_bias [])``: ``needs`` is ``(hidden, weight, bias)`` need a gradient; a gradient
      that is not needed may be ``None``; weight and bias gradients are cast here.

    ``forward`` is a classmethod so it reaches the subclass's hooks (autograd calls
    ``cls.forward(ctx, ...)``); the backward is once-differentiable (a second derivative
    raises instead of silently returning a wrong one).
    """

    @classmethod
    def apply_inputs(cls, inp: HeadLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the backend on checked inputs: ``(loss, rewards)``."""
        return cls.apply(inp.hidden, inp.weight, inp.bias, inp)

    @staticmethod
    def _forward(inp: HeadLossInputs) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        raise NotImplementedError

    @staticmethod
    def _backward(hidden, weight, saved: tuple, grad_loss: torch.Tensor, needs: tuple):
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, hidden, weight, bias, inp: HeadLossInputs):
        loss, rewards, saved = cls._forward(inp)
        ctx.save_for_backward(hidden, weight, *saved)
        ctx.backend_backward = cls._backward
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(rewards)
        return loss, rewards

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_rewards):
        hidden, weight, *saved = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.bias_dtype is not None
        gh, gw, gb = ctx.backend_backward(hidden, weight, tuple(saved), grad_loss,
                                          (need_hidden, need_weight, need_bias))
        return (
            gh if need_hidden else None,
            gw.to(weight.dtype) if need_weight else None,
            gb.to(ctx.bias_dtype) if need_bias else None,
            None,
        )
