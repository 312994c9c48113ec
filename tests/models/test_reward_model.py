"""RewardModel on packed batches == the plain (unpacked, unshared) torchtune forward.

The reference side always runs torchtune's own attention (``forward_padded``: causal SDPA on
one sequence at a time), so these tests compare two independent implementations: fastrm's
packed varlen path and torchtune's unpacked path.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from rm_layout import pack_groups, pack_sequences, random_tokens

from fastrm.functional import comparison_loss, pair_loss
from fastrm.models import RewardModel, reward_model, tiny_llama3

VOCAB = 128
MAX_LEN = 48


def _tiny(family: str, max_seq_len: int = MAX_LEN):
    if family == "llama3":
        return tiny_llama3(vocab_size=VOCAB, max_seq_len=max_seq_len)
    if family == "llama3_2":
        from torchtune.models.llama3_2._component_builders import llama3_2

        return llama3_2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=1,
                        embed_dim=64, max_seq_len=max_seq_len, scale_factor=8)
    if family == "qwen2":
        from torchtune.models.qwen2._component_builders import qwen2

        return qwen2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                     intermediate_dim=96, max_seq_len=max_seq_len, tie_word_embeddings=True)
    if family == "mistral":
        from torchtune.models.mistral._component_builders import mistral

        return mistral(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64,
                       intermediate_dim=96, max_seq_len=max_seq_len)
    if family == "gemma":
        from torchtune.models.gemma._component_builders import gemma

        return gemma(vocab_size=VOCAB, num_layers=2, num_heads=4, head_dim=24, num_kv_heads=2,
                     embed_dim=64, intermediate_dim=96, max_seq_len=max_seq_len)
    if family == "smollm2":
        from fastrm.models.smollm2 import smollm2

        return smollm2(vocab_size=VOCAB, num_layers=2, num_heads=3, num_kv_heads=1, embed_dim=48,
                       intermediate_dim=96, max_seq_len=max_seq_len)
    raise ValueError(family)


def _model(family="llama3", seed=0, dtype=torch.float32, **kw) -> RewardModel:
    torch.manual_seed(seed)
    m = reward_model(_tiny(family), **kw).to(dtype)
    # non-zero head bias and non-trivial norms so every parameter gets a distinct gradient
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n == "head.bias":
                p.add_(0.1 * torch.randn_like(p))
    return m


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(g1, g2, rtol, atol):
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def _mixed_lengths(rng: random.Random, full: int) -> list[int]:
    return [1, full] + [rng.randint(1, full) for _ in range(4)] + [1]


# ---------------------------------------------------------------------------------------------
# packed == unpacked
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama3", "llama3_2", "qwen2", "mistral", "gemma", "smollm2"])
def test_packed_forward_and_grads_match_unpacked(family):
    model = _model(family)
    gen = torch.Generator().manual_seed(1)
    lens = _mixed_lengths(random.Random(family), MAX_LEN)
    seqs = [random_tokens(n, VOCAB, gen) for n in lens]
    batch = pack_sequences(seqs)
    d = model.embed_dim
    weights = torch.randn(batch.num_tokens, d, generator=gen)

    hidden = model(batch)
    assert hidden.shape == (batch.num_tokens, d)
    (hidden * weights).sum().backward()
    g_packed = _grads(model)
    model.zero_grad(set_to_none=True)

    offs = batch.cu_seqlens.tolist()
    ref_hidden = []
    total = 0.0
    for s, seq in enumerate(seqs):
        h = model.forward_padded(seq[None])[0]  # torchtune's own causal SDPA
        ref_hidden.append(h.detach())
        total = total + (h * weights[offs[s]: offs[s + 1]]).sum()
    total.backward()
    torch.testing.assert_close(hidden.detach(), torch.cat(ref_hidden), rtol=1e-5, atol=1e-5)
    _assert_grads_close(g_packed, _grads(model), rtol=1e-4, atol=1e-5)
    # every decoder parameter has a gradient (no part of the model silently bypassed)
    assert len(g_packed) == len(list(model.decoder.parameters()))


def _groups(gen, rng, vocab=VOCAB):
    """Prompts incl. an empty one; responses incl. one-token ones."""
    groups = []
    for p, resp in [(5, [3, 1]), (0, [4, 2]), (7, [1, 6, 2]), (1, [1, 1]), (9, [8])]:
        groups.append((random_tokens(p, vocab, gen), [random_tokens(n, vocab, gen) for n in resp]))
    rng.shuffle(groups)
    return groups


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_prefix_sharing_matches_unshared(family):
    model = _model(family)
    gen = torch.Generator().manual_seed(2)
    groups = _groups(gen, random.Random(3))
    shared = pack_groups(groups, share=True)
    plain = pack_groups(groups, share=False)
    assert shared.batch.has_prefix and not plain.batch.has_prefix
    assert shared.batch.num_tokens < plain.batch.num_tokens
    d = model.embed_dim
    n_resp_tokens = sum(int(i.numel()) for i in shared.response_index)
    w = torch.randn(n_resp_tokens, d, generator=gen)

    def run(layout):
        model.zero_grad(set_to_none=True)
        h = model(layout.batch)
        resp = torch.cat([h[i] for i in layout.response_index])
        (resp * w).sum().backward()
        return resp.detach(), _grads(model), model.rewards(layout.batch).detach()

    h_s, g_s, r_s = run(shared)
    h_p, g_p, r_p = run(plain)
    torch.testing.assert_close(h_s, h_p, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g_s, g_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_s, r_p, rtol=1e-5, atol=1e-5)
    # and the unshared layout itself equals torchtune's unpacked forward of prompt + response
    k = 0
    for prompt, responses in groups:
        for r in responses:
            ref = model.forward_padded(torch.cat([prompt, r])[None])[0, prompt.numel():]
            n = r.numel()
            torch.testing.assert_close(h_s[k: k + n], ref.detach(), rtol=1e-5, atol=1e-5)
            k += n


def test_prefix_sharing_bf16():
    model = _model("llama3", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    groups = _groups(gen, random.Random(5))
    shared = pack_groups(groups, share=True)
    with torch.no_grad():
        h = model(shared.batch)
        assert h.dtype == torch.bfloat16
        ref64 = copy.deepcopy(model).double()  # same (bf16-rounded) weights, exact arithmetic
        k = 0
        for prompt, responses in groups:
            for r in responses:
                ref = ref64.forward_padded(torch.cat([prompt, r])[None])[0, prompt.numel():]
                got = h[shared.response_index[k]].double()
                torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2)
                k += 1


def test_packed_bf16_close_to_fp64():
    gen = torch.Generator().manual_seed(6)
    seqs = [random_tokens(n, VOCAB, gen) for n in (1, 17, MAX_LEN, 3)]
    batch = pack_sequences(seqs)
    with torch.no_grad():
        m16 = _model("llama3", dtype=torch.bfloat16)
        h16 = m16(batch).double()
        h64 = copy.deepcopy(m16).double()(batch)
    torch.testing.assert_close(h16, h64, rtol=5e-2, atol=5e-2)


def test_reference_backend_gives_same_model_output():
    gen = torch.Generator().manual_seed(7)
    layout = pack_groups(_groups(gen, random.Random(8)), share=True)
    a = _model("llama3", dtype=torch.float64)
    b = _model("llama3", dtype=torch.float64, attention_backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(a(layout.batch), b(layout.batch), rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# reward head
# ---------------------------------------------------------------------------------------------
def test_head_only_at_reward_positions():
    model = _model()
    gen = torch.Generator().manual_seed(9)
    batch = pack_sequences([random_tokens(n, VOCAB, gen) for n in (5, 9, 1, 30)])
    n = int(batch.reward_positions.numel())
    seen = []

    def hook(mod, inputs, output):
        seen.append((tuple(inputs[0].shape), tuple(output.shape)))

    handle = model.head.register_forward_hook(hook)
    try:
        r = model.rewards(batch)
    finally:
        handle.remove()
    assert seen == [((n, model.embed_dim), (n, 1))]  # never [T, D] -> [T, 1]
    assert r.shape == (n,) and r.dtype == torch.float32
    with torch.no_grad():
        h = model(batch)
        manual = h[batch.reward_positions] @ model.head.weight[0]
    torch.testing.assert_close(r.detach(), manual, rtol=1e-6, atol=1e-6)


def test_lm_output_removed_and_state_dict_keys():
    model = _model()
    sd = model.state_dict()
    assert "head.weight" in sd and "head.bias" not in sd  # bias-free, as HF's score
    assert sd["head.weight"].shape == (1, model.embed_dim)
    assert not any(k.startswith("decoder.output") for k in sd)
    assert isinstance(model.decoder.output, torch.nn.Identity)


# ---------------------------------------------------------------------------------------------
# training step: packed loss == padded loss
# ---------------------------------------------------------------------------------------------
def _packed_loss(model, batch, impl):
    if impl == "comparison_loss":
        r = model.rewards(batch)
        return comparison_loss(r, batch.chosen_index, batch.rejected_index)
    from fastrm.ops import fused_reward_head_loss

    loss, _ = fused_reward_head_loss(
        model(batch), model.head.weight, model.head.bias, batch.reward_positions,
        batch.chosen_index, batch.rejected_index, backend=impl.split(":")[1],
    )
    return loss


def _loss_impls():
    from fastrm.ops import available_backends

    return ["comparison_loss"] + [f"fused:{b}" for b in available_backends("cpu")
                                  if b in ("torch", "native")]


@pytest.mark.parametrize("impl", _loss_impls())
def test_packed_training_step_equals_padded(impl):
    gen = torch.Generator().manual_seed(10)
    b = 4
    lens_c = [7, 1, 30, 12]
    lens_r = [3, 25, 1, 12]
    chosen = [random_tokens(n, VOCAB, gen) for n in lens_c]
    rejected = [random_tokens(n, VOCAB, gen) for n in lens_r]
    # packed: chosen_i, rejected_i adjacent; comparisons (2i, 2i+1)
    batch = pack_sequences([s for pair in zip(chosen, rejected) for s in pair])
    # padded: [chosen; rejected] rows, right-padded to the longest (what common trainers do)
    seqs = chosen + rejected
    lmax = max(len(s) for s in seqs)
    tokens = torch.zeros(2 * b, lmax, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])

    packed_model = _model(seed=3)
    padded_model = copy.deepcopy(packed_model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (packed_model, padded_model)]
    for step in range(2):
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss_packed = _packed_loss(packed_model, batch, impl)
        rp = padded_model.rewards_padded(tokens, lengths)
        loss_padded = pair_loss(rp[:b], rp[b:])
        torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
        loss_packed.backward()
        loss_padded.backward()
        _assert_grads_close(_grads(packed_model), _grads(padded_model), rtol=1e-4, atol=1e-6)
        for o in opts:
            o.step()


def test_activation_checkpointing_same_grads():
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    gen = torch.Generator().manual_seed(11)
    layout = pack_groups(_groups(gen, random.Random(12)), share=True)
    a = _model(seed=5)
    b = copy.deepcopy(a)
    set_activation_checkpointing(b, auto_wrap_policy={TransformerSelfAttentionLayer})
    for m in (a, b):
        comparison_loss(m.rewards(layout.batch), layout.batch.chosen_index,
                        layout.batch.rejected_index).backward()
    ga = _grads(a)
    gb = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in _grads(b).items()}
    _assert_grads_close(ga, gb, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# errors and unsupported models
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    model = _model()
    gen = torch.Generator().manual_seed(13)
    batch = pack_sequences([random_tokens(n, VOCAB, gen) for n in (5, 9)])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.hidden_states(batch.tokens, batch.position_ids + MAX_LEN, batch.cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens ends at"):
        model.hidden_states(batch.tokens, batch.position_ids, torch.tensor([0, 5, 13]))
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        model.hidden_states(batch.tokens.expand(2, -1), batch.position_ids, batch.cu_seqlens)
    with pytest.raises(ValueError, match="TransformerDecoder"):
        RewardModel(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not known"):
        _model(attention_backend="flashy")


def test_gemma2_is_refused_clearly():
    from torchtune.models.gemma2._component_builders import gemma2

    dec = gemma2(vocab_size=VOCAB, num_layers=1, num_heads=2, head_dim=16, num_kv_heads=1,
                 embed_dim=32, intermediate_dim=48, max_seq_len=32)
    with pytest.raises(NotImplementedError, match="Gemma 2"):
        RewardModel(dec)


@pytest.mark.slow
def test_compiled_layers_do_not_recompile_per_layout():
    """torchtune compiles each layer; packed attention runs eagerly inside (compiler.disable),
    so new batch layouts cost no recompiles once shapes are dynamic, and outputs are unchanged."""
    import torch._dynamo.testing

    model = _model()
    layouts = ([3, 5, 9], [4, 4, 1, 7], [2, 30], [1, 1, 1, 12, 6])
    gen = torch.Generator().manual_seed(14)
    batches = [pack_sequences([random_tokens(n, VOCAB, gen) for n in lens]) for lens in layouts]
    with torch.no_grad():
        eager = [model(b) for b in batches]
    counter = torch._dynamo.testing.CompileCounter()
    for layer in model.decoder.layers:
        layer.compile(backend=counter)
    frames = []
    for b, ref in zip(batches, eager):
        h = model(b)
        h.sum().backward()
        torch.testing.assert_close(h.detach(), ref, rtol=1e-6, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[2] == frames[3] == frames[1]  # after the dynamic-shape recompile: none


def test_packed_attention_reads_kv_heads_without_expanding(monkeypatch):
    """PackedSelfAttention hands the varlen kernels q [T, H, D] and k, v [T, H_kv, D] (no
    GQA-expanded copies, no transposes); padded batches still take torchtune's own forward."""
    import fastrm.attention.integration as integ
    from fastrm.attention import PackedSelfAttention

    model = _model("llama3")  # 4 query heads, 2 kv heads
    attn = model.decoder.layers[0].attn
    assert isinstance(attn.forward, PackedSelfAttention)
    seen = []
    real = integ.varlen_attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), k.is_contiguous(), q.is_contiguous()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(integ, "varlen_attention", spy)
    gen = torch.Generator().manual_seed(2)
    batch = pack_sequences([random_tokens(n, VOCAB, gen) for n in (5, 9, 3)])
    model.rewards(batch)
    t = batch.tokens.shape[1]
    assert seen and all(s == ((t, 4, 16), (t, 2, 16), True, True) for s in seen)
    seen.clear()
    model.rewards_padded(torch.randint(0, VOCAB, (2, 7)), torch.tensor([7, 4]))
    assert not seen  # padded: torchtune's forward and SDPA
    copied = copy.deepcopy(model)
    assert copied.decoder.layers[0].attn.forward.attn is copied.decoder.layers[0].attn
