"""The lean layer ops (RMSNorm, SwiGLU, RoPE) against torchtune's own modules in float64.

Every op runs on each backend (the C++ kernels of ``kernels/``, the Triton kernels of
``*_triton.py`` through Triton's interpreter on CPU tensors, and the plain-torch fallback) over
a grid of shapes (head / model dims that are and are not multiples of the vector width) and
dtypes; the reference is torchtune's module evaluated in float64 on the same (rounded) inputs,
its gradients from autograd. Inputs are fresh random tensors. The Triton backend takes fp32,
bf16 and fp16 (fp64 cases run on the other two).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastrm import _native
from fastrm.ops import rms_norm as rms_mod
from fastrm.ops import rope as rope_mod
from fastrm.ops import swiglu as swiglu_mod
from fastrm.ops.rms_norm import rms_norm
from fastrm.ops.rope import apply_rope, rope_cos_sin
from fastrm.ops.swiglu import silu_mul, swiglu_mlp
from fastrm.ops.triton_support import TRITON_DTYPES, TRITON_IMPORT_ERROR, interpreted

BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(
        not _native.has_op("rms_norm_forward"), reason=f"native ops not built: {_native.unavailable_reason()}")),
    pytest.param("triton", marks=pytest.mark.skipif(
        not interpreted(), reason=TRITON_IMPORT_ERROR or "Triton's interpreter is off (TRITON_INTERPRET)")),
    "torch",
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (rtol, atol) of outputs and gradients against the float64 reference, per dtype
TOL = {
    torch.float64: ((1e-12, 1e-12), (1e-10, 1e-12)),
    torch.float32: ((2e-6, 1e-6), (1e-5, 1e-6)),
    torch.bfloat16: ((8e-3, 1e-3), (3e-2, 2e-3)),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces the backend in all three op modules: ``torch`` turns the native path off,
    ``triton`` also routes CPU tensors to the Triton kernels (run by the interpreter)."""
    if request.param in ("torch", "triton"):
        for mod in (rms_mod, swiglu_mod, rope_mod):
            monkeypatch.setattr(mod, "native_ok", lambda t: False)
    if request.param == "triton":
        params = getattr(request.node, "callspec", None)
        dtype = params.params.get("dtype") if params is not None else None
        if dtype is not None and dtype not in TRITON_DTYPES:
            pytest.skip(f"the Triton kernels take {TRITON_DTYPES}, not {dtype}")
        for mod in (rms_mod, swiglu_mod, rope_mod):
            monkeypatch.setattr(mod, "triton_ok", lambda t: t.dtype in TRITON_DTYPES)
    return request.param


def _close(actual, expected, tol, what):
    rtol, atol = tol
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


# relative Frobenius error bound for results that pass through matmuls (elementwise tolerances
# do not fit outputs near zero): bf16 operands carry 2^-9 relative rounding each
NORM_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _close_norm(actual, expected, dtype, what):
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err <= NORM_TOL[dtype], f"{what}: relative error {err:.3e} > {NORM_TOL[dtype]:.1e}"


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _ref_grads(module_fn, inputs, grad_out):
    """float64 reference: module_fn over float64 copies of inputs, grads w.r.t. each."""
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out = module_fn(*ref_in)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in ref_in]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 8), (3, 17, 64), (2, 33, 37), (1, 129, 576)])
def test_rms_norm_matches_torchtune(backend, dtype, shape):
    from torchtune.modules import RMSNorm

    if backend == "triton" and shape[1] > 100:
        pytest.skip("the interpreter runs one Python program per row: wide and multi-block rows "
                    "are in test_layer_ops_triton.py, the compiled kernel in its sm90 check")
    d = shape[-1]
    x = _leaf(shape, dtype, 3.0)
    w = _leaf((d,), dtype)
    gy = torch.randn(shape, dtype=torch.float64).to(dtype)
    eps = 1e-5
    y = rms_norm(x, w, eps)
    y.backward(gy)

    y_ref, (gx_ref, gw_ref) = _ref_grads(
        lambda xr, wr: torch.nn.functional.rms_norm(xr, (d,), wr, eps), [x, w], gy)
    # torchtune's module computes the same function (in fp32 whatever the input dtype, hence
    # the fp32 tolerance)
    tt = RMSNorm(d, eps=eps).double()
    with torch.no_grad():
        tt.scale.copy_(w.detach().double())
    torch.testing.assert_close(tt(x.detach().double()), y_ref, rtol=1e-5, atol=1e-5)
    vt, gt = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, y_ref, vt, "y")
    _close(x.grad, gx_ref, gt, "grad x")
    _close(w.grad, gw_ref, (gt[0], gt[1] * shape[0] * shape[1]), "grad weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,inter", [((1, 9, 16), 24), ((2, 31, 64), 96), ((1, 65, 40), 72)])
