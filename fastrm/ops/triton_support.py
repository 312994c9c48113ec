"""What the Triton kernels of the lean layer ops share: the import guard and launch sizes.

``rms_norm_triton``, ``swiglu_triton`` and ``rope_triton`` import triton through here, so the
package imports on machines without it (the ops then report the Triton path unavailable and
use their other backends). On CPU tensors the kernels run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported; the tests do this): the op modules
choose Triton for CUDA tensors only, the tests call it on CPU tensors on purpose.
"""

from __future__ import annotations

import functools
import types

import torch

try:  # importable without triton (e.g. macOS)
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = ""
except ImportError as err:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    tl = types.SimpleNamespace(constexpr=object)
    TRITON_IMPORT_ERROR = f"triton is not importable ({err})"

#: activation dtypes the layer-op kernels take (math in fp32, results in the input's dtype)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def jit(fn):
    """``triton.jit`` when triton imports, else the plain function (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


@jit
def _probe_kernel():
    pass


def interpreted() -> bool:
    """True when ``triton.jit`` built interpreter functions (``TRITON_INTERPRET=1`` was set
    before triton was first imported), so the kernels run on CPU tensors."""
    return triton is not None and type(_probe_kernel).__name__ == "InterpretedFunction"


def triton_ok(t: torch.Tensor) -> bool:
    """True when the layer ops should run ``t`` with their Triton kernels: a CUDA tensor of a
    :data:`TRITON_DTYPES` dtype, triton importable, and not inside a ``torch.compile`` trace
    (inductor gets the plain torch formulas and fuses them itself)."""
    return (t.is_cuda and t.dtype in TRITON_DTYPES and triton is not None
            and not torch.compiler.is_compiling())


def pow2(n: int, cap: int, floor: int = 1) -> int:
    """The power of two ``>= n`` clamped to ``[floor, cap]``."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def num_warps(block: int) -> int:
    """Warps for a program that holds ``block`` elements per row (Triton's usual sizes)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work: int) -> int:
    """Programs for a grid-stride kernel over ``work`` items: one per SM (times 2) on CUDA,
    a handful in the interpreter (every program costs Python time there)."""
    if device.type == "cuda":
        return max(1, min(work, 2 * _sm_count(device.index if device.index is not None
                                               else torch.cuda.current_device())))
    return max(1, min(work, 4))
