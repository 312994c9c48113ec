"""Fused ops: the reward head + pairwise loss + backward in one op, three backends.

* :func:`fused_reward_head_loss` / :class:`FusedRewardHeadLoss`: the public op and its module,
  with the choice of backend (:func:`available_backends`, :func:`resolve_backend`;
  ``$FASTRM_HEAD_BACKEND`` overrides the automatic choice), in ``head_loss.py``.
* One file per backend, each holding its kernels (or op calls) and its ``autograd.Function``:
  ``head_loss_triton.py`` (Triton kernels + launcher; CUDA, or CPU through
  ``TRITON_INTERPRET=1``), ``head_loss_native.py`` (the C++ op from
  ``kernels/fused_reward_head.cpp``), ``head_loss_torch.py`` (plain torch).
* ``head_loss_contract.py``: what the backends share: input checks (``HeadLossInputs``),
  ``LossOptions``, the closed-form loss + ``dL/dr``, and ``HeadLossFunction``, the one autograd
  signature every backend implements.

The lean per-layer ops live in their own modules, each an ``autograd.Function`` over the C++
kernels of ``kernels/`` (CPU) with a plain-torch fallback: :mod:`fastrm.ops.rms_norm`
(``rms_norm``), :mod:`fastrm.ops.swiglu` (``swiglu_mlp``, ``silu_mul``) and
:mod:`fastrm.ops.rope` (``apply_rope``); :mod:`fastrm.models.fused` swaps them into torchtune
decoders.

Example (``hidden [T, D]`` from a packed forward, ``batch`` a :class:`fastrm.data.batch.PackedBatch`)::

    from fastrm.ops import fused_reward_head_loss

    loss, rewards = fused_reward_head_loss(
        hidden, head.weight, head.bias, batch.reward_positions,
        batch.chosen_index, batch.rejected_index, batch.margin,
        objective="bradley_terry", centering_coefficient=0.01)
    loss.backward()   # grad only at the N scored rows of hidden, plus head weight and bias
"""

from fastrm.ops.head_loss import (
    BACKENDS,
    FusedRewardHeadLoss,
    available_backends,
    fused_reward_head_loss,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "FusedRewardHeadLoss",
    "available_backends",
    "fused_reward_head_loss",
    "resolve_backend",
]
