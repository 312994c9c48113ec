"""Loads the native CPU extension built from ``kernels/`` (``fastrm._C``), or says why it is absent.

Ops registered there are reached as ``torch.ops.fastrm.<name>``. Callers ask :func:`available`
and fall back to torch code when it is ``False``; :func:`unavailable_reason` says why (not built,
built against another torch, ``FASTRM_DISABLE_NATIVE=1``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

ABI_VERSION = 1  # must match kernels/library.cpp

_loaded: bool | None = None
_reason: str = ""


def _load() -> bool:
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get("FASTRM_DISABLE_NATIVE") == "1":
        _reason = "disabled by FASTRM_DISABLE_NATIVE=1"
        return False
    spec = importlib.util.find_spec("fastrm._C")
    if spec is None or spec.origin is None:
        _reason = ("fastrm._C is not built; install with `pip install --no-build-isolation -e .` "
                   "on a machine with cmake and a C++ compiler")
        return False
    try:
        torch.ops.load_library(spec.origin)
        version = torch.ops.fastrm.abi_version()
    except (OSError, RuntimeError, AttributeError) as err:  # e.g. built against another torch
        _reason = f"fastrm._C at {spec.origin} failed to load: {err}; rebuild it"
        return False
    if version != ABI_VERSION:
        _reason = f"fastrm._C has ABI {version}, expected {ABI_VERSION}; rebuild it"
        return False
    _loaded = True
    return True


def available() -> bool:
    """True when the native extension is built, loadable and current."""
    return _load()


def unavailable_reason() -> str:
    """Why :func:`available` is ``False`` (empty when it is ``True``)."""
    _load()
    return _reason


def has_op(name: str) -> bool:
    """True when the extension is loaded and registers ``torch.ops.fastrm.<name>``."""
    return available() and hasattr(torch.ops.fastrm, name)
