"""Settings for the fused-op tests.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the Triton kernels on CPU. It must be on
before ``triton`` is *first imported* (``triton.language`` itself is built differently in
interpreter mode, and torchtune / torchao import triton), so it is set here at import time,
and also by the repository-wide ``tests/conftest.py`` (loaded first in a full run). On a CUDA
machine nothing is set and the compiled kernels run. ``setdefault`` keeps an explicit
``TRITON_INTERPRET=0`` from the caller.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