def test_swiglu_mlp_matches_torchtune_feedforward(backend, dtype, shape, inter):
    from torchtune.modules import FeedForward

    d = shape[-1]
    x = _leaf(shape, dtype)
    w1, w3 = _leaf((inter, d), dtype, d ** -0.5), _leaf((inter, d), dtype, d ** -0.5)
    w2 = _leaf((d, inter), dtype, inter ** -0.5)
    gy = torch.randn(shape, dtype=torch.float64).to(dtype)
    y = swiglu_mlp(x, w1, w3, w2)
    y.backward(gy)

    ref_in = [t.detach().double().requires_grad_() for t in (x, w1, w3, w2)]
    lin = torch.nn.functional.linear
    y_ref = lin(torch.nn.functional.silu(lin(ref_in[0], ref_in[1])) * lin(ref_in[0], ref_in[2]), ref_in[3])
    y_ref.backward(gy.double())
    # torchtune's FeedForward computes the same function
    ff = FeedForward(gate_proj=nn.Linear(d, inter, bias=False), down_proj=nn.Linear(inter, d, bias=False),
                     up_proj=nn.Linear(d, inter, bias=False)).double()
    with torch.no_grad():
        for lin_mod, w in ((ff.w1, ref_in[1]), (ff.w3, ref_in[2]), (ff.w2, ref_in[3])):
            lin_mod.weight.copy_(w)
        torch.testing.assert_close(ff(ref_in[0]), y_ref, rtol=1e-12, atol=1e-12)
    _close_norm(y, y_ref.detach(), dtype, "y")
    for got, want, name in zip((x.grad, w1.grad, w3.grad, w2.grad), [t.grad for t in ref_in],
                               ("x", "w1", "w3", "w2")):
        _close_norm(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(backend, dtype):
    g = _leaf((5, 37), dtype, 4.0)
    u = _leaf((5, 37), dtype)
    ga = torch.randn(5, 37, dtype=torch.float64).to(dtype)
    a = silu_mul(g, u)
    a.backward(ga)
    a_ref, (gg_ref, gu_ref) = _ref_grads(lambda gr, ur: torch.nn.functional.silu(gr) * ur, [g, u], ga)
    vt, gt = TOL[dtype]
    _close(a, a_ref, vt, "a")
    _close(g.grad, gg_ref, gt, "grad gate")
    _close(u.grad, gu_ref, gt, "grad up")


def test_silu_mul_saturates_without_overflow(backend):
    """Large |gate| (exp overflow territory for a naive kernel) gives silu's limits."""
    g = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0])
    u = torch.ones_like(g)
    a = swiglu_mod.silu_mul_forward(g, u)
    torch.testing.assert_close(a, torch.nn.functional.silu(g), rtol=1e-6, atol=1e-30)
    dg, du = swiglu_mod.silu_mul_backward(torch.ones_like(g), g, u)
    gd = g.double().requires_grad_()
    torch.nn.functional.silu(gd).sum().backward()
    torch.testing.assert_close(dg.double(), gd.grad, rtol=1e-6, atol=1e-30)
    assert torch.isfinite(dg).all() and torch.isfinite(du).all()


