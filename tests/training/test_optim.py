"""fastrm.optim.AdamW against torch.optim.AdamW in float64, and its stochastic rounding against
the two bf16 neighbours of each value and their expected value."""

import pytest
import torch

from fastrm.optim import AdamW, stochastic_round_to_bf16


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value, from bf16 round-to-nearest
    and nextafter (an independent route to the same two numbers)."""
    near = x.to(torch.bfloat16).to(torch.float32)
    step_up = torch.nextafter(near.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16))
    step_dn = torch.nextafter(near.to(torch.bfloat16), torch.tensor(float("-inf"), dtype=torch.bfloat16))
    lo = torch.where(near <= x, near, step_dn.float())
    hi = torch.where(near >= x, near, step_up.float())
    return lo, hi


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-6, 3, 64)
    x[::7] *= -1
    lo, hi = _bf16_neighbours(x)
    draws = torch.stack([stochastic_round_to_bf16(x, generator=g).float() for _ in range(4000)])
    assert ((draws == lo) | (draws == hi)).all()
    # E[round(x)] = x: the mean of 4000 draws lies within 5 standard errors of x
    p_up = ((x.double() - lo.double()) / (hi.double() - lo.double())).nan_to_num(0.0)
    sd = (hi.double() - lo.double()) * (p_up * (1 - p_up)).sqrt() / 4000 ** 0.5
    assert ((draws.double().mean(0) - x.double()).abs() <= 5 * sd + 1e-30).all()
    # exact bf16 values come back unchanged
    exact = x.to(torch.bfloat16)
    assert torch.equal(stochastic_round_to_bf16(exact.float(), generator=g), exact)
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round_to_bf16(x.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_update_equals_torch_adamw(dtype, tol):
    """fp64 / fp32 parameters get exactly AdamW's update (no rounding), against torch.optim.AdamW
    in float64 on the same fresh random gradients, with weight decay and two param groups."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(17, 5, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)]
    ours = [torch.nn.Parameter(t.to(dtype)) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    opt = AdamW([{"params": [ours[0]], "weight_decay": 0.1}, {"params": [ours[1]], "weight_decay": 0.0}], **kw)
    ref_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1},
                                 {"params": [ref[1]], "weight_decay": 0.0}], **kw)
    for _ in range(6):
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in init]
        for p, r, gr in zip(ours, ref, grads):
            p.grad, r.grad = gr.to(dtype), gr.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double(), r.detach(), rtol=tol, atol=tol)
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.promote_types(dtype, torch.float32)


def test_bf16_weights_follow_small_updates_that_round_to_nearest_loses():
    """Updates far below half a bf16 ulp: round-to-nearest (torch.optim.AdamW on bf16 weights)
    never moves the weights, stochastic rounding tracks the float64 trajectory."""
    g = torch.Generator().manual_seed(2)
    w0 = (torch.rand(4096, generator=g, dtype=torch.float64) + 1.0)  # |w| in [1, 2): ulp 2^-7
    grad = torch.randn(4096, generator=g, dtype=torch.float64).sign()  # Adam steps ~ lr each
    lr, steps = 2e-4, 200  # 2e-4 << ulp/2 = 3.9e-3
    ours = torch.nn.Parameter(w0.to(torch.bfloat16))
    nearest = torch.nn.Parameter(w0.to(torch.bfloat16))
    ref = torch.nn.Parameter(w0.clone())
    opts = [AdamW([ours], lr=lr, weight_decay=0.0),
            torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0),
            torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)]
    for _ in range(steps):
        for p, o in zip((ours, nearest, ref), opts):
            p.grad = grad.to(p.dtype)
            o.step()
    assert torch.equal(nearest.detach(), w0.to(torch.bfloat16))  # stuck: every update rounded away
    off = torch.nn.Parameter(w0.to(torch.bfloat16))  # stochastic_rounding=False: nearest, stuck too
    off_opt = AdamW([off], lr=lr, weight_decay=0.0, stochastic_rounding=False)
    for _ in range(steps):
        off.grad = grad.to(torch.bfloat16)
        off_opt.step()
    assert torch.equal(off.detach(), w0.to(torch.bfloat16))
    # each weight walks randomly around the float64 trajectory (a few ulps after 200 steps), but
    # the walk is unbiased: the mean distance moved against the gradient matches float64's
    # (~ lr * steps = 0.04) far within its standard error (~0.017 / sqrt(4096))
    start = w0.to(torch.bfloat16).double()
    want = ((start - ref.detach()) * grad).mean()
    got = ((start - ours.detach().double()) * grad).mean()
    assert abs(got - want) < 0.03 * want, (float(got), float(want))
    assert ours.dtype == torch.bfloat16


def test_state_dict_round_trip_continues_the_same_trajectory():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(300, generator=g)
    grads = [torch.randn(300, generator=g) for _ in range(6)]

    def run(split: bool, seed: int = 0) -> torch.Tensor:
        p = torch.nn.Parameter(w0.to(torch.bfloat16))
        opt = AdamW([p], lr=1e-3, seed=seed)
        for i, gr in enumerate(grads):
            if split and i == 3:  # a new process: fresh optimizer, the state dict, other RNG draws
                state = opt.state_dict()
                p = torch.nn.Parameter(p.detach().clone())
                opt = AdamW([p], lr=1e-3, seed=seed)
                opt.load_state_dict(state)
                torch.rand(7)
            p.grad = gr.to(torch.bfloat16)
            opt.step()
            if split and i == 3:
                assert opt.state[p]["exp_avg"].dtype == torch.float32  # torch would cast to bf16
        return p.detach()

    assert torch.equal(run(split=False), run(split=True))
    assert not torch.equal(run(split=False), run(split=False, seed=1))  # the seed is used


def test_the_global_rng_is_left_alone():
    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    p.grad = torch.randn(1000).to(torch.bfloat16)
    before = torch.get_rng_state()
    AdamW([p], lr=1e-3).step()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kw,match", [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
                                      ({"eps": -1.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay"),
                                      ({"lr": torch.tensor(1e-3)}, "float")])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdamW([torch.nn.Parameter(torch.zeros(2))], **kw)
