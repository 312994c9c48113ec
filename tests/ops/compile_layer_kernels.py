"""Compiles the Triton kernels of the lean layer ops (RMSNorm, SiLU-mul, RoPE) for an sm_90 GPU,
no GPU needed.

The interpreter tests (``test_layer_ops*.py``) execute the kernels as numpy code and cannot
see compile-time errors (types of loop-carried pointers, constexpr branches, casts); this lowers
every variant the launchers can pick to PTX with Triton's own compiler. It must run with
``TRITON_INTERPRET`` unset, so the tests start it as a subprocess.

    python tests/ops/compile_layer_kernels.py
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastrm.ops import rms_norm_triton as RN  # noqa: E402
from fastrm.ops import rope_triton as RO  # noqa: E402
from fastrm.ops import swiglu_triton as SW  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = ("fp32", "bf16", "fp16")


def compile_kernel(kernel, signature: dict, constexprs: dict) -> None:
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs),
                              target=TARGET)
    assert compiled.asm["ptx"], kernel.__name__
    print(f"{kernel.__name__} {signature.get('x_ptr', signature.get('g_ptr'))} {constexprs} ok")


def main() -> None:
    for dt, one_pass in itertools.product(DTYPES, (True, False)):
        block = RN.MAX_BLOCK_D if one_pass else 1024
        compile_kernel(RN._rms_norm_fwd_kernel, {
            "x_ptr": f"*{dt}", "stride_x": "i64", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}",
            "stride_y": "i64", "rstd_ptr": "*fp32", "D": "i32", "eps": "fp32"},
            {"BLOCK_D": block, "ONE_PASS": one_pass})
        # fp32 weights with low-precision activations (a model kept in fp32, autocast inputs)
        compile_kernel(RN._rms_norm_bwd_kernel, {
            "gy_ptr": f"*{dt}", "stride_gy": "i64", "x_ptr": f"*{dt}", "stride_x": "i64",
            "w_ptr": "*fp32", "rstd_ptr": "*fp32", "gx_ptr": f"*{dt}", "stride_gx": "i64",
            "gw_part_ptr": "*fp32", "R": "i32", "D": "i32", "rows_per_program": "i32"},
            {"BLOCK_D": block, "ONE_PASS": one_pass})
    for dt in DTYPES:
        compile_kernel(SW._silu_mul_fwd_kernel, {
            "g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "a_ptr": f"*{dt}", "N": "i64"},
            {"BLOCK": SW.BLOCK})
        compile_kernel(SW._silu_mul_bwd_kernel, {
            "da_ptr": "*fp32", "g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "dg_ptr": f"*{dt}",
            "du_ptr": f"*{dt}", "N": "i32"},
            {"BLOCK": SW.BLOCK})
    for dt, inverse in itertools.product(DTYPES, (False, True)):
        compile_kernel(RO._rope_kernel, {
            "x_ptr": f"*{dt}", "stride_xt": "i64", "stride_xh": "i32", "cs_ptr": "*fp32",
            "y_ptr": f"*{dt}", "H": "i32", "HALF": "i32"},
            {"INVERSE": inverse, "BLOCK_H": 16, "BLOCK_P": 64})
    print("all layer kernels compiled")


if __name__ == "__main__":
    main()
