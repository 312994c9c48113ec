"""fuse_layers: the lean RMSNorm / SwiGLU / RoPE modules change memory, not results.

A fused reward model and an unfused one (torchtune's own modules) with the same weights give
the same rewards, loss and every parameter gradient, packed and padded, in float64 (torchtune's
RMSNorm and RoPE compute in fp32 whatever the dtype, so the two agree to fp32 rounding, TT_TOL;
fused against fused agrees to fp64 rounding); the state dict is unchanged; modules fastrm cannot fuse are left in
place and reported; meta-device initialisation (torchtune recipes' path) still works.
"""

from __future__ import annotations

import copy

import pytest
import torch
from rm_layout import pack_sequences, random_tokens

from fastrm.functional import pair_loss
from fastrm.models import reward_model, tiny_llama3, tiny_lora_llama3
from fastrm.models.fused import (
    FusedRMSNorm,
    FusedRotaryEmbedding,
    FusedSwiGLU,
    fuse_layers,
    saved_activation_bytes,
)

VOCAB = 96
TT_TOL = dict(rtol=1e-5, atol=1e-7)  # fused (fp64 math) vs torchtune's modules (fp32 math inside)


def _pair(fused: bool, dtype=torch.float64, builder=tiny_llama3, **kw):
    torch.manual_seed(3)
    m = reward_model(builder(vocab_size=VOCAB, max_seq_len=64, **kw), fused_ops=False).to(dtype)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n == "head.bias":
                p.add_(0.1 * torch.randn_like(p))
    if not fused:
        return m
    f = copy.deepcopy(m)
    f.fuse_report = fuse_layers(f.decoder)
    f.recompute_norm_outputs = True  # as reward_model(fused_ops=True) builds it
    return f


def _run(model, batch, padded=None):
    model.zero_grad(set_to_none=True)
    if padded is None:
        r = model.rewards(batch)
    else:
        r = model.rewards_padded(*padded)
    loss = pair_loss(r[0::2], r[1::2])
    loss.backward()
    return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(gen, lens=(7, 19, 1, 33, 12, 5)):
    seqs = [random_tokens(n, VOCAB, gen) for n in lens]
    return seqs, pack_sequences(seqs)


def test_fused_model_equals_torchtune_modules_packed_and_padded():
    gen = torch.Generator().manual_seed(5)
    seqs, batch = _batch(gen)
    ref, fused = _pair(False), _pair(True)
    rep = fused.fuse_report
    assert len(rep.rms_norm) == 2 * 2 + 1 and len(rep.swiglu) == 2 and len(rep.rope) == 1
    assert not rep.kept
    assert isinstance(fused.decoder.layers[0].sa_norm, FusedRMSNorm)
    assert isinstance(fused.decoder.layers[1].mlp, FusedSwiGLU)
    # one shared RoPE module stays shared
    assert fused.decoder.layers[0].attn.pos_embeddings is fused.decoder.layers[1].attn.pos_embeddings
    assert isinstance(fused.decoder.layers[0].attn.pos_embeddings, FusedRotaryEmbedding)
    r0, g0 = _run(ref, batch)
    r1, g1 = _run(fused, batch)
    torch.testing.assert_close(r1, r0, **TT_TOL)
    assert g0.keys() == g1.keys() and len(g0) == len(dict(ref.named_parameters()))
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TT_TOL, msg=lambda m: f"{n}: {m}")
    # padded path (torchtune's own attention with mask=None) through the fused modules too
    lens = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    p0, pg0 = _run(ref, batch, (tokens, lens))
    p1, pg1 = _run(fused, batch, (tokens, lens))
    torch.testing.assert_close(p1, p0, **TT_TOL)
    torch.testing.assert_close(p1, r1, rtol=1e-10, atol=1e-12)  # fused packed == fused padded
    for n in pg0:
        torch.testing.assert_close(pg1[n], pg0[n], **TT_TOL)
        torch.testing.assert_close(pg1[n], g1[n], rtol=1e-9, atol=1e-12)


def test_state_dict_is_unchanged_and_loads_both_ways():
    ref, fused = _pair(False), _pair(True)
    assert list(ref.state_dict()) == list(fused.state_dict())
    other = reward_model(tiny_llama3(vocab_size=VOCAB, max_seq_len=64)).double()  # fused default
    other.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    _, batch = _batch(gen)
    with torch.no_grad():
        torch.testing.assert_close(other.rewards(batch), ref.rewards(batch), **TT_TOL)


