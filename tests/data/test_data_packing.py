"""Planner (native == numpy, rows valid, fill), packed layout (indices, prefix sharing exact
against the unshared sequences by an emulation of the attention rule), padded baseline,
PackedPreferenceDataset (epoch coverage, determinism, resume, ranks)."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastrm import _native
from fastrm.data import (
    PackedPreferenceDataset, PreferenceGroup, collate_packed, collate_padded, pack_groups,
    plan_rows, plan_rows_arrays, split_group, GroupingStats,
)
from fastrm.data.packing import PackingStats

NATIVE = _native.has_op("plan_rows_bfd")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native extension without plan_rows_bfd: "
                                  f"{_native.unavailable_reason() or 'rebuild fastrm._C'}")


def long_tailed(n, rng, cap, median=180, sigma=0.9):
    return np.clip(np.ceil(rng.lognormal(np.log(median), sigma, size=n)), 2, cap).astype(np.int64)


def check_plan(rows, sizes, cap):
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(sizes)))  # every item exactly once
    for r in rows:
        assert r and sum(sizes[i] for i in r) <= cap


def first_fit_decreasing_rows(sizes, cap):
    """Independent reference (plain FFD) for the fill comparison."""
    room = []
    for s in sorted(sizes, reverse=True):
        for k, r in enumerate(room):
            if r >= s:
                room[k] -= s
                break
        else:
            room.append(cap - s)
    return len(room)


def bfd_reference(sizes, cap):
    """Independent per-item best-fit decreasing with FIFO ties (the documented rule), O(n * R)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    room, reached, rows = [], [], []  # per row: room left, when it reached that room, items
    clock = 0
    for i in order:
        best = None
        for k in range(len(rows)):
            if room[k] >= sizes[i] and (best is None or (room[k], reached[k]) < (room[best], reached[best])):
                best = k
        if best is None:
            rows.append([])
            room.append(cap)
            reached.append(0)
            best = len(rows) - 1
        rows[best].append(i)
        room[best] -= sizes[i]
        clock += 1
        reached[best] = clock
    return rows


def test_planner_small_hand_case():
    # sizes 5,3,4,2,6,1 into 8: BFD -> rows {6,2}, {5,3}, {4,1}
    rows = plan_rows([5, 3, 4, 2, 6, 1], 8, backend="numpy")
    assert rows == [[4, 3], [0, 1], [2, 5]]


@needs_native
def test_native_equals_numpy_random():
    rng = np.random.default_rng(1)
    for _ in range(200):
        cap = int(rng.integers(1, 300))
        sizes = rng.integers(1, cap + 1, size=int(rng.integers(0, 400)))
        a = plan_rows(sizes, cap, backend="native")
        assert a == plan_rows(sizes, cap, backend="numpy")
        check_plan(a, sizes, cap)
    sizes = long_tailed(50_000, rng, 2048)
    ia, oa = plan_rows_arrays(sizes, 2048, "native")
    ib, ob = plan_rows_arrays(sizes, 2048, "numpy")
    assert np.array_equal(ia, ib) and np.array_equal(oa, ob)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=120))))
