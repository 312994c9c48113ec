"""Every variant the Triton head-loss launcher can compile, and a compiler for them (no GPU needed).

The block sizes come from the launcher's own rule (:data:`fastrm.ops.head_loss_triton.BLOCKS`
through :func:`~fastrm.ops.head_loss_triton.block_size`): :func:`block_choices` scans sizes and
keeps, per block value, the sizes that make the launcher pick it. Nothing here lists a number
that could drift from the launcher.

Run as a script (``TRITON_INTERPRET`` unset), it drives the real launcher
(``_launch_forward`` / ``_launch_backward``) over those sizes, every dtype combination and every
flag, with each kernel swapped for a recorder that calls ``kernel.warmup(...)`` under a
compile-only driver for an sm_90 target: Triton specializes each launch exactly as it would on
a GPU (argument types, ``== 1`` and multiple-of-16 integers, pointer alignment, constexprs) and
compiles it to PTX (``ptxas`` ships in the triton wheel); nothing is launched. The CPU tests run
the kernels through the interpreter, which cannot see compile-time errors; this can.

    python tests/ops/triton_variants.py          # every block choice, dtype and flag: ~100 variants
    python tests/ops/triton_variants.py --all    # their product per kernel: ~700 variants (slow)

The last line of output is a JSON summary (per kernel: variants, the values each constexpr
took, the pointer types) that ``test_triton_compile.py`` checks against :func:`block_choices`
and :func:`head_flags`.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from fastrm.ops import head_loss_triton as K
from fastrm.ops.head_loss_contract import LossOptions, prepare_inputs

#: sizes scanned for block choices; every cap must be reached well before (checked)
SCAN = 1 << 13
KERNELS = tuple(K.BLOCKS)
ROWS = (("_gather_dot_kernel", "BLOCK_U"), ("_head_backward_kernel", "BLOCK_U"))
HIDDEN_DIM = (("_gather_dot_kernel", "BLOCK_D"), ("_head_backward_kernel", "BLOCK_D"))
COMPARISONS = (("_pair_loss_kernel", "BLOCK_P"),)
CHOSEN = (("_contrast_loss_kernel", "BLOCK_I"),)
REJECTED = (("_contrast_loss_kernel", "BLOCK_J"),)


def block_choices(*blocks: tuple[str, str]) -> dict[tuple, list[int]]:
    """Sizes that make the launcher pick each combination of ``(kernel, BLOCK_*)`` blocks that
    tile the same dimension: ``(block, ...) -> [smallest size, smallest multiple of 16]`` (the
    second when there is one: Triton specializes integers that are 1 or divisible by 16)."""
    sizes: dict[tuple, list[int]] = {}
    for n in range(1, SCAN + 1):
        got = sizes.setdefault(tuple(K.block_size(k, b, n) for k, b in blocks), [])
        if not got or (n % 16 == 0 and all(s % 16 for s in got)):
            got.append(n)
    for k, b in blocks:
        assert K.block_size(k, b, SCAN // 8) == K.block_size(k, b, SCAN), f"{k}.{b}: cap not reached"
    return sizes


def corner_sweep(*axes: dict[tuple, list[int]]) -> list[tuple[int, ...]]:
    """Every block choice of every axis, once with the other axes at their first choice and
    smallest sizes, once at their last choice and multiple-of-16 sizes (where there is one)."""
    out: list[tuple[int, ...]] = []
    for i, axis in enumerate(axes):
        for sizes in axis.values():
            for corner in (0, -1):
                case = tuple((sizes if j == i else list(other.values())[corner])[corner]
                             for j, other in enumerate(axes))
                if case not in out:
                    out.append(case)
    return out


def every_choice(*axes: dict[tuple, list[int]]) -> list[tuple[int, ...]]:
    """The product of the axes' block choices (smallest sizes)."""
    return list(itertools.product(*([s[0] for s in axis.values()] for axis in axes)))


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def head_flags() -> list[tuple[tuple, bool]]:
    """``((hidden, weight, bias | None), need_hidden)``: every dtype combination the op accepts
    (weight in hidden's dtype or fp32; bias absent, in the weight's dtype or fp32), with
    ``need_hidden`` alternating within each ``(hidden, weight)`` pair. The gather kernel sees
    every ``(hidden, weight, bias)``, the backward every ``(hidden, weight, need_hidden)``."""
    out = []
    for h in (F32, BF16, F16):
        for w in dict.fromkeys((h, F32)):
            for j, b in enumerate(dict.fromkeys((None, w, F32))):
                out.append(((h, w, b), j % 2 == 0))
    return out


@dataclass
class Head:
    """Sizes and dtypes of the gather-dot and backward launches."""

    u: int
    d: int
    dtypes: tuple = (F32, F32, F32)
    need_hidden: bool = True


@dataclass
class Loss:
    """One loss launch: pair mode (``p`` comparisons) or contrast mode (``bc x br``)."""

    p: int = 0
    bc: int = 0
    br: int = 0
    objective: str = "bradley_terry"
    margin: bool = True
    cweight: bool = True


def head_cases(every: bool) -> list[Head]:
    """Default: every block choice at both corners of the other axis, and every dtype and flag
    at the largest blocks. ``every``: the product of all of them."""
    rows, dims = block_choices(*ROWS), block_choices(*HIDDEN_DIM)
    flags = head_flags()
    if every:
        return [Head(u, d, dt, nh)
                for (u, d), (dt, nh) in itertools.product(every_choice(rows, dims), flags)]
    largest = (list(rows.values())[-1][-1], list(dims.values())[-1][-1])
    return ([Head(u, d) for u, d in corner_sweep(rows, dims)]
            + [Head(*largest, dt, nh) for dt, nh in flags])