def test_fuse_layers_is_idempotent():
    fused = _pair(True)
    again = fuse_layers(fused.decoder)
    assert not again.rms_norm and not again.swiglu and not again.rope


def test_lora_mlp_is_kept_and_reported():
    model = reward_model(tiny_lora_llama3(apply_lora_to_mlp=True, vocab_size=VOCAB, max_seq_len=64))
    rep = model.fuse_report
    assert not rep.swiglu and len(rep.kept) == 2
    assert all("adapted" in why for why in rep.kept.values())
    assert rep.rope and len(rep.rms_norm) == 5
    gen = torch.Generator().manual_seed(2)
    _, batch = _batch(gen)
    r = model.rewards(batch)
    pair_loss(r[0::2], r[1::2]).backward()
    lora_a = [p for n, p in model.named_parameters() if "lora_a" in n and "mlp" in n]
    assert lora_a and all(p.grad is not None for p in lora_a)


def test_half_split_rope_is_not_replaced():
    from torchtune.models.qwen2._component_builders import qwen2

    dec = qwen2(vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32,
                intermediate_dim=48, max_seq_len=32, tie_word_embeddings=True)
    model = reward_model(dec)
    assert not model.fuse_report.rope
    assert not isinstance(model.decoder.layers[0].attn.pos_embeddings, FusedRotaryEmbedding)
    assert model.fuse_report.swiglu and model.fuse_report.rms_norm


def test_meta_device_init_then_rope_init():
    """torchtune recipes build on the meta device, materialise with to_empty, then call
    rope_init() on every module that has it: the wrapped RoPE keeps its cache reachable."""
    ref = _pair(False, dtype=torch.float32)
    with torch.device("meta"):
        model = reward_model(tiny_llama3(vocab_size=VOCAB, max_seq_len=64))
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    model.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(4)
    _, batch = _batch(gen)
    with torch.no_grad():
        torch.testing.assert_close(model.rewards(batch), ref.rewards(batch), rtol=1e-5, atol=1e-6)


def test_fused_with_activation_checkpointing_gives_the_same_gradients():
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    gen = torch.Generator().manual_seed(6)
    _, batch = _batch(gen)
    plain, ckpt = _pair(True), _pair(True)
    set_activation_checkpointing(ckpt, auto_wrap_policy={TransformerSelfAttentionLayer})
    _, g0 = _run(plain, batch)
    _, g1 = _run(ckpt, batch)
    g1 = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in g1.items()}
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12)


def _kept_bytes(model, batch) -> int:
    return saved_activation_bytes(lambda: model.rewards(batch), exclude=model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_save_less_for_backward(dtype):
    """What autograd keeps alive for the backward shrinks by >= 35 % with the fused modules,
    and again by >= 10 % when norm outputs are recomputed."""
    gen = torch.Generator().manual_seed(7)
    _, batch = _batch(gen, lens=(40, 52, 61, 33))
    unfused = _kept_bytes(_pair(False, dtype=dtype), batch)
    # the counter is not degenerate: torchtune's layers keep at least their input, the
    # attention and MLP inputs and the MLP's three [T, I] intermediates
    t, d, inter = batch.tokens.shape[1], 64, 256
    size = torch.finfo(dtype).bits // 8
    assert unfused >= 2 * t * (3 * d + 3 * inter) * size
    fused = _pair(True, dtype=dtype)
    fused.recompute_norm_outputs = False
    lean = _kept_bytes(fused, batch)
    fused.recompute_norm_outputs = True
    leaner = _kept_bytes(fused, batch)
    assert lean <= 0.65 * unfused, (unfused, lean)
    assert leaner <= 0.9 * lean, (lean, leaner)


def test_norm_recompute_gives_identical_gradients():
    gen = torch.Generator().manual_seed(8)
    _, batch = _batch(gen)
    a, b = _pair(True, dtype=torch.float32), _pair(True, dtype=torch.float32)
    a.recompute_norm_outputs, b.recompute_norm_outputs = True, False
    ra, ga = _run(a, batch)
    rb, gb = _run(b, batch)
    assert torch.equal(ra, rb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
