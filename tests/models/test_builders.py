"""``fastrm.models.tiny_llama3``'s own options: ``seed`` (the same weights every time, the
global RNG untouched) and ``output_scale`` (the LM head multiplied)."""

import torch

from fastrm.data.tokenizer import ByteChatTokenizer
from fastrm.models import tiny_llama3

ARCH = dict(vocab_size=ByteChatTokenizer.vocab_size, embed_dim=32, intermediate_dim=64,
            max_seq_len=64)


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = tiny_llama3(**ARCH, seed=4), tiny_llama3(**ARCH, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    other = tiny_llama3(**ARCH, seed=5)
    for (name, pa), pb, po in zip(a.state_dict().items(), b.state_dict().values(),
                                  other.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_embeddings.weight, other.tok_embeddings.weight)


def test_output_scale_multiplies_only_the_lm_head():
    plain, scaled = tiny_llama3(**ARCH, seed=0), tiny_llama3(**ARCH, seed=0, output_scale=40.0)
    for name, p in plain.state_dict().items():
        want = p * 40.0 if name == "output.weight" else p
        torch.testing.assert_close(scaled.state_dict()[name], want, rtol=0, atol=0, msg=name)