def test_planner_properties(case):
    cap, sizes = case
    rows = plan_rows(sizes, cap, backend="numpy")
    check_plan(rows, sizes, cap)
    assert rows == bfd_reference(sizes, cap)
    # never fewer rows than the volume bound; and BFD is an any-fit rule: a row was opened only
    # when its first item fit no earlier row, so any two rows together hold more than cap
    assert len(rows) >= -(-sum(sizes) // cap)
    loads = sorted(sum(sizes[i] for i in r) for r in rows)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > cap
    if NATIVE:
        assert rows == plan_rows(sizes, cap, backend="native")


def test_fill_rate_long_tailed():
    rng = np.random.default_rng(0)
    sizes = long_tailed(20_000, rng, 4096)
    items, offsets = plan_rows_arrays(sizes, 4096)
    fill = sizes.sum() / ((len(offsets) - 1) * 4096)
    assert fill >= 0.95, fill
    # at least as good as plain first-fit decreasing on this mix
    small = sizes[:3000]
    _, off_small = plan_rows_arrays(small, 4096)
    assert len(off_small) - 1 <= first_fit_decreasing_rows(small.tolist(), 4096)


def test_planner_rejects_oversize():
    with pytest.raises(ValueError, match="item 1 has size 9"):
        plan_rows([3, 9], 8)


# ------------------------------------------------------------------------------ groups


def rand_group(rng, k=2, prompt_len=None, with_margin=True, pid=0):
    p = rng.randint(0, 12) if prompt_len is None else prompt_len
    prompt = [rng.randint(10, 99) for _ in range(p)]
    resp = [[rng.randint(10, 99) for _ in range(rng.randint(1, 9))] + [2] for _ in range(k)]
    comps = [(i, j, (rng.uniform(0, 2) if with_margin else None))
             for i in range(k) for j in range(k) if i < j and rng.random() < 0.8] or [(0, 1, 0.5 if with_margin else None)]
    return PreferenceGroup(prompt, resp, comps, prompt_id=pid, source_index=pid)


def visible_sequences(batch):
    """Emulates the attention rule of PackedBatch: the (token, position) sequence the token at
    each reward position sees (prefix range, then its own segment up to itself)."""
    cu = batch.cu_seqlens.tolist()
    tok = batch.tokens[0].tolist()
    pos = batch.position_ids[0].tolist()
    seg_of = {}
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            seg_of[t] = s
    out = []
    for t in batch.reward_positions.tolist():
        s = seg_of[t]
        a, b = batch.segment_prefix[s].tolist()
        idx = list(range(a, b)) + list(range(cu[s], t + 1))
        out.append([(tok[i], pos[i]) for i in idx])
    return out


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_collate_packed_layout_is_exact(prefix_sharing):
    rng = random.Random(7)
    groups = [rand_group(rng, k=rng.choice([2, 2, 3, 4]), pid=i) for i in range(12)]
    groups.append(rand_group(rng, prompt_len=0, pid=12))  # prompt-free pair
    groups.append(PreferenceGroup([], [[5], [6]], [(1, 0, 0.1)], prompt_id=13))  # one-token
    groups.append(PreferenceGroup([7], [[5], [6]], [(0, 1, 0.3)], prompt_id=14))
    b = collate_packed(groups, prefix_sharing=prefix_sharing)
    b.validate()
    seqs = [g.sequence(k) for g in groups for k in range(g.num_responses)]
    assert b.reward_positions.numel() == len(seqs)
    # every reward token sees exactly the unshared sequence at positions 0..n-1
    for want, got in zip(seqs, visible_sequences(b)):
        assert got == [(t, p) for p, t in enumerate(want)]
    # comparisons point at the right responses, margins and groups carried
    base, k = [], 0
    for g in groups:
        base.append(k)
        k += g.num_responses
    exp = [(base[gi] + i, base[gi] + j, m, gi) for gi, g in enumerate(groups)
           for i, j, m in g.comparisons]
    assert b.chosen_index.tolist() == [e[0] for e in exp]
    assert b.rejected_index.tolist() == [e[1] for e in exp]
    assert b.margin.tolist() == pytest.approx([e[2] for e in exp])
    assert b.group_index.tolist() == [e[3] for e in exp]
    assert b.prompt_ids.tolist() == [g.prompt_id for g in groups for _ in g.responses]
    shared = sum((g.num_responses - 1) * len(g.prompt_tokens) for g in groups
                 if g.prompt_tokens and prefix_sharing)
    assert b.prompt_tokens_saved == shared
    assert b.num_tokens == sum(g.num_tokens(prefix_sharing) for g in groups)
    assert b.has_prefix == prefix_sharing


def test_prefix_layout_segments_decode_to_prompt_and_responses():
    g = PreferenceGroup([11, 12, 13], [[21, 2], [31, 32, 2]], [(0, 1, None)])
    b = collate_packed([g], prefix_sharing=True)
    assert b.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert b.segment_prefix.tolist() == [[0, 0], [0, 3], [0, 3]]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b.reward_positions.tolist() == [4, 7] and b.margin is None
    assert b.tokens[0, b.reward_positions].tolist() == [2, 2]


@pytest.mark.parametrize("collate", [collate_packed, collate_padded], ids=["packed", "padded"])
def test_bad_comparisons_are_named_by_both_collators(collate):
    g1 = PreferenceGroup([1], [[2], [3]], [(0, 1, 1.0)], source_index=7)
    g2 = PreferenceGroup([1], [[2], [3], [4]], [(0, 1, 0.5), (2, 1, None)], source_index=12)
    with pytest.raises(ValueError, match=r"margin is set for some comparisons but not others "
                                         r"\(comparison 2 of group 1, row 12\)"):
        collate([g1, g2])
    empty = PreferenceGroup([1], [[2], []], [(0, 1, None)], source_index=3)
    with pytest.raises(ValueError, match=r"group 1 \(row 3\) has an empty response"):
        collate([g2, empty])


def test_collators_attach_prompt_embeddings_labels_and_categories():
    rng = random.Random(4)
    groups = [rand_group(rng, k=rng.choice([2, 3]), pid=i) for i in range(7)]
    for i, g in enumerate(groups):
        g.category = "" if i % 3 == 0 else f"c{i % 2}"
    groups[2].labels = [1] * len(groups[2].responses)
    emb = torch.randn(len(groups), 5)
    want_emb = torch.stack([emb[i] for i, g in enumerate(groups) for _ in g.responses])
    want_labels = [1 if i == 2 else 0 for i, g in enumerate(groups) for _ in g.responses]
    want_cats = [g.category or None for g in groups for _ in g.comparisons]
    for b in (collate_packed(groups, prompt_embeddings=emb),
              collate_padded(groups, prompt_embeddings=emb)):
        assert torch.equal(b.prompt_embeddings, want_emb)
        assert b.labels.tolist() == want_labels and b.categories == want_cats
    plain = collate_packed(groups[3:4])
    assert plain.prompt_embeddings is None and plain.labels is None
    with pytest.raises(ValueError, match="one row per group"):
        collate_packed(groups, prompt_embeddings=emb[:3])


def test_packed_dataset_attaches_each_groups_prompt_embedding():
    """Every scored response of a step carries its source group's embedding, also when an
    oversize group was split into subgroups."""
    rng = random.Random(5)
    big = PreferenceGroup([5] * 8, [[7] * 30 + [2] for _ in range(5)],
                          [(0, k, None) for k in range(1, 5)], prompt_id=0, source_index=0)
    groups = [big] + [rand_group(rng, with_margin=False, pid=i) for i in range(1, 30)]
    emb = torch.randn(len(groups), 6, dtype=torch.float64)
    ds = PackedPreferenceDataset(groups, 80, rows_per_step=2, prefix_sharing=True,
                                 prompt_embeddings=emb, seed=1)
    assert ds.stats.split_groups == 1
    for i in range(len(ds)):
        b = ds[i]
        b.validate()
        want = [emb[g.prompt_id] for g in ds.step_groups(i) for _ in g.responses]
        assert torch.equal(b.prompt_embeddings, torch.stack(want))


def test_collate_padded_baseline():
    rng = random.Random(3)
    groups = [rand_group(rng, k=rng.choice([2, 3]), pid=i) for i in range(6)]
    b = collate_padded(groups, pad_id=0)
    seqs = [g.sequence(k) for g in groups for k in range(g.num_responses)]
    L = max(map(len, seqs))
    assert b.tokens.shape == (len(seqs), L)
    for k, s in enumerate(seqs):
        assert b.tokens[k, :len(s)].tolist() == s and b.tokens[k, len(s):].eq(0).all()
        assert b.tokens[k, b.reward_positions[k]] == s[-1]
    assert b.num_padding_tokens == len(seqs) * L - sum(map(len, seqs))
    # same comparisons as the packed batch
    p = collate_packed(groups)
    assert torch.equal(b.chosen_index, p.chosen_index) and torch.equal(b.rejected_index, p.rejected_index)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.integers(24, 80))
