"""Tiny stand-ins for smoke runs and tests: a byte-level ChatML tokenizer and a random llama.

They let ``fastrm generate`` / ``fastrm judge`` configs run end to end in seconds without a
checkpoint (``_component_: fastrm.judge.testing.tiny_llama`` / ``byte_chatml_tokenizer``).
The text they produce is random bytes, of course.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch

__all__ = ["ByteChatMLTokenizer", "byte_chatml_tokenizer", "tiny_llama"]


class ByteChatMLTokenizer:
    """A torchtune ``ModelTokenizer`` over UTF-8 bytes with ChatML turns (the message protocol of
    SmolLM2's tokenizer, with a 259-id vocabulary).

    ids: 0 = pad, 1 = ``<|im_start|>``, 2 = ``<|im_end|>`` (eos and stop token), ``3 + b`` = byte b.
    """

    pad_id = 0
    im_start_id = 1
    im_end_id = 2
    eos_id = 2
    vocab_size = 259

    @property
    def stop_tokens(self) -> List[int]:
        return [self.im_end_id]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = [3 + b for b in text.encode("utf-8")]
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def tokenize_messages(self, messages: Sequence[Any], add_eos: bool = True) -> Tuple[List[int], List[bool]]:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; a last empty assistant turn is
        left open (the generation prompt), as torchtune's qwen2 tokenizer does."""
        tokens: List[int] = []
        for i, m in enumerate(messages):
            tokens.append(self.im_start_id)
            tokens += self.encode(f"{m.role}\n")
            tokens += self.encode(m.text_content)
            if m.role != "assistant" or i != len(messages) - 1:
                tokens.append(self.im_end_id)
                tokens += self.encode("\n")
        if add_eos:
            tokens.append(self.eos_id)
        return tokens, [False] * len(tokens)


def byte_chatml_tokenizer() -> ByteChatMLTokenizer:
    return ByteChatMLTokenizer()


def tiny_llama(seed: int = 0, vocab_size: int = 259, max_seq_len: int = 1024, embed_dim: int = 32,
               num_layers: int = 2, output_scale: float = 40.0) -> torch.nn.Module:
    """A random 2-layer torchtune llama (GQA 4/2 heads). ``output_scale`` multiplies the LM head so
    the next-token distribution is peaked (random weights otherwise give nearly uniform text)."""
    from torchtune.models.llama3._component_builders import llama3

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        m = llama3(vocab_size=vocab_size, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                   embed_dim=embed_dim, max_seq_len=max_seq_len, intermediate_dim=2 * embed_dim)
        with torch.no_grad():
            m.output.weight.mul_(output_scale)
    return m.eval()
