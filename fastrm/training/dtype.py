"""The one dtype rule of fastrm's recipes (training, decompose) and benchmarks.

:func:`resolve_dtype` turns a config's ``dtype`` (``auto`` in the shipped configs) into a torch
dtype for the run's device; :func:`enable_tf32` lets fp32 runs on CUDA use TF32 tensor cores.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

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


def enable_tf32(device: torch.device | str, dtype: torch.dtype) -> bool:
    """fp32 on CUDA: let matmuls and cuDNN convolutions use TF32 tensor cores, as torchtune and
    transformers' ``tf32=True`` do (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cudnn.allow_tf32``); fp32 matmuls otherwise run on the CUDA cores, several
    times slower on Ampere and newer. A matmul precision the user already lowered (``medium``)
    is kept; ``NVIDIA_TF32_OVERRIDE=0`` in the environment turns TF32 off in cuBLAS / cuDNN for
    anyone who needs full fp32 products. Nothing changes on CPU or in bf16 / fp16.

    Returns True when the flags were set."""
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        return False
    if torch.get_float32_matmul_precision() == "highest":  # PyTorch's default
        torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    log.info("dtype fp32 on CUDA: TF32 matmuls and convolutions enabled (float32 matmul "
             "precision %r; NVIDIA_TF32_OVERRIDE=0 turns TF32 off)",
             torch.get_float32_matmul_precision())
    return True
