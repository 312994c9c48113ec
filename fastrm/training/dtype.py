"""The one dtype rule of fastrm's recipes (training, decompose) and benchmarks."""

from __future__ import annotations

import torch

#: config names -> dtypes (``auto`` is resolved per device by :func:`resolve_dtype`)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on CUDA with bf16 support and on CPUs whose matmul is fast in bf16
    (AVX-512 BF16 / AMX), fp32 elsewhere (on AVX2-only CPUs bf16 matmul is hundreds of times
    slower than fp32). Otherwise the named dtype (:data:`DTYPES`); bf16 on a GPU without bf16
    support is an error."""
    device = torch.device(device)
    name = str(name)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not known; choose auto or one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype={name} but this GPU has no bf16 support; use fp32 or auto")
    return dtype


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles: bf16 matmul at least as fast as fp32 (elsewhere, e.g. AVX2,
    it is emulated and hundreds of times slower)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: no probe, assume not
        return False
