"""pytest-benchmark: fused reward head + loss (fwd+bwd) vs the unfused eager path.

Run with ``FASTRM_BENCH_THREADS=1 pytest benchmarks/test_bench_fused_head.py --benchmark-enable`` (the default test
run disables benchmarks; then each case runs once, as a smoke test). The full table with memory
is ``python benchmarks/bench_fused_head.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_head import _clear_grads, make_inputs, step_fn  # noqa: E402

from fastrm.ops import available_backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ["unfused_eager"] + [f"fused_{b}" for b in available_backends(DEVICE)
                               if b != "triton" or DEVICE == "cuda"]
CONFIGS = [(4096, 576, 8), (16384, 2048, 32)]




@pytest.mark.parametrize("t,d,b", CONFIGS, ids=[f"T{t}-D{d}-B{b}" for t, d, b in CONFIGS])
@pytest.mark.parametrize("method", METHODS)
def test_fused_head_fwd_bwd(benchmark, method, t, d, b):
    inputs = make_inputs(t, d, b, torch.float32, DEVICE)
    hidden, head = inputs[0], inputs[1]
    step = step_fn(method, *inputs)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        _clear_grads(hidden, head)
        loss = step()
        sync()
        return loss

    loss = benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    want = step_fn("unfused_eager", *inputs)().float()
    torch.testing.assert_close(loss.float(), want, rtol=1e-4, atol=1e-5)
    untouched = torch.ones(t, dtype=torch.bool, device=DEVICE)
    untouched[inputs[2]] = False
    if method != "unfused_eager":  # the fused backward touches only the scored rows
        _clear_grads(hidden, head)
        step()
        assert bool((hidden.grad[untouched] == 0).all())