def loss_cases(every: bool) -> list[Loss]:
    """As :func:`head_cases`, for the pair and the contrast kernel (a margin needs Bc == Br)."""
    comparisons = block_choices(*COMPARISONS)
    chosen, rejected = block_choices(*CHOSEN), block_choices(*REJECTED)
    objectives = tuple(K.OBJECTIVE_CODES)
    pair_flags = list(itertools.product(objectives, (True, False), (True, False)))
    if every:
        return ([Loss(p=p, objective=o, margin=m, cweight=w)
                 for (p,), (o, m, w) in itertools.product(every_choice(comparisons), pair_flags)]
                + [Loss(bc=bc, br=br, objective=o, margin=m, cweight=False)
                   for (bc, br), o, m in itertools.product(every_choice(chosen, rejected), objectives,
                                                           (True, False)) if bc == br or not m])
    largest_p = list(comparisons.values())[-1][-1]
    pairs = ([Loss(p=p) for (p,) in corner_sweep(comparisons)]
             + [Loss(p=largest_p, objective=o, margin=m, cweight=w) for o, m, w in pair_flags])
    contrast = [Loss(bc=bc, br=br, margin=bc == br, cweight=False)
                for bc, br in corner_sweep(chosen, rejected)]
    square = max(list(chosen.values())[-1][-1], list(rejected.values())[-1][-1])
    contrast += [Loss(bc=square, br=square, objective=o, margin=m, cweight=False)
                 for o in objectives for m in (True, False)]
    return pairs + contrast


def launch(head: Head, loss: Loss) -> None:
    """One forward and backward of the launcher (the kernels are recorders: nothing runs)."""
    h_dt, w_dt, b_dt = head.dtypes
    contrast = loss.p == 0
    n = max(head.u, loss.bc + loss.br if contrast else 2)
    hidden = torch.zeros(head.u + 1, head.d, dtype=h_dt)
    weight = torch.zeros(head.d, dtype=w_dt)
    bias = None if b_dt is None else torch.zeros(1, dtype=b_dt)
    positions = torch.arange(n) % head.u  # n responses on exactly u distinct rows
    if contrast:
        chosen, rejected = torch.arange(loss.bc) % n, (loss.bc + torch.arange(loss.br)) % n
        count = loss.bc
    else:
        chosen, rejected = torch.arange(loss.p) % n, (torch.arange(loss.p) + 1) % n
        count = loss.p
    inp = prepare_inputs(
        hidden, weight, bias, positions, chosen, rejected,
        torch.zeros(count) if loss.margin else None,
        torch.ones(count) if loss.cweight else None,
        options=LossOptions(loss.objective),
        contrast_weights=torch.ones(loss.bc, loss.br) if contrast else None)
    _, _, upos, coef = K._launch_forward(inp)
    K._launch_backward(inp.hidden, inp.weight, upos, coef, torch.ones(()), head.need_hidden)


class CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup``: a target, a device, a stream."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **constexprs)`` compiles instead of launching."""

    def __init__(self, name: str, kernel) -> None:
        self.name, self.kernel = name, kernel
        self.variants: dict[str, dict] = {}

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            assert compiled.asm["ptx"], self.name
            src = compiled.src
            key = repr((src.signature, sorted(src.constants.items()), sorted(src.attrs.items())))
            self.variants.setdefault(key, {
                "constexprs": dict(kwargs),
                # arguments Triton turned into constants itself (integers equal to 1)
                "specialized": sorted(self.kernel.arg_names[path[0]] for path in src.constants
                                      if self.kernel.arg_names[path[0]] not in kwargs),
                "pointers": {k: v for k, v in src.signature.items() if v.startswith("*")},
            })
        return compile_only


def _compile_share(job: tuple) -> dict[str, dict]:
    """Compiles launches ``worker::workers`` of the case list; returns the variants per kernel."""
    every, worker, workers = job
    recorders = {name: Recorder(name, getattr(K, name)) for name in KERNELS}
    for name, rec in recorders.items():
        setattr(K, name, rec)
    heads, losses = head_cases(every), loss_cases(every)
    for i in range(worker, max(len(heads), len(losses)), workers):
        launch(heads[i % len(heads)], losses[i % len(losses)])
    return {name: rec.variants for name, rec in recorders.items()}


def main(every: bool, workers: int = min(os.cpu_count() or 1, 8)) -> dict:
    """Compiles every variant (in ``workers`` forked processes: compiling is CPU-bound and
    Triton's on-disk cache is safe to share) and prints the summary."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    start = time.perf_counter()
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    jobs = [(every, w, workers) for w in range(workers)]
    if workers > 1:  # fork before this process runs any torch op (no thread pools to inherit)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            shares = pool.map(_compile_share, jobs)
    else:
        shares = [_compile_share(jobs[0])]
    variants = {name: {k: v for share in shares for k, v in share[name].items()} for name in KERNELS}
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "workers": workers,
        "launches": max(len(head_cases(every)), len(loss_cases(every))),
        "kernels": {name: {
            "variants": len(found),
            "constexprs": {c: sorted({v["constexprs"][c] for v in found.values()})
                           for c in next(iter(found.values()))["constexprs"]},
            "pointers": sorted({json.dumps(v["pointers"], sort_keys=True) for v in found.values()}),
            "specialized": sorted({a for v in found.values() for a in v["specialized"]}),
        } for name, found in variants.items()},
    }
    for name, info in summary["kernels"].items():
        print(f"{name}: {info['variants']} variants, constexprs {info['constexprs']}")
    print(f"compiled {sum(k['variants'] for k in summary['kernels'].values())} variants from "
          f"{summary['launches']} launcher runs in {summary['seconds']} s ({workers} processes)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(every="--all" in sys.argv[1:])