def test_pack_groups_whole_groups(seed, prefix_sharing, cap):
    rng = random.Random(seed)
    groups = [rand_group(rng, k=2, pid=i) for i in range(rng.randint(1, 40))]
    groups = [g for g in groups if g.num_tokens(prefix_sharing) <= cap]
    stats = PackingStats()
    rows = pack_groups(groups, cap, prefix_sharing, stats=stats)
    assert sorted(i for r in rows for i in r) == list(range(len(groups)))
    for r in rows:
        b = collate_packed([groups[i] for i in r], prefix_sharing)
        b.validate()
        assert b.num_tokens <= cap
    assert stats.tokens == sum(g.num_tokens(prefix_sharing and bool(g.prompt_tokens)) for g in groups)


def test_prefix_sharing_saves_prompt_tokens_in_rows():
    rng = random.Random(0)
    groups = [rand_group(rng, k=2, prompt_len=40, pid=i) for i in range(200)]
    s_plain, s_shared = PackingStats(), PackingStats()
    pack_groups(groups, 512, False, stats=s_plain)
    pack_groups(groups, 512, True, stats=s_shared)
    assert s_plain.tokens - s_shared.tokens == 40 * 200 == s_shared.prompt_tokens_saved
    assert s_shared.rows < s_plain.rows


