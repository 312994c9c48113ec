"""Every block size the Triton launcher can pick, run (interpreter on CPU) against float64.

The block choices come from the launcher's own rule (``triton_variants.block_choices`` over
:func:`fastrm.ops.head_loss_triton.block_size`); each case uses the smallest sizes that make
the launcher pick them, and a spy on the kernel launches checks that it did. The cases cycle
through every ``(hidden, weight, bias)`` dtype combination the op accepts. The reference is
``fastrm.functional`` with autograd in float64 (``test_fused_reward_head.reference``).
"""

from __future__ import annotations

import pytest
import torch

import triton_variants as V
from fastrm.ops import head_loss_triton as tri
from test_fused_reward_head import ALL_BACKENDS, Case, _gen, check

TRITON = [b for b in ALL_BACKENDS if getattr(b, "values", (b,))[0] == "triton"]
AXES = {"rows": V.ROWS, "dims": V.HIDDEN_DIM, "comparisons": V.COMPARISONS,
        "chosen": V.CHOSEN, "rejected": V.REJECTED}
CHOICES = {axis: list(V.block_choices(*blocks).items()) for axis, blocks in AXES.items()}
DTYPES = [dt for dt, _ in V.head_flags()]


def _cases() -> list[tuple[str, dict, dict]]:
    """``(id, sizes, expected blocks)``: pair cases zip rows x dims x comparisons, contrast cases
    rows x dims x chosen x rejected (shorter axes cycle), so every choice of every axis runs."""
    out = []
    for mode, axes in (("pair", ("rows", "dims", "comparisons")),
                       ("contrast", ("rows", "dims", "chosen", "rejected"))):
        for i in range(max(len(CHOICES[a]) for a in axes)):
            sizes, blocks = {}, {}
            for axis in axes:
                key, choice_sizes = CHOICES[axis][i % len(CHOICES[axis])]
                sizes[axis] = choice_sizes[0]
                blocks.update(zip(AXES[axis], key))
            out.append((f"{mode}-" + "-".join(f"{a}{s}" for a, s in sizes.items()), sizes, blocks))
    return out


CASES = _cases()


def test_axes_name_every_block_with_a_choice():
    """A new ``BLOCK_*`` in the launcher's table must join an axis here (or have one value)."""
    named = {block for blocks in AXES.values() for block in blocks}
    for kernel, blocks in tri.BLOCKS.items():
        for name in blocks:
            assert (kernel, name) in named or len(V.block_choices((kernel, name))) == 1, (kernel, name)


def test_cases_cover_every_block_choice():
    for axis, blocks in AXES.items():
        for kernel, name in blocks:
            ran = {want[(kernel, name)] for _, _, want in CASES if (kernel, name) in want}
            assert ran == {b for (b,) in V.block_choices((kernel, name))}, (kernel, name)


def make_bucket_case(sizes: dict, dtypes: tuple, key: str) -> Case:
    """Random batch with exactly ``rows`` distinct scored rows of ``hidden [rows + 3, dims]``."""
    g = _gen(key, "bucket")
    h_dt, w_dt, b_dt = dtypes
    u, d = sizes["rows"], sizes["dims"]
    t = u + 3
    hidden = torch.randn(t, d, generator=g).to(h_dt)
    weight = (torch.randn(d, generator=g) / d ** 0.5).to(w_dt)
    bias = None if b_dt is None else torch.randn(1, generator=g).to(b_dt)
    contrast = "chosen" in sizes
    n = max(u, sizes["chosen"] + sizes["rejected"] if contrast else 2)
    rows = torch.randperm(t, generator=g)[:u]
    positions = rows[torch.cat([torch.arange(u), torch.randint(0, u, (n - u,), generator=g)])]
    if contrast:
        bc, br = sizes["chosen"], sizes["rejected"]
        order = torch.randperm(n, generator=g)  # n >= bc + br distinct responses
        chosen, rejected = order[:bc], order[bc:bc + br]
        return Case(hidden, weight, bias, positions, chosen, rejected,
                    margin=torch.rand(bc, generator=g) if bc == br else None,
                    contrast=torch.softmax(torch.randn(bc, br, generator=g) * 2, dim=-1))
    p = sizes["comparisons"]
    chosen = torch.randint(0, n, (p,), generator=g)
    rejected = (chosen + torch.randint(1, n, (p,), generator=g)) % n
    return Case(hidden, weight, bias, positions, chosen, rejected,
                margin=torch.rand(p, generator=g), cweight=torch.rand(p, generator=g) + 0.05)


class LaunchSpy:
    """Wraps a kernel: records the ``BLOCK_*`` constexprs of each launch, then launches it."""

    def __init__(self, name: str, kernel, log: list) -> None:
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def spy(*args, **kwargs):
            self.log.append({(self.name, k): v for k, v in kwargs.items() if k.startswith("BLOCK")})
            return launch(*args, **kwargs)
        return spy


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_block_choice_matches_reference(backend, index, monkeypatch):
    name, sizes, want = CASES[index]
    dtypes = DTYPES[index % len(DTYPES)]
    case = make_bucket_case(sizes, dtypes, name)
    log: list[dict] = []
    for kernel in tri.BLOCKS:
        monkeypatch.setattr(tri, kernel, LaunchSpy(kernel, getattr(tri, kernel), log))
    check(case, backend, centering_coefficient=0.02,
          **({"objective": "hinge", "hinge_margin": 0.5} if index % 2 else {"label_smoothing": 0.1}))
    picked = {k: v for launch in log for k, v in launch.items()}
    assert {k: picked.get(k) for k in want} == want, f"launcher picked {picked}, built for {want}"
