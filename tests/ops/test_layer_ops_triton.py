"""The Triton kernels of the lean layer ops: the paths the shared op tests do not reach.

``test_layer_ops.py`` runs every op through the Triton backend against torchtune in float64;
this file covers the kernels' own branches on small inputs in Triton's interpreter (CPU
tensors): RMSNorm rows wider than one block (two passes) and the persistent backward's row
chunks with a remainder, strided rows, SiLU-mul across program boundaries and at saturation,
RoPE with head counts / head dims that are not powers of two on strided views; that the
autograd functions save the same tensors whichever backend runs; and (subprocess, interpreter
off) that every kernel variant compiles to PTX for sm_90.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastrm import _native
from fastrm.ops import rms_norm as rms_mod
from fastrm.ops import rope as rope_mod
from fastrm.ops import swiglu as swiglu_mod
from fastrm.ops.rms_norm import rms_norm
from fastrm.ops.rms_norm_triton import rms_norm_backward_triton, rms_norm_forward_triton
from fastrm.ops.rope import apply_rope
from fastrm.ops.rope_triton import rope_rotate_triton
from fastrm.ops.swiglu import swiglu_mlp
from fastrm.ops.swiglu_triton import silu_mul_backward_triton, silu_mul_forward_triton
from fastrm.ops.triton_support import TRITON_DTYPES, TRITON_IMPORT_ERROR, interpreted, triton_ok

pytestmark = pytest.mark.skipif(
    not interpreted(), reason=TRITON_IMPORT_ERROR or "Triton's interpreter is off (TRITON_INTERPRET)")

COMPILE_SCRIPT = Path(__file__).resolve().parent / "compile_layer_kernels.py"
# (rtol, atol) against float64: fp32 math; bf16 adds one output rounding (2^-8 relative)
TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (8e-3, 8e-3)}


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=what)


def _rms_reference(x, w, gy, eps):
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = torch.nn.functional.rms_norm(xr, (x.shape[-1],), wr, eps)
    y.backward(gy.double())
    rstd = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    return y.detach(), rstd, xr.grad, wr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,d,block", [(11, 37, None), (11, 37, 16), (6, 100, 32), (1, 5, None)],
                         ids=["one-pass", "two-pass", "two-pass-4-blocks", "one-row"])
def test_rms_norm_kernels_match_float64(dtype, rows, d, block):
    gen = torch.Generator().manual_seed(rows * d)
    x, w, gy = _rand((rows, d), dtype, gen, 3.0), _rand((d,), dtype, gen), _rand((rows, d), dtype, gen)
    y, rstd = rms_norm_forward_triton(x, w, 1e-5, block_d=block)
    gx, gw = rms_norm_backward_triton(gy, x, w, rstd, block_d=block)
    y_ref, rstd_ref, gx_ref, gw_ref = _rms_reference(x, w, gy, 1e-5)
    assert y.dtype == dtype and gx.dtype == dtype and rstd.dtype == gw.dtype == torch.float32
    _close(y, y_ref, dtype, "y")
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=2e-6, atol=0)
    _close(gx, gx_ref, dtype, "grad x")
    # grad w sums over rows in fp32 (no output rounding to bf16)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5 * rows)


def test_rms_norm_strided_rows_equal_contiguous():
    gen = torch.Generator().manual_seed(1)
    wide = _rand((7, 48), torch.float32, gen)
    x = wide[:, 5:41]  # row stride 48, 36 columns
    w, gy = _rand((36,), torch.float32, gen), _rand((7, 36), torch.float32, gen)
    y, rstd = rms_norm_forward_triton(x, w, 1e-6)
    y2, rstd2 = rms_norm_forward_triton(x.contiguous(), w, 1e-6)
    assert torch.equal(y, y2) and torch.equal(rstd, rstd2)
    gx, gw = rms_norm_backward_triton(gy, x, w, rstd)
    gx2, gw2 = rms_norm_backward_triton(gy, x.contiguous(), w, rstd)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2)


@pytest.fixture
def triton_backend(monkeypatch):
    """Routes the op modules' dispatch to the Triton kernels for CPU tensors."""
    for mod in (rms_mod, swiglu_mod, rope_mod):
        monkeypatch.setattr(mod, "native_ok", lambda t: False)
        monkeypatch.setattr(mod, "triton_ok", lambda t: t.dtype in TRITON_DTYPES)


def test_norm_recompute_forward_is_bitwise_the_autograd_forward(triton_backend):
    """The norm-output recompute (fastrm.models.fused) calls ``rms_norm_forward``: on the Triton
    path it must rebuild exactly the values the autograd function returned."""
    gen = torch.Generator().manual_seed(2)
    x = _rand((3, 5, 40), torch.bfloat16, gen).requires_grad_()
    w = _rand((40,), torch.bfloat16, gen).requires_grad_()
    y = rms_norm(x, w, 1e-5)
    y2, _ = rms_mod.rms_norm_forward(x.detach().reshape(-1, 40), w.detach(), 1e-5)
    assert torch.equal(y.detach().reshape(-1, 40), y2)


def _saved(run) -> list[tuple]:
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


