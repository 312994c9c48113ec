"""Backend choice on CUDA, checked on a CPU-only machine.

The CUDA branches of :func:`select_backend` read only ``q``'s device, dtype, head dim and the
GPU's compute capability, so a stand-in ``q`` that says it is a CUDA tensor (and a patched
``torch.cuda.get_device_capability``) drives them. flash-attn's import is replaced by a meta
path finder that makes it missing, broken (raising at import like a mismatched CUDA build) or
present (a stand-in whose ``flash_attn_varlen_func`` runs the documented varlen semantics).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import random
import sys
import types
from typing import Optional

import pytest
import torch
from test_varlen import emulate_flash_varlen, qkv
from varlen_layouts import random_layout

from fastrm.attention import (
    ENV_VAR,
    VarlenMetadata,
    backend_unavailable_reason,
    flash_attn_available,
    flash_attn_unavailable_reason,
    select_backend,
    varlen_attention,
)
from fastrm.attention import varlen as V

LOGGER = "fastrm.attention.varlen"


class _FlashFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import flash_attn`` with ``error`` raised at import, or ``module``."""

    def __init__(self, error: Optional[BaseException] = None,
                 module: Optional[types.ModuleType] = None) -> None:
        self.error, self.module = error, module

    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if self.error is not None:
            raise self.error
        module.__dict__.update(self.module.__dict__)


@pytest.fixture
def flash(monkeypatch):
    """``flash(error=...)`` / ``flash(module=...)`` / ``flash()`` (not installed): installs the
    import behaviour and clears fastrm's caches and once-only log memory around the test."""
    monkeypatch.delenv(ENV_VAR, raising=False)

    def install(error=None, module=None, missing=False):
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        if missing:
            monkeypatch.setitem(sys.modules, "flash_attn", None)  # import -> ModuleNotFoundError
        else:
            monkeypatch.setattr(sys, "meta_path", [_FlashFinder(error, module)] + sys.meta_path)
        V._flash_attn_import.cache_clear()
        V._flash_attn_takes_deterministic.cache_clear()

    V._LOGGED.clear()
    original = sys.modules.get("flash_attn")
    yield install
    if original is None:
        sys.modules.pop("flash_attn", None)  # the stand-in imported during the test
    else:
        sys.modules["flash_attn"] = original
    V._flash_attn_import.cache_clear()
    V._flash_attn_takes_deterministic.cache_clear()
    V._LOGGED.clear()


@pytest.fixture
def gpu(monkeypatch):
    """A compute capability for the stand-in CUDA device (default sm90)."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    V._capability.cache_clear()
    yield cap
    V._capability.cache_clear()


def cuda_q(dtype=torch.bfloat16, head_dim=64, requires_grad=True):
    """A stand-in for a CUDA query tensor ``[T, H, D]`` (what select_backend reads)."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype,
                                 shape=(7, 4, head_dim), requires_grad=requires_grad)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _fake_flash_module(record: list, with_deterministic: bool = True) -> types.ModuleType:
    if with_deterministic:
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False, deterministic=False):
            record.append({"deterministic": deterministic, "dropout_p": dropout_p})
            return emulate_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal)
    else:
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False):
            record.append({"dropout_p": dropout_p})
            return emulate_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal)
    mod = types.ModuleType("flash_attn")
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


# ------------------------------------------------------------------------- flash-attn import
def test_missing_flash_attn_is_silent(flash, gpu, caplog):
    flash(missing=True)
    assert not flash_attn_available()
    assert "not installed" in flash_attn_unavailable_reason()
    assert select_backend(cuda_q()) == "torch_varlen"
    assert _warnings(caplog) == []


@pytest.mark.parametrize("error", [
    OSError("libcudart.so.11.0: cannot open shared object file: No such file or directory"),
    RuntimeError("CUDA driver version is insufficient"),
    ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"),
    ModuleNotFoundError("No module named 'flash_attn_2_cuda'", name="flash_attn_2_cuda"),
], ids=["OSError", "RuntimeError", "undefined-symbol", "missing-extension"])
def test_broken_flash_attn_is_logged_once_and_falls_back(flash, gpu, caplog, error):
    flash(error=error)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        assert not flash_attn_available()
        assert select_backend(cuda_q()) == "torch_varlen"
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert type(error).__name__ in msgs[0] and str(error) in msgs[0]
    assert "does not import" in flash_attn_unavailable_reason()
    with pytest.raises(ValueError, match=r"'flash_attn'.*does not import.*" + type(error).__name__):
        select_backend(cuda_q(), "flash_attn")


def test_working_flash_attn_is_the_cuda_default(flash, gpu):
    flash(module=_fake_flash_module([]))
    assert flash_attn_available() and flash_attn_unavailable_reason() == ""
    assert select_backend(cuda_q()) == "flash_attn"
    assert select_backend(cuda_q(torch.float16)) == "flash_attn"
    # flash-attn has dropout: the automatic choice keeps it
    assert select_backend(cuda_q(), dropout_p=0.1) == "flash_attn"


# ------------------------------------------------------------------- dtype / dropout / GPU
@pytest.mark.parametrize("name", ["flash_attn", "torch_varlen"])
def test_explicit_flash_backend_with_fp32_is_fastrms_error(flash, gpu, name):
    flash(module=_fake_flash_module([]))
    with pytest.raises(ValueError, match=rf"'{name}'.*fp16/bf16.*torch.float32.*bf16.*sdpa_segments"):
        select_backend(cuda_q(torch.float32), name)


