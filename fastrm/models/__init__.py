"""Reward models around torchtune decoders.

Note: the SmolLM2 GGUF / HF builder and tokenizer live in ``fastrm.models.smollm2``,
``fastrm.models.tokenizer`` and ``fastrm.models.gguf`` (another module's work); import them from
there. They are not re-exported here so that this package imports whether or not they exist.
"""

from fastrm.models.builders import (
    lora_reward_model,
    reward_model,
    tiny_llama3,
    tiny_llama3_reward_model,
    tiny_lora_llama3,
)
from fastrm.models.reward_model import (
    LoadReport,
    RewardHead,
    RewardModel,
    head_state_dict,
    load_base_weights,
    load_from_checkpointer,
    load_head,
    register_fsdp_forward_methods,
    save_head,
)

__all__ = [
    "LoadReport",
    "RewardHead",
    "RewardModel",
    "head_state_dict",
    "load_base_weights",
    "load_from_checkpointer",
    "load_head",
    "lora_reward_model",
    "register_fsdp_forward_methods",
    "reward_model",
    "save_head",
    "tiny_llama3",
    "tiny_llama3_reward_model",
    "tiny_lora_llama3",
]