def test_autograd_functions_save_the_same_tensors_on_every_backend(monkeypatch):
    """RMSNorm keeps x and rstd (and the weight), the MLP x, g, u (and its weights), RoPE the
    gathered cos/sin only: whichever backend computes."""
    gen = torch.Generator().manual_seed(3)
    x = _rand((2, 6, 24), torch.float32, gen).requires_grad_()
    w = _rand((24,), torch.float32, gen).requires_grad_()
    w1, w3 = _rand((40, 24), torch.float32, gen).requires_grad_(), _rand((40, 24), torch.float32, gen).requires_grad_()
    w2 = _rand((24, 40), torch.float32, gen).requires_grad_()
    q = _rand((2, 6, 3, 8), torch.float32, gen).requires_grad_()
    cs = torch.rand(12, 4, 2, dtype=torch.float32)

    def run():
        rms_norm(x, w, 1e-5)
        swiglu_mlp(x, w1, w3, w2)
        apply_rope(q, cs)

    other = _saved(run)  # native C++ where built, else torch
    for mod in (rms_mod, swiglu_mod, rope_mod):
        monkeypatch.setattr(mod, "native_ok", lambda t: False)
        monkeypatch.setattr(mod, "triton_ok", lambda t: t.dtype in TRITON_DTYPES)
    tri = _saved(run)
    assert tri == other
    assert tri == [((12, 24), torch.float32), ((24,), torch.float32), ((12,), torch.float32),
                   ((12, 24), torch.float32), ((12, 40), torch.float32), ((12, 40), torch.float32),
                   ((40, 24), torch.float32), ((40, 24), torch.float32), ((24, 40), torch.float32),
                   ((12, 4, 2), torch.float32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_kernels_match_float64_across_program_boundaries(dtype):
    gen = torch.Generator().manual_seed(4)
    n = 2 * 1024 + 37  # three programs, the last one partly masked
    g, u, da = _rand((n,), dtype, gen, 4.0), _rand((n,), dtype, gen), _rand((n,), dtype, gen)
    a = silu_mul_forward_triton(g, u)
    dg, du = silu_mul_backward_triton(da, g, u)
    gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
    a_ref = torch.nn.functional.silu(gr) * ur
    a_ref.backward(da.double())
    _close(a, a_ref.detach(), dtype, "a")
    _close(dg, gr.grad, dtype, "grad gate")
    _close(du, ur.grad, dtype, "grad up")


def test_silu_mul_kernels_saturate_without_overflow():
    g = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4])
    u = torch.ones_like(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning in the interpreter
        a = silu_mul_forward_triton(g, u)
        dg, du = silu_mul_backward_triton(torch.ones_like(g), g, u)
    gd = g.double().requires_grad_()
    torch.nn.functional.silu(gd).sum().backward()
    torch.testing.assert_close(a.double(), torch.nn.functional.silu(g.double()), rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(dg.double(), gd.grad, rtol=1e-6, atol=1e-30)
    assert torch.isfinite(du).all()


def _rope_reference(x: torch.Tensor, cos_sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Each channel pair as a complex number times ``exp(+-i theta)``, float64."""
    t, h, d = x.shape
    rot = torch.view_as_complex(cos_sin.double().contiguous())[:, None]  # [T, 1, D/2]
    z = torch.view_as_complex(x.double().reshape(t, h, d // 2, 2).contiguous())
    return torch.view_as_real(z * (rot.conj() if inverse else rot)).reshape(t, h, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,head_dim", [(5, 24), (3, 6), (1, 2)])
def test_rope_kernel_matches_float64_on_strided_views(dtype, heads, head_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    t = 9
    theta = torch.rand(t, head_dim // 2, generator=gen, dtype=torch.float64) * 6.0
    cos_sin = torch.stack([theta.cos(), theta.sin()], -1).float()
    base = _rand((t, heads, head_dim + 6), dtype, gen)
    x = base[:, :, 3:3 + head_dim]  # strided over T and H, channels contiguous
    for inverse in (False, True):
        y = rope_rotate_triton(x, cos_sin, inverse)
        assert y.dtype == dtype and y.is_contiguous()
        _close(y, _rope_reference(x, cos_sin, inverse), dtype, f"rope inverse={inverse}")
    if dtype == torch.float32:  # a rotation undone to fp32 rounding
        back = rope_rotate_triton(rope_rotate_triton(x, cos_sin, False), cos_sin, True)
        torch.testing.assert_close(back, x, rtol=2e-6, atol=2e-6)


def test_rope_function_backward_on_triton(triton_backend):
    gen = torch.Generator().manual_seed(6)
    x = _rand((1, 7, 3, 10), torch.float32, gen).requires_grad_()
    theta = torch.rand(7, 5, generator=gen, dtype=torch.float64) * 6.0
    cos_sin = torch.stack([theta.cos(), theta.sin()], -1).float()
    gy = _rand((1, 7, 3, 10), torch.float32, gen)
    apply_rope(x, cos_sin).backward(gy)
    xr = x.detach().double().requires_grad_()
    _rope_reference(xr[0], cos_sin, False).backward(gy[0].double())
    torch.testing.assert_close(x.grad[0].double(), xr.grad[0], rtol=2e-6, atol=2e-6)


def test_cpu_tensors_never_choose_triton():
    """On CPU the C++ ops (or torch) run; Triton is the CUDA backend only."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert not triton_ok(torch.zeros(4, dtype=dtype))
    if _native.has_op("rms_norm_forward"):
        assert rms_mod.native_ok(torch.zeros(2, 4))


def test_every_layer_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(COMPILE_SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"Triton compile failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert "all layer kernels compiled" in out.stdout
    # 3 dtypes x (rms fwd + bwd) x (one / two pass) + 3 x silu fwd / bwd + 3 x rope (fwd / inverse)
    assert out.stdout.count(" ok") == 24
