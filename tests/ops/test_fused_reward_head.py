"""Every backend of ``fastrm.ops.fused_reward_head_loss`` against a float64 autograd reference.

The reference gathers ``hidden`` rows in float64, computes rewards, and evaluates
``fastrm.functional.comparison_loss`` / ``contrast_loss``; torch autograd gives the gradients of
hidden, weight and bias. Inputs are fresh random tensors (seeded per case); tolerances are paired
with the input dtype. Triton runs through its interpreter on CPU (see conftest.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from fastrm import _native
from fastrm import functional as RF
from fastrm.ops import BACKENDS, FusedRewardHeadLoss, fused_reward_head_loss
from fastrm.ops import head_loss
from fastrm.ops import head_loss_triton as tri


def _backend_params():
    params = []
    for b in BACKENDS:
        reason = head_loss.backend_unavailable_reason(b, torch.device("cpu"))
        if b == "triton" and tri.triton is None:
            params.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)))
        elif b == "native" and not _native.available():
            params.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)))
        else:
            # triton importable but not interpreted on CPU is a set-up error: let it fail loudly
            params.append(b)
    return params


ALL_BACKENDS = _backend_params()
TOL = {  # (rtol, atol) for loss/rewards and for gradients, per input dtype
    torch.float32: dict(val=(1e-5, 1e-5), grad=(1e-4, 1e-6)),
    torch.bfloat16: dict(val=(1e-4, 1e-4), grad=(1.6e-2, 1e-4)),
    torch.float16: dict(val=(1e-4, 1e-4), grad=(2e-3, 1e-5)),
}


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    positions: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: Optional[torch.Tensor] = None
    cweight: Optional[torch.Tensor] = None
    contrast: Optional[torch.Tensor] = None


def backend_device(backend: str) -> torch.device:
    """Triton runs on the GPU where there is one (the interpreter is on only without CUDA)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def on_device(case: Case, backend: str) -> Case:
    dev = backend_device(backend)
    return Case(**{k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                   for k, v in case.__dict__.items()})


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_case(t, d, n, p, dtype, key, *, weight_shape="flat", weight_dtype=None, bias="vec",
              margin=False, cweight=False, grouped=False, repeat_position=False, scale=1.0) -> Case:
    """Random packed batch: ``n`` responses at distinct rows of ``hidden [t, d]``; plain pairs
    ``(i, i + n/2)`` or, with ``grouped``, ``p`` random pairs of distinct responses (a response
    in several comparisons); ``repeat_position`` lists one row twice in ``reward_positions``."""
    g = _gen(t, d, n, p, str(dtype), key)
    hidden = (torch.randn(t, d, generator=g) * scale).to(dtype)
    w = torch.randn(d, generator=g) / d ** 0.5
    weight = (w if weight_shape == "flat" else w[None, :]).to(weight_dtype or dtype)
    b = {"vec": torch.randn(1, generator=g), "scalar": torch.randn((), generator=g), None: None}[bias]
    positions = torch.randperm(t, generator=g)[:n]
    if repeat_position:
        positions[n - 1] = positions[0]  # one row scored twice: its gradient must accumulate
    if grouped:
        chosen = torch.randint(0, n, (p,), generator=g)
        rejected = (chosen + torch.randint(1, n, (p,), generator=g)) % n
    else:
        assert n == 2 * p
        chosen = torch.arange(p)
        rejected = torch.arange(p) + p
    return Case(
        hidden, weight, b, positions, chosen, rejected,
        margin=torch.rand(p, generator=g) if margin else None,
        cweight=(torch.rand(p, generator=g) + 0.05) if cweight else None,
    )


def reference(case: Case, **opts):
    """float64 loss, rewards and gradients from fastrm.functional + autograd."""
    h = case.hidden.detach().double().requires_grad_(True)
    w = case.weight.detach().double().requires_grad_(True)
    b = None if case.bias is None else case.bias.detach().double().requires_grad_(True)
    rewards = h[case.positions] @ w.reshape(-1)
    if b is not None:
        rewards = rewards + b.reshape(())
    m = None if case.margin is None else case.margin.double()
    if case.contrast is None:
        cw = None if case.cweight is None else case.cweight.double()
        loss = RF.comparison_loss(rewards, case.chosen, case.rejected, m, cw, **opts)
    else:
        loss = RF.contrast_loss(rewards[case.chosen], rewards[case.rejected], case.contrast.double(),
                                m, **opts)
    loss.backward()
    return loss.detach(), rewards.detach(), h.grad, w.grad, None if b is None else b.grad


