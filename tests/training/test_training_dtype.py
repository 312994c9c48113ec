"""The dtype rule (``fastrm.training.dtype``): ``auto`` per device with the capability probes
replaced, named dtypes, errors; TF32 for fp32 on CUDA (a stand-in CUDA device: only the
global flags are read and written); the shipped configs ask for ``auto``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.recipes import reward_model as recipe_module
from fastrm.training import dtype as D

CONFIGS = Path(__file__).resolve().parents[2] / "fastrm" / "recipes" / "configs"


@pytest.fixture
def cpu_probes(monkeypatch):
    """``cpu_probes(avx512_bf16=..., amx=...)`` replaces torch's CPU capability probes."""
    def install(avx512_bf16: bool, amx: bool):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    return install


@pytest.mark.parametrize("avx512_bf16,amx,want", [
    (False, False, torch.float32),   # AVX2-only: bf16 matmul is emulated
    (True, False, torch.bfloat16),   # AVX-512 BF16 (e.g. Zen 4/5, Cooper Lake)
    (False, True, torch.bfloat16),   # AMX tiles (Sapphire Rapids and newer)
    (True, True, torch.bfloat16),
])
def test_auto_on_cpu_follows_the_bf16_probes(cpu_probes, avx512_bf16, amx, want):
    cpu_probes(avx512_bf16, amx)
    assert D.cpu_has_fast_bf16() is (want == torch.bfloat16)
    assert D.resolve_dtype("auto", "cpu") == want
    # a named dtype is taken as written whatever the CPU
    assert D.resolve_dtype("fp32", "cpu") == torch.float32
    assert D.resolve_dtype("bf16", "cpu") == torch.bfloat16


def test_auto_without_probes_is_fp32(monkeypatch):
    """An older torch without the probes: assume no fast bf16."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert D.cpu_has_fast_bf16() is False
    assert D.resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("bf16_gpu,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, cpu_probes, bf16_gpu, want):
    cpu_probes(False, False)  # the CPU's answer must not leak into the GPU's
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert D.resolve_dtype("auto", "cuda") == want
    assert D.resolve_dtype("auto", torch.device("cuda", 1)) == want
    if not bf16_gpu:
        with pytest.raises(ValueError, match="no bf16 support.*fp32 or auto"):
            D.resolve_dtype("bf16", "cuda")


@pytest.mark.parametrize("name,want", [("fp32", torch.float32), ("float32", torch.float32),
                                       ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                       ("fp16", torch.float16), ("float16", torch.float16)])
def test_named_dtypes(name, want):
    assert D.resolve_dtype(name, "cpu") == want


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"dtype='fp8' is not known; choose auto or one of fp32"):
        D.resolve_dtype("fp8", "cpu")


@pytest.fixture
def tf32_flags():
    """Restores the global matmul / cuDNN precision flags after the test."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_tf32_for_fp32_on_cuda(tf32_flags, caplog):
    caplog.set_level(logging.INFO, logger=D.__name__)
    assert D.enable_tf32("cuda", torch.float32) is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 is True
    assert any("TF32" in r.getMessage() and "NVIDIA_TF32_OVERRIDE=0" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("device,dtype", [("cuda", torch.bfloat16), ("cuda", torch.float16),
                                          ("cpu", torch.float32), ("cpu", torch.bfloat16)])
def test_tf32_untouched_elsewhere(tf32_flags, device, dtype):
    assert D.enable_tf32(device, dtype) is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False


def test_tf32_keeps_a_lower_precision_the_user_set(tf32_flags):
    torch.set_float32_matmul_precision("medium")
    assert D.enable_tf32(torch.device("cuda", 0), torch.float32)
    assert torch.get_float32_matmul_precision() == "medium"


def test_recipe_resolves_the_dtype_and_sets_tf32_for_it(monkeypatch, tmp_path):
    """The recipe hands its device and resolved dtype to enable_tf32 (a spy; the run is CPU)."""
    calls = []
    monkeypatch.setattr(recipe_module, "enable_tf32", lambda dev, dt: calls.append((dev, dt)))
    cfg = OmegaConf.load(CONFIGS / "tiny_llama3_synthetic.yaml")
    cfg.output_dir = str(tmp_path)
    cfg.dtype = "bf16"
    recipe = recipe_module.RewardModelRecipe(cfg)
    assert calls == [(torch.device("cpu"), torch.bfloat16)] and recipe.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["smollm2_135m_synthetic", "smollm2_135m_qa_feedback",
                                  "decompose_qa_feedback"])
def test_shipped_configs_ask_for_auto(name):
    assert OmegaConf.load(CONFIGS / f"{name}.yaml").dtype == "auto"