def test_split_group_keeps_prompt_and_serves_every_comparison():
    rng = random.Random(4)
    splits = 0
    for trial in range(30):
        k = rng.randint(3, 8)
        g = PreferenceGroup([9] * rng.randint(0, 12),
                            [[1] * rng.randint(1, 25) + [2] for _ in range(k)],
                            [(i, j, float(i - j)) for i in range(k) for j in range(k)
                             if i != j and rng.random() < 0.4] or [(0, 1, 1.0)], source_index=trial)
        for prefix in (True, False):
            p = len(g.prompt_tokens)
            cap = max(p + 60, (2 * p if not prefix else p) + 2 * 26)
            stats = GroupingStats()
            parts = split_group(g, cap, prefix, stats)
            assert all(x.prompt_tokens == g.prompt_tokens for x in parts)
            assert all(x.num_tokens(prefix) <= cap for x in parts)
            # every comparison served exactly once, by the same token sequences
            served = sorted((tuple(x.responses[i]), tuple(x.responses[j]), m)
                            for x in parts for i, j, m in x.comparisons)
            want = sorted((tuple(g.responses[i]), tuple(g.responses[j]), m)
                          for i, j, m in g.comparisons)
            assert served == want
            if parts == [g]:  # fits: returned as is
                assert g.num_tokens(prefix) <= cap and stats.repeated_responses == 0
                continue
            splits += 1
            copies = sum(x.num_responses for x in parts)
            used = len({k for i, j, _ in g.comparisons for k in (i, j)})
            assert copies - used == stats.repeated_responses
    assert splits >= 20  # the random cases do exercise splitting
    with pytest.raises(ValueError, match="pair needs"):
        split_group(PreferenceGroup([1] * 50, [[2], [3]], [(0, 1, None)]), 40, True)


# ------------------------------------------------------------------------------ dataset