def test_explicit_choice_from_the_environment_names_it(flash, gpu, monkeypatch):
    flash(missing=True)
    monkeypatch.setenv(ENV_VAR, "torch_varlen")
    with pytest.raises(ValueError, match=r"\$FASTRM_ATTENTION_BACKEND.*torch.float32"):
        select_backend(cuda_q(torch.float32))


def test_automatic_fp32_on_cuda_falls_back_with_one_log_line(flash, gpu, caplog):
    flash(missing=True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        assert select_backend(cuda_q(torch.float32)) == "sdpa_segments"
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "sdpa_segments" in msgs[0] and "torch.float32" in msgs[0], msgs
    # the warning says how to get the fast path
    for fix in ("bf16", "`dtype: auto`", "pip install flash-attn", "torch_varlen"):
        assert fix in msgs[0], (fix, msgs[0])


@pytest.mark.parametrize("name", ["sdpa_segments", "reference"])
def test_explicit_slow_backend_on_cuda_warns_once_with_the_fix(flash, gpu, caplog, name):
    flash(missing=True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        assert select_backend(cuda_q(), name) == name
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert f"slow {name} backend (chosen by attention_backend)" in msgs[0]
    assert "bf16" in msgs[0] and "flash-attn" in msgs[0] and "torch_varlen" in msgs[0]


def test_fast_or_cpu_choices_do_not_warn(flash, gpu, caplog):
    flash(module=_fake_flash_module([]))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert select_backend(cuda_q()) == "flash_attn"
    assert select_backend(cuda_q(), "torch_varlen") == "torch_varlen"
    cpu = torch.zeros(7, 4, 64)
    assert select_backend(cpu, "sdpa_segments") == "sdpa_segments"
    assert select_backend(cpu) == "sdpa_segments"
    assert _warnings(caplog) == []


def test_torch_varlen_dropout(flash, gpu, caplog):
    flash(missing=True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(ValueError, match="'torch_varlen'.*no attention dropout"):
        select_backend(cuda_q(), "torch_varlen", dropout_p=0.1)
    assert select_backend(cuda_q(), dropout_p=0.1) == "sdpa_segments"
    assert select_backend(cuda_q(), dropout_p=0.0) == "torch_varlen"
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "dropout" in msgs[0]


def test_head_dim_and_gpu_generation(flash, gpu):
    flash(module=_fake_flash_module([]))
    assert "multiple of 8" in backend_unavailable_reason("torch_varlen", cuda_q(head_dim=36))
    assert backend_unavailable_reason("flash_attn", cuda_q(head_dim=36)) == ""  # it pads
    assert "up to 256" in backend_unavailable_reason("flash_attn", cuda_q(head_dim=320))
    gpu["value"] = (7, 5)
    V._capability.cache_clear()
    for name in ("flash_attn", "torch_varlen"):
        assert "sm75" in backend_unavailable_reason(name, cuda_q())
    assert select_backend(cuda_q()) == "sdpa_segments"


def test_cpu_refusals_are_value_errors(flash):
    flash(missing=True)
    q = torch.zeros(5, 2, 8)
    with pytest.raises(ValueError, match="'flex'.*dropout"):
        select_backend(q, "flex", dropout_p=0.1)
    with pytest.raises(ValueError, match="'reference'.*dropout"):
        select_backend(q, "reference", dropout_p=0.1)
    assert select_backend(q, "flex", needs_grad=False) == "flex"
    with pytest.raises(ValueError, match="'flex'.*no backward on CPU"):
        select_backend(q, "flex", needs_grad=True)


# --------------------------------------------------------------- flash-attn determinism flag
@pytest.mark.parametrize("det", [False, True])
def test_flash_attn_gets_deterministic_from_torch(flash, det):
    record: list = []
    flash(module=_fake_flash_module(record))
    cu, pre = random_layout(random.Random(4), with_prefix=True)
    q, k, v = qkv(int(cu[-1]), 4, 2, 8, torch.float64, 0)
    meta = VarlenMetadata.build(cu, pre)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        # the implementation itself (the device check of select_backend is CUDA's)
        out = V._flash_attn(q, k, v, meta, 0.0, None)
    finally:
        torch.use_deterministic_algorithms(before)
    assert record == [{"deterministic": det, "dropout_p": 0.0}]
    ref = varlen_attention(q, k, v, metadata=meta, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_old_flash_attn_without_deterministic_logs_once(flash, caplog):
    record: list = []
    flash(module=_fake_flash_module(record, with_deterministic=False))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    q, k, v = qkv(5, 2, 2, 8, torch.float64, 0)
    meta = VarlenMetadata.build(cu)
    V._flash_attn(q, k, v, meta, 0.0, None)  # not deterministic: no argument, no log
    assert _warnings(caplog) == []
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        V._flash_attn(q, k, v, meta, 0.0, None)
        V._flash_attn(q, k, v, meta, 0.0, None)
    finally:
        torch.use_deterministic_algorithms(before)
    assert len(record) == 3 and all("deterministic" not in r for r in record)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "flash-attn < 2.4" in msgs[0]
