"""pytest-benchmark: fused reward head + loss (fwd+bwd) vs the unfused eager path.

Run with ``FASTRM_BENCH_THREADS=1 pytest benchmarks/test_bench_fused_head.py --benchmark-enable`` (the default test
run disables benchmarks; then each case runs once, as a smoke test). The full table with memory
is ``python benchmarks/bench_fused_head.py``.

Every method, the unfused baseline included, is checked against a float64 reference written
here from the formula (loss and the gradients of hidden and the head), so a timing never
belongs to a method that computes something else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_head import _clear_grads, make_inputs, step_fn  # noqa: E402

from fastrm.ops import available_backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ["unfused_eager"] + [f"fused_{b}" for b in available_backends(DEVICE)
                               if b != "triton" or DEVICE == "cuda"]
CONFIGS = [(4096, 576, 8), (16384, 2048, 32)]


def reference(hidden, head, positions, chosen, rejected, margin):
    """float64 loss, grad of hidden and grad of the head weight: rewards ``r = h[p] w^T + b`` at
    the scored rows, Bradley-Terry ``mean(softplus(-(r_c - r_r - m)))``."""
    h = hidden.detach().double().requires_grad_()
    w = head.weight.detach().double().requires_grad_()
    r = h[positions] @ w[0] + head.bias.detach().double()
    loss = F.softplus(-(r[chosen] - r[rejected] - margin.double())).mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


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

    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    loss = run()
    want, grad_hidden, grad_weight = reference(*inputs)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), grad_hidden, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head.weight.grad.double(), grad_weight, rtol=1e-4, atol=1e-6)
    untouched = torch.ones(t, dtype=torch.bool, device=DEVICE)
    untouched[inputs[2]] = False
    assert bool((hidden.grad[untouched] == 0).all())  # only the scored rows get a gradient
