"""fastrm: fast, complete reward-model training for torchtune.

Public names:

* :class:`RewardLoss`: pairwise reward-model loss (Bradley-Terry, margins, centering,
  cross-prompt, grouped comparisons) for a torchtune config's ``loss:`` section.
* :func:`fused_reward_head_loss`: reward head + loss + backward in one op from packed hidden
  states (Triton on CUDA, native C++ on CPU, torch reference).
* :class:`PackedBatch`: the packed batch type (segments, shared prefixes, comparisons).
"""

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss

__version__ = "0.1.0"

__all__ = ["PackedBatch", "RewardLoss", "fused_reward_head_loss", "__version__"]


def __getattr__(name: str):
    # Lazy: importing the Triton kernels is not free and not needed for the loss alone.
    if name == "fused_reward_head_loss":
        from fastrm.ops import fused_reward_head_loss

        return fused_reward_head_loss
    raise AttributeError(f"module 'fastrm' has no attribute {name!r}")
