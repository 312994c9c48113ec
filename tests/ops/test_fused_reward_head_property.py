"""Property test: random shapes, index patterns and options, every backend vs float64 reference.

Hypothesis draws ``T, D, N, P``, reward positions *with* repeats, comparisons with repeats (and
even a response compared with itself), optional margin / weights / contrast matrix and loss
options; the fused op must match ``fastrm.functional`` + autograd in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrm import functional as RF
from fastrm.ops import fused_reward_head_loss
from test_fused_reward_head import ALL_BACKENDS, Case, on_device, reference


@st.composite
def cases(draw):
    t = draw(st.integers(1, 24))
    d = draw(st.integers(1, 70))
    n = draw(st.integers(1, 10))
    contrast = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=g) * draw(st.sampled_from([0.3, 1.0, 5.0]))
    weight = torch.randn(d, generator=g) / d ** 0.5
    bias = torch.randn(1, generator=g) if draw(st.booleans()) else None
    positions = torch.randint(0, t, (n,), generator=g)  # repeats allowed
    if contrast:
        bc, br = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    else:
        bc = br = draw(st.integers(1, 12))
    chosen = torch.randint(0, n, (bc,), generator=g)
    rejected = torch.randint(0, n, (br,), generator=g)
    margin = torch.randn(bc, generator=g) if (bc == br and draw(st.booleans())) else None
    cweight = None
    if not contrast and draw(st.booleans()):
        cweight = torch.rand(bc, generator=g)
        cweight[0] += 0.1  # a positive sum
    w = torch.rand(bc, br, generator=g) if contrast else None
    objective = draw(st.sampled_from(RF.OBJECTIVES))
    opts = dict(objective=objective,
                centering_coefficient=draw(st.sampled_from([0.0, 0.01, 0.2])))
    if objective == "bradley_terry":
        opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 0.3]))
    else:
        opts["hinge_margin"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    return Case(hidden, weight, bias, positions, chosen, rejected, margin, cweight, w), opts


def _check(ref_case: Case, opts: dict, backend: str) -> None:
    case = on_device(ref_case, backend)
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    b = None if case.bias is None else case.bias.clone().requires_grad_(True)
    loss, rewards = fused_reward_head_loss(h, w, b, case.positions, case.chosen, case.rejected,
                                           case.margin, case.cweight, contrast_weights=case.contrast,
                                           backend=backend, **opts)
    loss.backward()
    r_loss, r_rewards, r_gh, r_gw, r_gb = reference(ref_case, **opts)
    torch.testing.assert_close(loss.double().cpu(), r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rewards.double().cpu(), r_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double().cpu(), r_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), r_gw, rtol=1e-4, atol=1e-5)
    if b is not None:
        torch.testing.assert_close(b.grad.double().cpu(), r_gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_random_batches_match_reference(backend):
    examples = 12 if backend == "triton" else 40  # the Triton interpreter is slow

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(cases())
    def prop(case_opts):
        case, opts = case_opts
        _check(case, opts, backend)

    prop()
