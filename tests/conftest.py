"""Test-wide settings.

Triton kernels run on the CPU through Triton's interpreter. ``TRITON_INTERPRET`` is read when a
``@triton.jit`` function is *defined*, so it is set here, before any test module imports
``fastrm.ops``. On a machine with CUDA the real kernels run instead.
"""

import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