def make_groups(n, seed=0):
    rng = random.Random(seed)
    return [rand_group(rng, k=rng.choice([2, 2, 2, 3]), pid=i // 2) for i in range(n)]


def step_keys(ds):
    return [[id(g) for g in ds.step_groups(i)] for i in range(len(ds))]


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_packed_dataset_epoch_covers_every_group_once(prefix_sharing):
    groups = make_groups(300)
    ds = PackedPreferenceDataset(groups, max_seq_len=96, rows_per_step=3,
                                 prefix_sharing=prefix_sharing, seed=1)
    seen = []
    for i in range(len(ds)):
        b = ds[i]
        b.validate()
        assert b.num_tokens <= 3 * 96 and len(ds.steps[i]) <= 3
        seen.extend(id(g) for g in ds.step_groups(i))
    assert sorted(seen) == sorted(id(g) for g in groups)
    assert ds.stats.fill_rate > 0.9


def test_packed_dataset_deterministic_epochs_and_resume():
    groups = make_groups(200)
    a = PackedPreferenceDataset(groups, 128, rows_per_step=2, seed=5)
    b = PackedPreferenceDataset(groups, 128, rows_per_step=2, seed=5)
    assert step_keys(a) == step_keys(b)
    a.set_epoch(1)
    assert step_keys(a) != step_keys(b)
    # resume: consume 4 steps of epoch 1, checkpoint, restore into a fresh object
    it = iter(a.dataloader())
    consumed = [next(it) for _ in range(4)]
    state = a.state_dict(steps_done=4)
    c = PackedPreferenceDataset(groups, 128, rows_per_step=2, seed=5)
    c.load_state_dict(state)
    rest = list(c.dataloader())
    assert len(consumed) + len(rest) == len(a)
    for k, batch in enumerate(rest):
        assert torch.equal(batch.tokens, a[4 + k].tokens)
    with pytest.raises(ValueError, match="seed"):
        PackedPreferenceDataset(groups, 128, rows_per_step=2, seed=6).load_state_dict(state)


def test_packed_dataset_ranks_partition_steps():
    groups = make_groups(150)
    full = PackedPreferenceDataset(groups, 64, rows_per_step=1, seed=2)
    r0 = PackedPreferenceDataset(groups, 64, rows_per_step=1, seed=2, rank=0, world_size=2)
    r1 = PackedPreferenceDataset(groups, 64, rows_per_step=1, seed=2, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(full) // 2
    assert step_keys(r0) + step_keys(r1) != []
    assert sorted(map(tuple, step_keys(r0) + step_keys(r1))) == sorted(
        map(tuple, step_keys(full)[: 2 * len(r0)]))


def test_packed_dataset_splits_oversize_groups():
    rng = random.Random(0)
    big = PreferenceGroup([5] * 8, [[7] * 30 + [2] for _ in range(5)],
                          [(0, k, None) for k in range(1, 5)], prompt_id=0, source_index=0)
    groups = [big] + [rand_group(rng, with_margin=False, pid=i) for i in range(1, 20)]
    ds = PackedPreferenceDataset(groups, 80, rows_per_step=1, prefix_sharing=True)
    assert ds.stats.split_groups == 1 and ds.stats.repeated_responses >= 1
    total = sum(ds[i].num_comparisons for i in range(len(ds)))
    assert total == sum(g.num_comparisons for g in groups)


def test_token_budget_per_step():
    groups = make_groups(100)
    ds = PackedPreferenceDataset(groups, 64, tokens_per_step=200, seed=0)
    assert ds.rows_per_step == 3
    assert all(ds[i].num_tokens <= 192 for i in range(len(ds)))
    with pytest.raises(ValueError, match="tokens_per_step"):
        PackedPreferenceDataset(groups, 64, tokens_per_step=10)


def test_packed_dataloader_with_worker():
    groups = make_groups(60)
    ds = PackedPreferenceDataset(groups, 96, rows_per_step=2, seed=3)
    got = list(ds.dataloader(num_workers=1))
    assert len(got) == len(ds)
    for k, b in enumerate(got):
        assert torch.equal(b.tokens, ds[k].tokens) and torch.equal(b.cu_seqlens, ds[k].cu_seqlens)
