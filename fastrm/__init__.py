"""fastrm: fast, complete reward-model training for torchtune.

Public names:

* :class:`RewardLoss`: pairwise reward-model loss (Bradley-Terry, margins, centering,
  cross-prompt, grouped comparisons) for a torchtune config's ``loss:`` section.
* :func:`fused_reward_head_loss`: reward head + loss + backward in one op from packed hidden
  states (Triton on CUDA, native C++ on CPU, torch reference).
* :class:`PackedBatch`: the packed batch type (segments, shared prefixes, comparisons).
* :func:`reward_model` / :func:`lora_reward_model` / :class:`RewardModel`: a reward model around
  any torchtune decoder with packed per-sequence attention (:func:`varlen_attention`).
* :func:`load_reward_model`: a trained reward model directory (fastrm's checkpoints, or any HF
  ``*ForSequenceClassification`` directory of a supported family) with its tokenizer.
* ``fastrm.optim.AdamW``: AdamW for bf16 weights (fp32 update, stochastic rounding), the
  shipped SmolLM2 configs' ``optimizer``.
* :class:`RewardScorer`: scores rows with a trained reward model (packed, the prompt of several
  responses computed once); :func:`evaluate_pairs`: pairwise accuracy / RewardBench sections.
"""

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss

__version__ = "0.1.0"

__all__ = ["PackedBatch", "RewardLoss", "RewardModel", "RewardScorer", "evaluate_pairs",
           "fused_reward_head_loss", "load_reward_model", "lora_reward_model", "reward_model",
           "varlen_attention", "__version__"]

# Lazy: the kernels and torchtune models are not free to import and not needed for the loss.
_LAZY = {
    "fused_reward_head_loss": "fastrm.ops",
    "RewardModel": "fastrm.models",
    "reward_model": "fastrm.models",
    "lora_reward_model": "fastrm.models",
    "varlen_attention": "fastrm.attention",
    "load_reward_model": "fastrm.hf",
    "RewardScorer": "fastrm.inference",
    "evaluate_pairs": "fastrm.inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastrm' has no attribute {name!r}")
