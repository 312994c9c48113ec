"""Input validation and backend choice of ``fastrm.ops.fused_reward_head_loss``."""

from __future__ import annotations

import pytest
import torch

from fastrm import _native
from fastrm import functional as RF
from fastrm.ops import BACKENDS, available_backends, fused_reward_head_loss, resolve_backend
from fastrm.ops import head_loss
from fastrm.ops import head_loss_triton as tri
from fastrm.ops import head_loss_native

T, D, N, P = 12, 10, 6, 3


def good_args() -> dict:
    g = torch.Generator().manual_seed(7)
    return dict(
        hidden=torch.randn(T, D, generator=g),
        weight=torch.randn(D, generator=g),
        bias=torch.randn(1, generator=g),
        reward_positions=torch.tensor([0, 2, 4, 6, 8, 10]),
        chosen_index=torch.tensor([0, 1, 2]),
        rejected_index=torch.tensor([3, 4, 5]),
        margin=torch.rand(P, generator=g),
        comparison_weight=torch.rand(P, generator=g) + 0.1,
    )


def call(**changes):
    args = good_args()
    args.update(changes)
    args.setdefault("backend", "torch")
    return fused_reward_head_loss(**args)


def test_good_args_run():
    loss, rewards = call()
    assert torch.isfinite(loss) and rewards.shape == (N,)


BAD = [
    (dict(hidden=torch.randn(1, T, D)), r"hidden must be 2-D"),
    (dict(hidden=torch.randint(0, 5, (T, D))), r"hidden must be a floating-point"),
    (dict(hidden=torch.randn(T, D, dtype=torch.float64)), r"hidden must be float32, bfloat16"),
    (dict(hidden=torch.randn(0, D)), r"hidden must be non-empty"),
    (dict(hidden=[[1.0]]), r"hidden must be a torch.Tensor"),
    (dict(weight=torch.randn(D + 1)), r"weight must have shape \[D\] or \[1, D\] with D=10"),
    (dict(weight=torch.randn(2, D)), r"weight must have shape"),
    (dict(weight=torch.randn(D, dtype=torch.float16)), r"weight dtype torch.float16"),
    (dict(bias=torch.randn(2)), r"bias must have shape \[1\] or \[\]"),
    (dict(reward_positions=torch.tensor([0, 2, 4, 6, 8, 12])), r"reward_positions\[5\] = 12 is out of range.*\[0, 12\)"),
    (dict(reward_positions=torch.tensor([0, -1, 4, 6, 8, 10])), r"reward_positions\[1\] = -1"),
    (dict(reward_positions=torch.tensor([0.0, 2, 4, 6, 8, 10])), r"reward_positions must be an integer"),
    (dict(reward_positions=torch.tensor([[0, 2, 4, 6, 8, 10]])), r"reward_positions must be 1-D"),
    (dict(reward_positions=torch.zeros(0, dtype=torch.long), chosen_index=torch.zeros(0, dtype=torch.long),
          rejected_index=torch.zeros(0, dtype=torch.long), margin=None, comparison_weight=None),
     r"reward_positions is empty"),
    (dict(chosen_index=torch.tensor([0, 1, 6])), r"chosen_index\[2\] = 6 is out of range.*N=6"),
    (dict(rejected_index=torch.tensor([3, -4, 5])), r"rejected_index\[1\] = -4"),
    (dict(chosen_index=torch.tensor([True, False, True])), r"chosen_index must be an integer"),
    (dict(rejected_index=torch.tensor([3, 4])), r"chosen_index \(3\) and rejected_index \(2\) must have the same length"),
    (dict(chosen_index=torch.zeros(0, dtype=torch.long), rejected_index=torch.zeros(0, dtype=torch.long),
          margin=None, comparison_weight=None), r"no comparison"),
    (dict(margin=torch.tensor([0.1, float("nan"), 0.2])), r"margin of comparison 1 is not finite"),
    (dict(margin=torch.tensor([0.1, 0.3, float("inf")])), r"margin of comparison 2 is not finite"),
    (dict(margin=torch.rand(4)), r"margin must have shape \[3\]"),
    (dict(margin=torch.tensor([1, 2, 3])), r"margin must be a floating-point"),
    (dict(comparison_weight=torch.tensor([0.5, -0.1, 1.0])), r"comparison_weight of comparison 1 is negative"),
    (dict(comparison_weight=torch.zeros(3)), r"comparison_weight sums to 0"),
    (dict(comparison_weight=torch.rand(2)), r"comparison_weight must have shape \[3\]"),
    (dict(contrast_weights=torch.rand(3, 4), comparison_weight=None), r"contrast_weights must have shape \[Bc, Br\] = \[3, 3\]"),
    (dict(contrast_weights=torch.rand(3, 3)), r"comparison_weight does not apply in contrast mode"),
    (dict(contrast_weights=torch.tensor([[1.0, float("nan"), 0], [0, 1, 0], [0, 0, 1]]), comparison_weight=None),
     r"contrast_weights has non-finite"),
    (dict(contrast_weights=torch.rand(3, 2), rejected_index=torch.tensor([3, 4]), comparison_weight=None),
     r"margin needs paired data"),
    (dict(contrast_weights=torch.randint(0, 2, (3, 3)), comparison_weight=None), r"contrast_weights must be a floating-point"),
    (dict(objective="dpo"), r"objective='dpo' is not known"),
    (dict(label_smoothing=0.6), r"label_smoothing must lie in \[0, 0.5\)"),
    (dict(label_smoothing=0.1, objective="hinge"), r"label_smoothing only applies"),
    (dict(centering_coefficient=-1.0), r"centering_coefficient must be >= 0"),
    (dict(hinge_margin=float("nan")), r"hinge_margin must be a finite number"),
    (dict(backend="cuda"), r"backend='cuda' is not known"),
]


