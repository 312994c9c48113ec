"""Test helper: random packed layouts (plain sequences and prompts shared by responses)."""

from __future__ import annotations

import random
from typing import Optional

import torch


def random_layout(rng: random.Random, with_prefix: bool, max_len: int = 9, *,
                  groups: tuple[int, int] = (2, 5), prefix_prob: float = 0.6,
                  responses: tuple[int, int] = (1, 3), response_max: Optional[int] = None):
    """Random segments: plain sequences and (if ``with_prefix``) prompt + responses groups.

    ``groups``: range of the number of top-level items; each is a plain sequence or, with
    probability ``prefix_prob``, a prompt followed by ``responses`` responses that use it as
    prefix. Lengths are 1 or uniform in ``[1, max_len]`` (responses: ``[1, response_max]``).

    Returns ``cu_seqlens [S+1] int32``, ``segment_prefix [S, 2] int32``."""
    response_max = max_len if response_max is None else response_max
    lens, prefix = [], []
    t = 0
    for _ in range(rng.randint(*groups)):
        if with_prefix and rng.random() < prefix_prob:
            p = rng.randint(1, max_len)
            lens.append(p)
            prefix.append((0, 0))
            start = t
            t += p
            for _ in range(rng.randint(*responses)):
                n = rng.choice([1, rng.randint(1, response_max)])
                lens.append(n)
                prefix.append((start, start + p))
                t += n
        else:
            n = rng.choice([1, rng.randint(1, max_len)])
            lens.append(n)
            prefix.append((0, 0))
            t += n
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu, torch.tensor(prefix, dtype=torch.int32)