def _rope_modules(head_dim, max_seq_len):
    from torchtune.models.llama3_1 import Llama3ScaledRoPE
    from torchtune.modules import RotaryPositionalEmbeddings

    return [RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=10_000),
            Llama3ScaledRoPE(head_dim, max_seq_len=max_seq_len, base=500_000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_kind", [0, 1])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_rope_matches_torchtune(backend, dtype, rope_kind, layout):
    h, hd = 3, 16
    rope = _rope_modules(hd, 64)[rope_kind].double()
    if layout == "packed":
        b, s = 1, 23
        pos = torch.cat([torch.arange(9), torch.arange(5), torch.arange(3, 12)])[None]  # restarts
    else:
        b, s, pos = 3, 11, None
    x = _leaf((b, s, h, hd), dtype)
    gy = torch.randn(b, s, h, hd, dtype=torch.float64).to(dtype)
    cs = rope_cos_sin(rope.cache, pos, s, dtype)
    if pos is None:
        cs = cs.repeat(b, 1, 1)
    y = apply_rope(x, cs)
    y.backward(gy)
    # reference: each channel pair as a complex number times exp(i * theta) in float64, angles
    # from the module's cache (torchtune's own forward computes in fp32, so it is checked at
    # fp32 tolerance below)
    cache = rope.cache.double()
    rows = cache[:s].expand(b, s, hd // 2, 2) if pos is None else cache[pos.reshape(b, s)]
    rot = torch.view_as_complex(rows.contiguous())[:, :, None]  # [b, s, 1, hd/2]

    def ref(xr):
        z = torch.view_as_complex(xr.reshape(b, s, h, hd // 2, 2))
        return torch.view_as_real(z * rot).reshape(b, s, h, hd)

    y_ref, (gx_ref,) = _ref_grads(ref, [x], gy)
    torch.testing.assert_close(rope(x.detach().double(), input_pos=pos), y_ref, rtol=1e-5, atol=1e-5)
    vt, gt = TOL[dtype]
    _close(y, y_ref, vt, "y")
    _close(x.grad, gx_ref, gt, "grad x")


def test_rope_shape_errors():
    with pytest.raises(ValueError, match="cos_sin must be"):
        apply_rope(torch.randn(1, 4, 2, 8), torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="even D"):
        apply_rope(torch.randn(1, 4, 2, 7), torch.randn(4, 3, 2))


def test_rms_norm_weight_shape_error():
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(torch.randn(2, 8), torch.ones(4))


def test_unsupported_dtype_uses_torch_path():
    """fp16 is not a native dtype: the torch formulas run (and agree with float64)."""
    x = torch.randn(4, 24).half().requires_grad_()
    w = torch.rand(24).half().requires_grad_()
    y = rms_norm(x, w, 1e-6)
    y.float().sum().backward()
    y_ref = torch.nn.functional.rms_norm(x.detach().double(), (24,), w.detach().double(), 1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-3, atol=2e-3)
    assert x.grad is not None and w.grad is not None


@pytest.mark.skipif(not _native.has_op("rms_norm_backward"), reason="native ops not built")
def test_native_results_do_not_depend_on_thread_count():
    x = torch.randn(301, 77, dtype=torch.float32)
    w = torch.randn(77)
    gy = torch.randn(301, 77)
    g = torch.randn(301, 77)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, rstd = torch.ops.fastrm.rms_norm_forward(x, w, 1e-5)
            dx, dw = torch.ops.fastrm.rms_norm_backward(gy, x, w, rstd)
            a = torch.ops.fastrm.silu_mul_forward(g, x)
            outs.append((rstd, dx, dw, a))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _native.has_op("rms_norm_forward"), reason="native ops not built")
def test_native_op_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="weight must have D"):
        torch.ops.fastrm.rms_norm_forward(torch.randn(3, 8), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        torch.ops.fastrm.silu_mul_forward(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="cos_sin must be"):
        torch.ops.fastrm.rope_rotate(torch.randn(4, 2, 8), torch.randn(4, 3, 2), False)
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.fastrm.silu_mul_forward(torch.randn(3, 8).half(), torch.randn(3, 8).half())
