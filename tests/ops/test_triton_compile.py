"""Every variant the Triton head-loss launcher can pick compiles for a real GPU target (sm_90 PTX),
checked on a CPU-only machine.

The interpreter-based tests cannot catch compile-time errors, so ``triton_variants.py`` runs in a
subprocess with ``TRITON_INTERPRET`` unset: it drives the launcher over every block choice,
dtype combination and flag and compiles each launch as Triton would specialize it on a GPU.
These tests check that the compiled set covers every block size the launcher's own rule can
return (:func:`triton_variants.block_choices`), every dtype combination and every flag.
Triton's on-disk cache (keyed by kernel source) makes reruns take seconds; a cold run compiles
~100 variants (~40 s of CPU, spread over the cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_variants as V
from fastrm.ops import head_loss_triton as tri

SCRIPT = Path(V.__file__).resolve()
pytestmark = pytest.mark.skipif(tri.triton is None, reason=tri._TRITON_IMPORT_ERROR or "no triton")
TRITON_TYPES = {V.F32: "*fp32", V.BF16: "*bf16", V.F16: "*fp16"}


def _compile(*args: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"Triton compile failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stdout.strip().splitlines()[-2])  # variants and seconds, shown with -s
    return summary


def _check_coverage(summary: dict) -> None:
    kernels = summary["kernels"]
    assert set(kernels) == set(tri.BLOCKS)
    for kernel, info in kernels.items():
        for name in tri.BLOCKS[kernel]:
            every_block = sorted({b for (b,) in V.block_choices((kernel, name))})
            assert info["constexprs"][name] == every_block, (kernel, name)
        for flag, values in info["constexprs"].items():
            if flag == "OBJECTIVE":
                assert values == sorted(tri.OBJECTIVE_CODES.values()), kernel
            elif not flag.startswith("BLOCK"):
                assert values == [False, True], (kernel, flag)

    def pointer_types(kernel: str, *names: str) -> set[tuple]:
        return {tuple(json.loads(p)[n] for n in names) for p in kernels[kernel]["pointers"]}

    # a missing bias passes the fp32 output buffer as bias_ptr
    want_gather = {(TRITON_TYPES[h], TRITON_TYPES[w], TRITON_TYPES[b or V.F32])
                   for (h, w, b), _ in V.head_flags()}
    assert pointer_types("_gather_dot_kernel", "hidden_ptr", "w_ptr", "bias_ptr") == want_gather
    want_backward = {(TRITON_TYPES[h], TRITON_TYPES[h], TRITON_TYPES[w])
                     for (h, w, _), _ in V.head_flags()}
    assert pointer_types("_head_backward_kernel", "hidden_ptr", "gh_ptr", "w_ptr") == want_backward
    assert ("*bf16", "*fp32") in {t[:2] for t in want_gather}  # fp32 head over bf16 hidden


@pytest.fixture(scope="module")
def default_variants() -> dict:
    return _compile(timeout=900)


def test_every_block_dtype_and_flag_compiles_for_sm90(default_variants):
    _check_coverage(default_variants)


def test_launches_are_specialized_as_on_a_gpu(default_variants):
    """The variants are Triton's own specializations of real launches: one row or ``D = 1``
    turns ``U`` / ``D`` into constants (a variant no constexpr list names)."""
    kernels = default_variants["kernels"]
    assert {"U", "D"} <= set(kernels["_gather_dot_kernel"]["specialized"])
    assert {"U", "D"} <= set(kernels["_head_backward_kernel"]["specialized"])
    assert kernels["_gather_dot_kernel"]["variants"] > len(V.head_flags())


@pytest.mark.slow
def test_product_of_blocks_dtypes_and_flags_compiles_for_sm90():
    summary = _compile("--all", timeout=3600)
    _check_coverage(summary)
    assert sum(k["variants"] for k in summary["kernels"].values()) > 500