def run(case: Case, backend: str, grad_scale: float = 1.0, **opts):
    """Fused op on ``backend``'s device; returns CPU ``(loss, rewards, grad_h, grad_w, grad_b)``."""
    case = on_device(case, backend)
    h = case.hidden.detach().clone().requires_grad_(True)
    w = case.weight.detach().clone().requires_grad_(True)
    b = None if case.bias is None else case.bias.detach().clone().requires_grad_(True)
    loss, rewards = fused_reward_head_loss(h, w, b, case.positions, case.chosen, case.rejected,
                                           case.margin, case.cweight, contrast_weights=case.contrast,
                                           backend=backend, **opts)
    # poison the allocator: a grad buffer taken from torch.empty would likely reuse this NaN block
    poison = torch.full_like(h, float("nan"))
    del poison
    (loss * grad_scale).backward()
    out = (loss, rewards, h.grad, w.grad, None if b is None else b.grad)
    return tuple(None if x is None else x.cpu() for x in out)


def check(case: Case, backend: str, grad_scale: float = 1.0, **opts):
    dtype = case.hidden.dtype
    tol = TOL[dtype]
    loss, rewards, gh, gw, gb = run(case, backend, grad_scale, **opts)
    r_loss, r_rewards, r_gh, r_gw, r_gb = reference(case, **opts)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    assert gh.dtype == dtype and gh.shape == case.hidden.shape
    assert gw.dtype == case.weight.dtype and gw.shape == case.weight.shape
    rt, at = tol["val"]
    torch.testing.assert_close(loss.double(), r_loss, rtol=rt, atol=at)
    torch.testing.assert_close(rewards.double(), r_rewards, rtol=rt, atol=at)
    gt_rt, gt_at = tol["grad"]
    if case.weight.dtype == torch.float32:
        w_rt, w_at = TOL[torch.float32]["grad"] if dtype != torch.float32 else (gt_rt, gt_at)
    else:
        w_rt, w_at = gt_rt, gt_at
    # weight grads: fp32 reduction of products of low-precision inputs; compare in that light
    torch.testing.assert_close(gw.double(), r_gw * grad_scale, rtol=max(w_rt, 1e-4), atol=max(w_at, 1e-5))
    torch.testing.assert_close(gh.double(), r_gh * grad_scale, rtol=gt_rt, atol=gt_at)
    untouched = torch.ones(case.hidden.shape[0], dtype=torch.bool)
    untouched[case.positions] = False
    assert bool((gh[untouched] == 0).all()), "grad_hidden must be exactly 0 outside reward_positions"
    assert bool(torch.isfinite(gh).all())
    if case.bias is None:
        assert gb is None
    else:
        assert gb.shape == case.bias.shape and gb.dtype == case.bias.dtype
        # a bf16 / fp16 bias gets its fp32 gradient rounded to its dtype
        b_rt, b_at = (1e-4, 1e-5) if case.bias.dtype == torch.float32 else TOL[case.bias.dtype]["grad"]
        torch.testing.assert_close(gb.double(), r_gb * grad_scale, rtol=b_rt, atol=b_at)


