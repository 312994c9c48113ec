"""pytest-benchmark settings shared by the ``benchmarks/test_bench_*.py`` files."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    """``FASTRM_BENCH_THREADS`` pins torch's intra-op threads (1 on a shared machine gives
    stable numbers; OpenMP threads that spin while another job holds a core do not)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FASTRM_BENCH_THREADS", before)))
    yield
    torch.set_num_threads(before)
