"""Test helper: lays sequences / prompt groups out as a :class:`PackedBatch` by hand.

Independent of ``fastrm.data`` (the real packer): written straight from the PackedBatch
docstring so the model tests do not depend on the packer being right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrm.data.batch import PackedBatch


@dataclass
class Layout:
    batch: PackedBatch
    #: for every response (in reward order): packed indices of its response tokens
    response_index: list[torch.Tensor]


def pack_sequences(seqs: list[torch.Tensor]) -> PackedBatch:
    """Stand-alone sequences end to end; reward at each last token; pairs (0, 1), (2, 3), ..."""
    return pack_groups([(torch.zeros(0, dtype=torch.long), [s]) for s in seqs], share=False).batch


def pack_groups(
    groups: list[tuple[torch.Tensor, list[torch.Tensor]]], share: bool
) -> Layout:
    """Each group is ``(prompt, [responses])``.

    ``share=True``: ``[prompt][r1]...[rK]``, responses with the prompt as prefix and positions
    continuing from the prompt length (an empty prompt gives plain response segments).
    ``share=False``: every response as its own segment ``prompt + response``.
    Rewards at each response's last token. Comparisons: response 0 of a group preferred over
    each other response of the group; with one response per group, consecutive groups pair up.
    """
    tokens, pos, lens, prefix, reward_pos, resp_index = [], [], [], [], [], []
    chosen, rejected, group_id = [], [], []
    t = 0
    single = []
    for gi, (prompt, responses) in enumerate(groups):
        p = int(prompt.numel())
        first_reward = len(reward_pos)
        if share and p:
            tokens.append(prompt)
            pos.append(torch.arange(p))
            lens.append(p)
            prefix.append((0, 0))
            p_start = t
            t += p
        for r in responses:
            n = int(r.numel())
            if share:
                seg = r
                start_pos = p
                pre = (p_start, p_start + p) if p else (0, 0)
                own_resp_offset = 0
            else:
                seg = torch.cat([prompt, r])
                start_pos = 0
                pre = (0, 0)
                own_resp_offset = p
            tokens.append(seg)
            pos.append(torch.arange(start_pos, start_pos + seg.numel()))
            lens.append(int(seg.numel()))
            prefix.append(pre)
            resp_index.append(torch.arange(t + own_resp_offset, t + own_resp_offset + n))
            t += int(seg.numel())
            reward_pos.append(t - 1)
        if len(responses) > 1:
            for j in range(1, len(responses)):
                chosen.append(first_reward)
                rejected.append(first_reward + j)
                group_id.append(gi)
        else:
            single.append(first_reward)
    for a, b in zip(single[0::2], single[1::2]):
        chosen.append(a)
        rejected.append(b)
        group_id.append(len(group_id))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    batch = PackedBatch(
        tokens=torch.cat(tokens).long().unsqueeze(0),
        position_ids=torch.cat(pos).long().unsqueeze(0),
        cu_seqlens=cu,
        segment_prefix=torch.tensor(prefix, dtype=torch.int32).reshape(-1, 2),
        reward_positions=torch.tensor(reward_pos, dtype=torch.int64),
        chosen_index=torch.tensor(chosen, dtype=torch.int64),
        rejected_index=torch.tensor(rejected, dtype=torch.int64),
        group_index=torch.tensor(group_id, dtype=torch.int64),
    )
    batch.validate()
    return Layout(batch, resp_index)


def random_tokens(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=gen)
