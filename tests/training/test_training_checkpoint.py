"""Checkpoint files: one head-file format (``head.weight``, shape-checked on load; legacy
un-prefixed keys and zero biases accepted, an HF ``score.weight`` too), RNG states per rank with the CUDA generator, atomic
writes."""

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastrm.models import tiny_llama3_reward_model
from fastrm.models.reward_model import load_head, read_head, write_head
from fastrm.training import checkpoint as ckpt_io

D = 32


def tiny():
    return tiny_llama3_reward_model(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                    embed_dim=D, max_seq_len=64)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_head_file_round_trip(tmp_path, suffix):
    w = torch.randn(1, D)
    path = tmp_path / f"head{suffix}"
    write_head(path, w)
    model = tiny()
    load_head(model, str(path))
    assert torch.equal(model.head.weight.detach(), w) and model.head.bias is None
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place
    with pytest.raises(ValueError, match="non-zero bias"):
        write_head(tmp_path / "b.safetensors", w, torch.tensor([0.5]))


def test_head_files_with_a_bias_load_only_when_it_is_zero(tmp_path):
    # files written before the head. prefix (the recipe and decompose used bare keys), with the
    # bias fastrm heads had before they became bias-free
    w = torch.randn(1, D)
    save_file({"weight": w, "bias": torch.zeros(1)}, str(tmp_path / "legacy.safetensors"))
    assert set(got := read_head(tmp_path / "legacy.safetensors", D)) == {"weight"}
    assert torch.equal(got["weight"], w)
    torch.save({"head.weight": w, "head.bias": torch.tensor([0.3])}, tmp_path / "biased.pt")
    with pytest.raises(ValueError, match=r"non-zero bias \(0.3\): fastrm reward heads have no bias"):
        read_head(tmp_path / "biased.pt", D)
    save_file({"weight": torch.randn(1, D + 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"head.weight .* has shape \(1, 33\), expected \(1, 32\)"):
        read_head(tmp_path / "wide.safetensors", D)
    save_file({"weight": torch.randn(1, D), "bias": torch.randn(2)}, str(tmp_path / "bias.safetensors"))
    with pytest.raises(ValueError, match=r"head.bias .* has shape \(2,\), expected \(1,\)"):
        read_head(tmp_path / "bias.safetensors", D)
    # an HF reward model's score.weight is a head too (continue training an existing RM)
    save_file({"score.weight": w, "model.norm.weight": torch.ones(D)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(read_head(tmp_path, D)["weight"], w)


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip_on_cpu():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = ckpt_io.rng_state(torch.device("cpu"))
    want = _draw()
    _draw()
    ckpt_io.set_rng_state(state, torch.device("cpu"))
    assert _draw() == want
    assert "cuda" not in state


def test_rng_state_saves_and_restores_the_cuda_generator(monkeypatch):
    """On a CUDA run the rank's CUDA generator is saved with the rest and restored on resume
    (the CUDA calls are recorded here: this machine may have no GPU)."""
    device = torch.device("cuda", 1)
    cuda_state = torch.randint(0, 255, (16,), dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d="cuda": cuda_state if d == device else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d="cuda": restored.append((s, d)))
    saved = ckpt_io.rng_state(device)
    assert torch.equal(saved["cuda"], cuda_state)
    ckpt_io.set_rng_state(saved, device)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == device
    # a CPU checkpoint resumed on CUDA (or the reverse) cannot be exact: say so
    cpu_state = ckpt_io.rng_state(torch.device("cpu"))
    with pytest.warns(UserWarning, match="lacks a CUDA generator"):
        ckpt_io.set_rng_state(cpu_state, device)
    with pytest.warns(UserWarning, match="has a CUDA generator"):
        ckpt_io.set_rng_state(saved, torch.device("cpu"))


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    from fastrm._io import atomic_path

    target = tmp_path / "state.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
