"""Checkpoint files: one head-file format (``head.weight`` / ``head.bias``, shape-checked on
load, legacy un-prefixed keys accepted), RNG states per rank with the CUDA generator, atomic
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
    w, b = torch.randn(1, D), torch.randn(1)
    path = tmp_path / f"head{suffix}"
    write_head(path, w, b)
    model = tiny()
    load_head(model, str(path))
    assert torch.equal(model.head.weight.detach(), w) and torch.equal(model.head.bias.detach(), b)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


def test_recipe_head_file_and_legacy_keys_load_with_the_shape_check(tmp_path):
    model_sd = {"head.weight": torch.randn(1, D), "head.bias": torch.randn(1),
                "decoder.norm.scale": torch.ones(D)}
    ckpt_io.save_head(tmp_path, model_sd)
    got = read_head(tmp_path / ckpt_io.HEAD_FILE, D)
    assert torch.equal(got["weight"], model_sd["head.weight"])
    assert torch.equal(got["bias"], model_sd["head.bias"])
    # files written before the head. prefix (the recipe and decompose used bare keys)
    save_file({"weight": torch.randn(1, D), "bias": torch.randn(1)}, str(tmp_path / "legacy.safetensors"))
    assert set(read_head(tmp_path / "legacy.safetensors", D)) == {"weight", "bias"}
    save_file({"weight": torch.randn(1, D + 1), "bias": torch.randn(1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"head.weight .* has shape \(1, 33\), expected \(1, 32\)"):
        read_head(tmp_path / "wide.safetensors", D)
    save_file({"weight": torch.randn(1, D), "bias": torch.randn(2)}, str(tmp_path / "bias.safetensors"))
    with pytest.raises(ValueError, match=r"head.bias .* has shape \(2,\), expected \(1,\)"):
        read_head(tmp_path / "bias.safetensors", D)


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip_on_cpu(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ckpt_io.save_rng_state(tmp_path, rank=1, device=torch.device("cpu"))
    want = _draw()
    _draw()
    ckpt_io.load_rng_state(tmp_path, rank=1, device=torch.device("cpu"))
    assert _draw() == want
    assert "cuda" not in torch.load(tmp_path / "rng_rank1.pt", weights_only=False)


def test_rng_state_saves_and_restores_the_cuda_generator(tmp_path, monkeypatch):
    """On a CUDA run the rank's CUDA generator is saved with the rest and restored on resume
    (the CUDA calls are recorded here: this machine may have no GPU)."""
    device = torch.device("cuda", 1)
    cuda_state = torch.randint(0, 255, (16,), dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d="cuda": cuda_state if d == device else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d="cuda": restored.append((s, d)))
    ckpt_io.save_rng_state(tmp_path, rank=1, device=device)
    saved = torch.load(tmp_path / "rng_rank1.pt", weights_only=False)
    assert torch.equal(saved["cuda"], cuda_state)
    ckpt_io.load_rng_state(tmp_path, rank=1, device=device)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == device
    # a CPU checkpoint resumed on CUDA (or the reverse) cannot be exact: say so
    ckpt_io.save_rng_state(tmp_path, rank=0, device=torch.device("cpu"))
    with pytest.warns(UserWarning, match="lacks a CUDA generator"):
        ckpt_io.load_rng_state(tmp_path, rank=0, device=device)
    with pytest.warns(UserWarning, match="has a CUDA generator"):
        ckpt_io.load_rng_state(tmp_path, rank=1, device=torch.device("cpu"))


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    from fastrm._io import atomic_path

    target = tmp_path / "state.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