@pytest.mark.parametrize("changes,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_raises_value_error_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        call(**changes)


def test_index_dtypes_int32_are_accepted():
    """int32 indices give the float64 reference's loss (fastrm.functional on int64 indices)."""
    a = good_args()
    loss, rewards = call(reward_positions=a["reward_positions"].int(), chosen_index=a["chosen_index"].int(),
                         rejected_index=a["rejected_index"].int())
    want_rewards = a["hidden"].double()[a["reward_positions"]] @ a["weight"].double() + a["bias"].double()
    want = RF.comparison_loss(want_rewards, a["chosen_index"], a["rejected_index"], a["margin"].double(),
                              a["comparison_weight"].double())
    torch.testing.assert_close(rewards.double(), want_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_automatic_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(head_loss.BACKEND_ENV, raising=False)
    want = "native" if head_loss_native.native_available() else "torch"
    assert resolve_backend(None, cpu) == want
    assert available_backends("cpu") == [b for b in BACKENDS if b == "torch"
                                         or (b == "native" and want == "native")
                                         or (b == "triton" and tri._interpreted())]
    monkeypatch.setenv(head_loss.BACKEND_ENV, "torch")
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("native" if want == "native" else "torch", cpu) == want  # argument wins
    monkeypatch.setenv(head_loss.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$FASTRM_HEAD_BACKEND='fast' is not known"):
        resolve_backend(None, cpu)
    monkeypatch.delenv(head_loss.BACKEND_ENV)
    # without the C++ op the automatic choice falls back to torch
    monkeypatch.setattr(head_loss_native, "native_available", lambda: False)
    monkeypatch.setattr(head_loss_native, "native_unavailable_reason", lambda: "not built (test)")
    assert resolve_backend(None, cpu) == "torch"
    with pytest.raises(ValueError, match=r"backend='native' is unavailable: not built \(test\)"):
        resolve_backend("native", cpu)


def test_native_unavailable_reason_comes_from_the_loader(monkeypatch):
    monkeypatch.setattr(_native, "has_op", lambda name: False)
    monkeypatch.setattr(_native, "unavailable_reason", lambda: "disabled by FASTRM_DISABLE_NATIVE=1")
    with pytest.raises(ValueError, match="FASTRM_DISABLE_NATIVE=1"):
        call(backend="native")


def test_native_is_cpu_only_and_triton_needs_cuda_or_interpreter(monkeypatch):
    assert "CPU-only" in head_loss.backend_unavailable_reason("native", torch.device("cuda"))
    assert head_loss.backend_unavailable_reason("triton", torch.device("cuda")) in ("", tri._TRITON_IMPORT_ERROR)
    monkeypatch.setattr(tri, "_interpreted", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' is unavailable: .*TRITON_INTERPRET=1"):
        call(backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="set after triton had been imported"):
        call(backend="triton")


@pytest.mark.skipif(not _native.available(), reason=_native.unavailable_reason() or "native op")
def test_native_op_checks_indices_itself():
    """The C++ op is reachable without the Python checks: it must refuse bad indices too."""
    a = good_args()
    with pytest.raises(RuntimeError, match="reward_positions"):
        torch.ops.fastrm.fused_reward_head_forward(
            a["hidden"], a["weight"], None, torch.tensor([0, 99]), torch.tensor([0]),
            torch.tensor([1]), None, None, None, "bradley_terry", 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="unknown objective"):
        torch.ops.fastrm.fused_reward_head_forward(
            a["hidden"], a["weight"], None, torch.tensor([0, 1]), torch.tensor([0]),
            torch.tensor([1]), None, None, None, "dpo", 0.0, 1.0, 0.0)