PAIR_CASES = {
    # name: (t, d, n, p, make_case kwargs, loss options)
    "bt_plain_d67": (40, 67, 8, 4, {}, {}),
    "bt_margin_center_d130": (33, 130, 6, 3, dict(margin=True), dict(centering_coefficient=0.05)),
    "bt_smoothing_weights": (24, 67, 10, 5, dict(cweight=True, margin=True), dict(label_smoothing=0.1)),
    "hinge_margin_center": (24, 130, 8, 4, dict(margin=True, bias=None),
                            dict(objective="hinge", hinge_margin=0.5, centering_coefficient=0.02)),
    "hinge_weights": (16, 67, 6, 3, dict(cweight=True, weight_shape="row"),
                      dict(objective="hinge", hinge_margin=1.5)),
    "b1": (9, 67, 2, 1, dict(bias="scalar"), {}),
    "b1_margin_center": (5, 130, 2, 1, dict(margin=True), dict(centering_coefficient=0.1)),
    "grouped": (30, 67, 5, 9, dict(grouped=True, margin=True), dict(centering_coefficient=0.03)),
    "grouped_repeat_position_weights": (30, 130, 6, 11, dict(grouped=True, repeat_position=True,
                                                             cweight=True), dict(label_smoothing=0.2)),
    # each response in ~27 comparisons: segments longer than one reduction block
    "grouped_long_segments": (12, 67, 3, 40, dict(grouped=True, margin=True), dict(centering_coefficient=0.01)),
    # several blocks in every kernel grid (U > 16 rows, P > 1024 comparisons): partial sums
    "many_comparisons": (80, 67, 50, 1100, dict(grouped=True, cweight=True), dict(centering_coefficient=0.01)),
    "large_rewards": (20, 67, 8, 4, dict(scale=40.0), dict(label_smoothing=0.05)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case_name", list(PAIR_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pair_mode_matches_reference(backend, case_name, dtype):
    t, d, n, p, kw, opts = PAIR_CASES[case_name]
    check(make_case(t, d, n, p, dtype, case_name, **kw), backend, **opts)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp16_and_fp32_weight_with_bf16_hidden(backend):
    check(make_case(20, 67, 6, 3, torch.float16, "fp16", margin=True), backend)
    check(make_case(20, 130, 6, 3, torch.bfloat16, "w32", weight_dtype=torch.float32), backend,
          centering_coefficient=0.05)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_grad_output_is_scaled(backend):
    check(make_case(20, 67, 8, 4, torch.float32, "scale", margin=True), backend, grad_scale=-2.75,
          centering_coefficient=0.01)


CONTRAST_CASES = {
    "square_bt": (4, 4, dict(margin=True), {}),
    "square_center_smooth": (5, 5, dict(margin=True), dict(centering_coefficient=0.05, label_smoothing=0.1)),
    "unpaired_pools": (3, 7, {}, {}),
    "hinge": (6, 6, dict(margin=True), dict(objective="hinge", hinge_margin=0.7)),
    "b1": (1, 1, dict(margin=True), {}),
    "wide_repeated": (3, 70, dict(repeat=True), dict(centering_coefficient=0.02)),  # > 1 column block
    "tall": (40, 5, {}, dict(label_smoothing=0.05)),  # > 1 row block: column partials reduced
}


def make_contrast_case(bc, br, dtype, key, *, margin=False, repeat=False) -> Case:
    """``bc`` chosen and ``br`` rejected responses; random ``W`` (rows of a softmax, as RPO);
    ``repeat`` makes rejected responses reuse chosen ones and one position appear twice."""
    g = _gen(bc, br, str(dtype), key, "contrast")
    n = bc + br
    t, d = n + 7, 67
    case = make_case(t, d, n, 1, dtype, key + "base", grouped=True, repeat_position=repeat)
    case.chosen = torch.arange(bc)
    case.rejected = torch.arange(bc, n)
    if repeat:
        case.rejected[::3] = torch.randint(0, bc, (case.rejected[::3].shape[0],), generator=g)
    case.margin = torch.rand(bc, generator=g) if margin else None
    case.cweight = None
    case.contrast = torch.softmax(torch.randn(bc, br, generator=g) * 2, dim=-1)
    return case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case_name", list(CONTRAST_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_contrast_mode_matches_reference(backend, case_name, dtype):
    bc, br, kw, opts = CONTRAST_CASES[case_name]
    check(make_contrast_case(bc, br, dtype, case_name, **kw), backend, **opts)


def assert_matches_reference(got: tuple, want: tuple, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``run``'s fp32 ``(loss, rewards, grad_h, grad_w, grad_b)`` against ``reference``'s float64."""
    for name, x, y in zip(("loss", "rewards", "grad hidden", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("objective", RF.OBJECTIVES)
def test_contrast_identity_equals_pair_mode(backend, objective):
    """W = I turns the cross-prompt loss into the plain pair loss: the contrast kernels with
    W = I give the float64 *pair-mode* reference's loss and gradients."""
    opts = dict(objective=objective, centering_coefficient=0.03)
    if objective == "bradley_terry":
        opts["label_smoothing"] = 0.1
    pair = make_case(30, 130, 10, 5, torch.float32, "eye" + objective, margin=True)
    contrast = Case(**{**pair.__dict__, "contrast": torch.eye(5)})
    assert_matches_reference(run(contrast, backend, **opts), reference(pair, **opts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deterministic_and_independent_of_thread_count(backend):
    case = make_case(40, 130, 8, 12, torch.float32, "det", grouped=True, repeat_position=True,
                     margin=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run(case, backend, centering_coefficient=0.01)
        torch.set_num_threads(max(2, threads))
        b = run(case, backend, centering_coefficient=0.01)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_matches_reference(a, reference(case, centering_coefficient=0.01), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_frozen_hidden_trains_only_the_head(backend):
    """hidden without grad (frozen backbone): weight and bias still get exact gradients."""
    ref_case = make_case(20, 67, 6, 3, torch.float32, "frozen", margin=True)
    case = on_device(ref_case, backend)
    w = case.weight.clone().requires_grad_(True)
    b = case.bias.clone().requires_grad_(True)
    loss, _ = fused_reward_head_loss(case.hidden, w, b, case.positions, case.chosen, case.rejected,
                                     case.margin, backend=backend)
    loss.backward()
    _, _, _, r_gw, r_gb = reference(ref_case)
    torch.testing.assert_close(w.grad.double().cpu(), r_gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double().cpu(), r_gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_hidden_rows(backend):
    """A strided view of hidden (e.g. a slice of a wider buffer) reads and writes the right rows."""
    case = make_case(20, 67, 6, 3, torch.float32, "strided", margin=True)
    wide = torch.randn(20, 100)
    wide[:, 10:77] = case.hidden
    case.hidden = wide[:, 10:77]
    assert not case.hidden.is_contiguous()
    check(case, backend, centering_coefficient=0.01)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_option_at_once(backend):
    """Grouped comparisons, a repeated position, margins, weights, smoothing and centering in one
    batch, against the float64 reference at fp32 tolerance."""
    case = make_case(50, 130, 12, 15, torch.float32, "agree", grouped=True, repeat_position=True,
                     margin=True, cweight=True)
    opts = dict(label_smoothing=0.05, centering_coefficient=0.02)
    assert_matches_reference(run(case, backend, **opts), reference(case, **opts), rtol=1e-5, atol=1e-6)


def test_module_wraps_function_and_instantiates_from_config():
    case = make_case(20, 67, 6, 3, torch.float32, "module", margin=True)
    cfg = OmegaConf.create({"_component_": "fastrm.ops.FusedRewardHeadLoss", "objective": "hinge",
                            "hinge_margin": 0.5, "centering_coefficient": 0.01, "backend": "torch"})
    module = config.instantiate(cfg)
    assert isinstance(module, FusedRewardHeadLoss)
    assert "hinge" in repr(module)
    got, _ = module(case.hidden, case.weight, case.bias, case.positions, case.chosen,
                    case.rejected, case.margin)
    want = reference(case, objective="hinge", hinge_margin=0.5, centering_coefficient=0.01)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="objective"):
        FusedRewardHeadLoss(objective="dpo")
    with pytest.raises(ValueError, match="backend"):
        FusedRewardHeadLoss(backend="cuda")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp32_accumulation_under_bf16_autocast(backend):
    """CPU bf16 autocast must not turn the reward dot products into bf16 matmuls."""
    case = make_case(20, 130, 6, 3, torch.float32, "autocast", margin=True, scale=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, rewards, gh, gw, gb = run(case, backend, centering_coefficient=0.01)
    r_loss, r_rewards, r_gh, r_gw, _ = reference(case, centering_coefficient=0.01)
    torch.testing.assert_close(rewards.double(), r_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), r_gh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_is_refused(backend):
    """The backward is once-differentiable: a second derivative fails loudly, never silently."""
    case = on_device(make_case(12, 67, 4, 2, torch.float32, "dbl"), backend)
    h = case.hidden.clone().requires_grad_(True)
    loss, _ = fused_reward_head_loss(h, case.weight, case.bias, case.positions, case.chosen,
                                     case.rejected, backend=backend)
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        g.sum().backward()
