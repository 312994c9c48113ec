"""The judge tests' tiny local model: fastrm's tiny Llama 3 over its byte tokenizer, as config
nodes (for configs written in the tests) and as objects (the fixtures in conftest.py)."""

from __future__ import annotations

from typing import Any

from fastrm.data.tokenizer import ByteChatTokenizer
from fastrm.models import tiny_llama3

#: a random 2-layer Llama 3 (GQA 4/2 heads, D=32) over the byte tokenizer's vocabulary, its LM
#: head scaled so the next-token distribution is peaked (random weights give near-uniform text)
TINY_LLAMA = {"_component_": "fastrm.models.tiny_llama3", "vocab_size": ByteChatTokenizer.vocab_size,
              "embed_dim": 32, "intermediate_dim": 64, "max_seq_len": 1024, "seed": 0,
              "output_scale": 40.0}
BYTE_TOKENIZER = {"_component_": "fastrm.data.tokenizer.ByteChatTokenizer"}


def local_backend_node(seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """A ``LocalBackend`` config node over the tiny model (weights drawn from ``seed``)."""
    return {"_component_": "fastrm.judge.local.LocalBackend", "model": {**TINY_LLAMA, "seed": seed},
            "tokenizer": BYTE_TOKENIZER, **kwargs}


def tiny_llama(seed: int = 0):
    kwargs = {k: v for k, v in TINY_LLAMA.items() if k != "_component_"}
    return tiny_llama3(**{**kwargs, "seed": seed})
