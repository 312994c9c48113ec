"""Compiles every Triton kernel of ``fastrm.ops.fused_reward_head`` for an sm_90 GPU, no GPU needed.

The CPU tests run the kernels through Triton's interpreter, which executes them as numpy code
and so cannot see compile-time errors (types of loop-carried values, constexpr branches, pointer
casts). This script lowers them to PTX with Triton's own compiler (``ptxas`` ships in the triton
wheel). It must run with ``TRITON_INTERPRET`` unset, so the tests start it as a subprocess.

    python tests/ops/compile_triton_kernels.py          # one variant per kernel and dtype
    python tests/ops/compile_triton_kernels.py --all    # every constexpr combination
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

from fastrm.ops import fused_reward_head as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, signature: dict, constexprs: dict) -> None:
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs),
                              target=TARGET)
    assert compiled.asm["ptx"], kernel.__name__
    print(f"{kernel.__name__} {constexprs} ok")


def main(every: bool) -> None:
    flags = (True, False) if every else (True,)
    objectives = (0, 1)
    for hdt, has_bias in itertools.product(("fp32", "bf16"), flags):
        compile_kernel(K._gather_dot_kernel, {
            "hidden_ptr": f"*{hdt}", "stride_t": "i64", "pos_ptr": "*i64", "w_ptr": f"*{hdt}",
            "bias_ptr": "*fp32", "out_ptr": "*fp32", "U": "i32", "D": "i32"},
            {"HAS_BIAS": has_bias, "BLOCK_U": 16, "BLOCK_D": 512})
    for obj, has_m, has_w in itertools.product(objectives, flags, flags):
        compile_kernel(K._pair_loss_kernel, {
            "r_ptr": "*fp32", "c_ptr": "*i64", "j_ptr": "*i64", "m_ptr": "*fp32", "cw_ptr": "*fp32",
            "inv_norm_ptr": "*fp32", "loss_part_ptr": "*fp32", "gc_ptr": "*fp32", "gr_ptr": "*fp32",
            "P": "i32", "eps": "fp32", "hinge": "fp32", "centering": "fp32"},
            {"OBJECTIVE": obj, "HAS_MARGIN": has_m, "HAS_WEIGHT": has_w, "BLOCK_P": 1024})
    for obj, has_m in itertools.product(objectives, flags):
        compile_kernel(K._contrast_loss_kernel, {
            "r_ptr": "*fp32", "c_ptr": "*i64", "j_ptr": "*i64", "m_ptr": "*fp32", "w_ptr": "*fp32",
            "stride_w0": "i32", "stride_w1": "i32", "loss_part_ptr": "*fp32", "row_g_ptr": "*fp32",
            "col_part_ptr": "*fp32", "Bc": "i32", "Br": "i32", "inv_bc": "fp32", "eps": "fp32",
            "hinge": "fp32", "centering": "fp32"},
            {"OBJECTIVE": obj, "HAS_MARGIN": has_m, "BLOCK_I": 32, "BLOCK_J": 64})
    compile_kernel(K._segment_sum_kernel, {
        "val_ptr": "*fp32", "order_ptr": "*i64", "offsets_ptr": "*i64", "out_ptr": "*fp32"},
        {"BLOCK": 16})
    for hdt, write_hidden in itertools.product(("fp32", "bf16"), (True, False) if every else (True,)):
        compile_kernel(K._head_backward_kernel, {
            "hidden_ptr": f"*{hdt}", "stride_t": "i64", "gh_ptr": f"*{hdt}", "stride_gt": "i64",
            "upos_ptr": "*i64", "coef_ptr": "*fp32", "w_ptr": f"*{hdt}", "gout_ptr": "*fp32",
            "gw_part_ptr": "*fp32", "U": "i32", "D": "i32"},
            {"WRITE_HIDDEN": write_hidden, "BLOCK_U": 16, "BLOCK_D": 256})
    print("all kernels compiled")


if __name__ == "__main__":
    main(every="--all" in sys.argv[1:])
