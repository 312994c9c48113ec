"""Fused ops: the reward head + pairwise loss + backward in one op, three backends.

* :func:`fused_reward_head_loss` / :class:`FusedRewardHeadLoss`: public entry points.
* ``fused_reward_head.py``: Triton kernels + their ``autograd.Function`` (CUDA, or CPU through
  ``TRITON_INTERPRET=1``); ``head_loss_native.py``: the C++ op from
  ``kernels/fused_reward_head.cpp``; ``head_loss_torch.py``: plain torch.
* :func:`available_backends` / :func:`resolve_backend`: which backend runs where
  (``$FASTRM_HEAD_BACKEND`` overrides the automatic choice).
"""

from fastrm.ops._common import BACKENDS
from fastrm.ops.dispatch import available_backends, fused_reward_head_loss, resolve_backend
from fastrm.ops.module import FusedRewardHeadLoss

__all__ = [
    "BACKENDS",
    "FusedRewardHeadLoss",
    "available_backends",
    "fused_reward_head_loss",
    "resolve_backend",
]
