"""The in-process sections of ``gpu_check.py``: fastrm's CUDA kernels against float64 references.

Each section is a generator of :class:`Case` results, one per comparison; ``gpu_check.py`` runs
them, times them and writes the report. Every comparison reports the error measure it used, its
value and the tolerance; sizes come from :class:`Sizes` (``Sizes.gpu()`` for an H100 / H200,
``Sizes.dry()`` for the CPU dry run through Triton's interpreter).

Error measure everywhere: ``max |got - want| / max(max |want|, floor)`` (``rel_err``), computed
in float64 on the device.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

SKIP, PASS, FAIL = "skip", "pass", "fail"


@dataclass
class Case:
    """One comparison: ``status`` is ``pass`` when ``max_err <= tol``."""

    section: str
    name: str
    status: str
    max_err: Optional[float] = None
    tol: Optional[float] = None
    seconds: float = 0.0
    detail: str = ""


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-6) -> float:
    """``max |got - want| / max(max |want|, floor)`` in float64."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    scale = max(float(want.abs().max()), floor)
    return float((got - want).abs().max()) / scale


def judged(section: str, name: str, err: float, tol: float, seconds: float, detail: str = "") -> Case:
    ok = math.isfinite(err) and err <= tol
    return Case(section, name, PASS if ok else FAIL, err, tol, seconds, detail)


@dataclass
class Sizes:
    """Problem sizes of every section. ``gpu()``: the real check; ``dry()``: tiny, for CPU."""

    dry_run: bool
    device: torch.device
    head: list = field(default_factory=list)          # (T, D, N, P)
    head_dtypes: tuple = ()
    head_big: Optional[tuple] = None                  # (T, D, N, P) with T * D > 2**31
    layer_rows: list = field(default_factory=list)    # (R, D) for RMSNorm
    layer_dtypes: tuple = ()
    rope: list = field(default_factory=list)          # (T, H, D)
    attn_shapes: list = field(default_factory=list)   # (H, H_kv, D)
    attn_tokens: int = 0
    attn_layouts: int = 0
    model_groups: int = 0

    @classmethod
    def gpu(cls, device: torch.device) -> "Sizes":
        return cls(
            dry_run=False, device=device,
            head=[(512, 576, 16, 8), (4099, 1000, 301, 200), (32768, 2048, 2048, 1536),
                  (65536, 4096, 4096, 8192)],
            head_dtypes=(torch.float32, torch.bfloat16, torch.float16),
            # 2**31 // 2048 + 64 rows of 2048: 2**31 + 131072 elements, 4.3 GB in bf16 (twice
            # with grad_hidden): the int64 row offsets are what this case checks
            head_big=(2 ** 31 // 2048 + 64, 2048, 64, 48),
            layer_rows=[(8192, 576), (4096, 2048), (1031, 4096), (64, 12288)],
            layer_dtypes=(torch.float32, torch.bfloat16, torch.float16),
            rope=[(8192, 9, 64), (4096, 32, 128), (1031, 3, 64)],
            attn_shapes=[(9, 3, 64), (32, 8, 128)],
            attn_tokens=2048, attn_layouts=2, model_groups=12,
        )

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(
            dry_run=True, device=torch.device("cpu"),
            head=[(64, 40, 12, 8)], head_dtypes=(torch.float32, torch.bfloat16),
            head_big=None,
            layer_rows=[(9, 37)], layer_dtypes=(torch.float32, torch.bfloat16),
            rope=[(7, 3, 8)],
            attn_shapes=[(4, 2, 16)], attn_tokens=48, attn_layouts=1, model_groups=3,
        )


def _timed(section: str, name: str, fn: Callable[[], Case]) -> Case:
    """Runs one comparison and times it; an exception is that case's failure (the section
    goes on with its next case)."""
    t0 = time.perf_counter()
    try:
        case = fn()
    except Exception as err:  # noqa: BLE001 - reported as the case's result
        case = Case(section, name, FAIL, detail=f"{type(err).__name__}: {err}")
    case.seconds = round(time.perf_counter() - t0, 3)
    return case


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- head kernel
# outputs computed in fp32 inside the kernel from the (rounded) inputs; grad_hidden is stored
# in hidden's dtype (one rounding)
_HEAD_FP32_TOL = 2e-4
_ROUND_TOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _head_problem(t, d, n, p, dtype, device, gen, *, contrast=False, objective="bradley_terry"):
    """A random head-loss problem with repeated positions and responses used several times."""
    hidden = torch.randn(t, d, generator=gen, device=device, dtype=dtype)
    weight = (torch.randn(d, generator=gen, device=device) / math.sqrt(d)).to(dtype)
    bias = torch.randn(1, generator=gen, device=device)
    pos = torch.randint(0, t, (n,), generator=gen, device=device)
    pos[: max(1, n // 8)] = pos[n - max(1, n // 8):]  # some rows listed twice
    pos[-1] = t - 1                                   # the last row (largest offset)
    if contrast:
        bc = br = p
        chosen = torch.randint(0, n, (bc,), generator=gen, device=device)
        rejected = torch.randint(0, n, (br,), generator=gen, device=device)
        w = torch.softmax(torch.randn(bc, br, generator=gen, device=device), -1)
        extra = {"contrast_weights": w}
    else:
        chosen = torch.randint(0, n, (p,), generator=gen, device=device)
        rejected = (chosen + torch.randint(1, n, (p,), generator=gen, device=device)) % n
        extra = {"comparison_weight": torch.rand(p, generator=gen, device=device) + 0.1}
    margin = torch.rand(p, generator=gen, device=device) * 0.5
    return hidden, weight, bias, pos, chosen, rejected, margin, extra, objective


def _head_reference(hidden, weight, bias, pos, chosen, rejected, margin, extra, objective, cc):
    """float64 loss, rewards and gradients from fastrm.functional + autograd, on the gathered
    rows only (never a float64 copy of the whole ``[T, D]``)."""
    from fastrm import functional as RF

    upos, inverse = torch.unique(pos, return_inverse=True)
    h = hidden.index_select(0, upos).double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_()
    rewards = h[inverse] @ w + b
    if "contrast_weights" in extra:
        loss = RF.contrast_loss(rewards[chosen], rewards[rejected], extra["contrast_weights"].double(),
                                margin.double(), objective=objective, centering_coefficient=cc)
    else:
        loss = RF.comparison_loss(rewards, chosen, rejected, margin.double(),
                                  extra["comparison_weight"].double(), objective=objective,
                                  centering_coefficient=cc)
    loss.backward()
    return loss.detach(), rewards.detach(), upos, h.grad, w.grad, b.grad


def _head_case(sizes: Sizes, name: str, problem: tuple, cc: float = 0.01) -> Case:
    from fastrm.ops import fused_reward_head_loss

    hidden, weight, bias, pos, chosen, rejected, margin, extra, objective = problem
    dtype = hidden.dtype
    h = hidden.requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    loss, rewards = fused_reward_head_loss(h, w, b, pos, chosen, rejected, margin,
                                           extra.get("comparison_weight"), objective=objective,
                                           centering_coefficient=cc,
                                           contrast_weights=extra.get("contrast_weights"),
                                           backend="triton")
    loss.backward()
    _sync(sizes.device)
    r_loss, r_rewards, upos, r_gh, r_gw, r_gb = _head_reference(
        hidden.detach(), weight, bias, pos, chosen, rejected, margin, extra, objective, cc)
    gh = h.grad
    errs = {
        "loss": rel_err(loss, r_loss) / _HEAD_FP32_TOL,
        "rewards": rel_err(rewards, r_rewards) / _HEAD_FP32_TOL,
        "grad_hidden": rel_err(gh.index_select(0, upos), r_gh) / _ROUND_TOL[dtype],
        "grad_weight": rel_err(w.grad, r_gw) / _ROUND_TOL[dtype],
        "grad_bias": rel_err(b.grad, r_gb) / _HEAD_FP32_TOL,
    }
    # every row outside reward_positions gets exactly zero: clear the scored rows (already
    # compared) in place and count what is left, without a second [T, D] tensor
    gh.index_fill_(0, upos, 0)
    errs["rows_outside_nonzero"] = 0.0 if int(torch.count_nonzero(gh)) == 0 else float("inf")
    worst = max(errs, key=errs.get)
    detail = (f"T={hidden.shape[0]} D={hidden.shape[1]} N={pos.numel()} P={chosen.numel()} "
              f"{str(dtype).replace('torch.', '')} {objective}; worst: {worst}")
    # reported relative to each output's own tolerance: pass when every ratio <= 1
    return Case("head_kernel", name, PASS if errs[worst] <= 1.0 else FAIL, errs[worst], 1.0, 0.0,
                detail + " (error / its tolerance)")


def head_kernel_cases(sizes: Sizes) -> Iterator[Case]:
    """The Triton reward head + loss (``fastrm.ops.fused_reward_head_loss(backend="triton")``)
    against float64 ``fastrm.functional`` + autograd over sizes, dtypes, objectives, repeated
    positions / responses, cross-prompt weights, and one ``T * D > 2**31`` case."""
    dev = sizes.device
    gen = torch.Generator(device=dev).manual_seed(0)
    for (t, d, n, p) in sizes.head:
        for dtype in sizes.head_dtypes:
            name = f"T{t}_D{d}_{str(dtype).replace('torch.', '')}"
            yield _timed("head_kernel", name, lambda: _head_case(
                sizes, name, _head_problem(t, d, n, p, dtype, dev, gen)))
    t, d, n, p = sizes.head[0]
    yield _timed("head_kernel", "hinge", lambda: _head_case(sizes, "hinge", _head_problem(
        t, d, n, p, torch.bfloat16, dev, gen, objective="hinge")))
    yield _timed("head_kernel", "contrast", lambda: _head_case(sizes, "contrast", _head_problem(
        t, d, n, p, torch.bfloat16, dev, gen, contrast=True)))
    if sizes.head_big is None:
        yield Case("head_kernel", "T*D>2^31", SKIP, detail="needs a GPU (about 9 GB in bf16); "
                   "runs whenever CUDA is present")
        return
    t, d, n, p = sizes.head_big

    def big() -> Case:
        problem = _head_problem(t, d, n, p, torch.bfloat16, dev, gen)
        case = _head_case(sizes, "T*D>2^31", problem)
        del problem
        torch.cuda.empty_cache()
        return case

    yield _timed("head_kernel", "T*D>2^31", big)


# ---------------------------------------------------------------------------- layer op kernels
def layer_op_cases(sizes: Sizes) -> Iterator[Case]:
    """The Triton kernels of RMSNorm, SiLU-mul and RoPE (forward and backward) against float64
    torch formulas."""
    from fastrm.ops.rms_norm_triton import rms_norm_backward_triton, rms_norm_forward_triton
    from fastrm.ops.rope_triton import rope_rotate_triton
    from fastrm.ops.swiglu_triton import silu_mul_backward_triton, silu_mul_forward_triton

    dev = sizes.device
    gen = torch.Generator(device=dev).manual_seed(1)

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    for (r, d) in sizes.layer_rows:
        for dtype in sizes.layer_dtypes:
            def rms() -> Case:
                x, w, gy = rand(r, d, dtype=dtype, scale=3.0), rand(d, dtype=dtype), rand(r, d, dtype=dtype)
                y, rstd = rms_norm_forward_triton(x, w, 1e-5)
                gx, gw = rms_norm_backward_triton(gy, x, w, rstd)
                xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
                y_ref = torch.nn.functional.rms_norm(xr, (d,), wr, 1e-5)
                y_ref.backward(gy.double())
                tol = _ROUND_TOL[dtype]
                err = max(rel_err(y, y_ref), rel_err(gx, xr.grad), rel_err(gw, wr.grad))
                return judged("layer_ops", f"rms_norm_R{r}_D{d}_{str(dtype)[6:]}", err, tol, 0.0,
                              "max over y, grad_x, grad_w")
            yield _timed("layer_ops", f"rms_norm_R{r}_D{d}_{str(dtype)[6:]}", rms)
    for dtype in sizes.layer_dtypes:
        def silu() -> Case:
            n = sizes.layer_rows[0][0] * sizes.layer_rows[0][1] + 7
            g, u, da = rand(n, dtype=dtype, scale=4.0), rand(n, dtype=dtype), rand(n, dtype=dtype)
            a = silu_mul_forward_triton(g, u)
            dg, du = silu_mul_backward_triton(da, g, u)
            gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
            a_ref = torch.nn.functional.silu(gr) * ur
            a_ref.backward(da.double())
            err = max(rel_err(a, a_ref), rel_err(dg, gr.grad), rel_err(du, ur.grad))
            return judged("layer_ops", f"silu_mul_N{n}_{str(dtype)[6:]}", err, _ROUND_TOL[dtype], 0.0)
        yield _timed("layer_ops", f"silu_mul_{str(dtype)[6:]}", silu)
        for (t, h, d) in sizes.rope:
            def rope() -> Case:
                theta = torch.rand(t, d // 2, generator=gen, device=dev, dtype=torch.float64) * 6
                cs = torch.stack([theta.cos(), theta.sin()], -1)
                x = rand(t, h, d, dtype=dtype)
                errs = []
                for inverse in (False, True):
                    y = rope_rotate_triton(x, cs.float(), inverse)
                    rot = torch.view_as_complex(cs.float().double().contiguous())[:, None]
                    z = torch.view_as_complex(x.double().reshape(t, h, d // 2, 2).contiguous())
                    ref = torch.view_as_real(z * (rot.conj() if inverse else rot)).reshape(t, h, d)
                    errs.append(rel_err(y, ref))
                return judged("layer_ops", f"rope_T{t}_H{h}_D{d}_{str(dtype)[6:]}", max(errs),
                              _ROUND_TOL[dtype], 0.0, "forward and inverse rotation")
            yield _timed("layer_ops", f"rope_T{t}_H{h}_D{d}_{str(dtype)[6:]}", rope)


# ---------------------------------------------------------------------------------- attention
# bf16 flash kernels against the float64 rule: outputs and gradients (scores in fp32, operands
# and results rounded to bf16)
_ATTN_TOL = {"out": 2e-2, "grad": 4e-2}


def random_layout(rng: random.Random, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``total`` tokens of plain sequences and prompts shared by 1-6 responses (each
    response's ``segment_prefix`` is its prompt), lengths from 1 to ``total // 6``."""
    lens, prefix, t = [], [], 0
    top = max(2, total // 6)
    while t < total:
        if rng.random() < 0.6:
            p = rng.randint(1, top)
            lens.append(p)
            prefix.append((0, 0))
            start = t
            t += p
            for _ in range(rng.randint(1, 6)):
                n = rng.choice([1, rng.randint(1, top)])
                lens.append(n)
                prefix.append((start, start + p))
                t += n
        else:
            n = rng.choice([1, rng.randint(1, top)])
            lens.append(n)
            prefix.append((0, 0))
            t += n
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu.to(device), torch.tensor(prefix, dtype=torch.int32, device=device)


def attention_cases(sizes: Sizes) -> Iterator[Case]:
    """Every attention backend in bf16 against the float64 ``reference`` backend on random
    packed layouts with shared prefixes, outputs and q / k / v gradients; on CUDA also that
    the flash backends' gradients are bitwise repeatable under deterministic algorithms."""
    from fastrm.attention import VarlenMetadata, backend_unavailable_reason, varlen_attention

    dev = sizes.device
    names = ["flash_attn", "torch_varlen", "flex", "sdpa_segments", "cpu_flash"]
    rng = random.Random(0)
    gen = torch.Generator(device=dev).manual_seed(2)
    for li in range(sizes.attn_layouts):
        cu, pre = random_layout(rng, sizes.attn_tokens, dev)
        meta = VarlenMetadata.build(cu, pre)
        t = meta.total_tokens
        for (h, hk, d) in sizes.attn_shapes:
            q, k, v = (torch.randn(t, n, d, generator=gen, device=dev, dtype=torch.float64)
                       for n in (h, hk, hk))
            go = torch.randn(t, h, d, generator=gen, device=dev, dtype=torch.float64)
            low = [x.bfloat16() for x in (q, k, v)]
            ref_in = [x.double().requires_grad_() for x in low]
            ref = varlen_attention(*ref_in, metadata=meta, backend="reference")
            ref_grads = torch.autograd.grad(ref, ref_in, go.bfloat16().double())
            for name in names:
                label = f"{name}_layout{li}_H{h}_Hkv{hk}_D{d}"
                if name == "cpu_flash" and dev.type == "cuda":
                    continue
                if name == "flex" and li > 0:
                    # compiled per shape on CUDA (tens of seconds each): one layout is enough
                    yield Case("attention", label, SKIP, detail="flex: first layout only (compile budget)")
                    continue
                needs_grad = not (name == "flex" and dev.type == "cpu")
                reason = backend_unavailable_reason(name, low[0], 0.0, needs_grad)
                if reason:
                    yield Case("attention", label, SKIP, detail=reason)
                    continue

                def run(name=name, needs_grad=needs_grad) -> Case:
                    x = [t_.clone().requires_grad_(needs_grad) for t_ in low]
                    with torch.set_grad_enabled(needs_grad):
                        out = varlen_attention(*x, metadata=meta, backend=name)
                    errs = {"out": rel_err(out, ref) / _ATTN_TOL["out"]}
                    if needs_grad:
                        grads = torch.autograd.grad(out, x, go.bfloat16())
                        for gname, g, r in zip("qkv", grads, ref_grads):
                            errs[f"grad_{gname}"] = rel_err(g, r) / _ATTN_TOL["grad"]
                    worst = max(errs, key=errs.get)
                    detail = (f"T={t} S={meta.num_segments} bf16; worst: {worst} (error / its "
                              f"tolerance: out {_ATTN_TOL['out']}, grads {_ATTN_TOL['grad']})")
                    if not needs_grad:
                        detail += "; no gradients: flex has no backward on CPU"
                    return Case("attention", label, PASS if errs[worst] <= 1.0 else FAIL,
                                errs[worst], 1.0, 0.0, detail)
                yield _timed("attention", label, run)
    if dev.type != "cuda":
        yield Case("attention", "deterministic_backward", SKIP,
                   detail="flash kernels run on CUDA only (the CPU gather path is in tests/)")
        return
    cu, pre = random_layout(rng, sizes.attn_tokens, dev)
    meta = VarlenMetadata.build(cu, pre)
    h, hk, d = sizes.attn_shapes[-1]
    t = meta.total_tokens
    x0 = [torch.randn(t, n, d, generator=gen, device=dev, dtype=torch.bfloat16) for n in (h, hk, hk)]
    go = torch.randn(t, h, d, generator=gen, device=dev, dtype=torch.bfloat16)
    for name in ("flash_attn", "torch_varlen", "sdpa_segments"):
        reason = backend_unavailable_reason(name, x0[0], 0.0, True)
        if reason:
            yield Case("attention", f"deterministic_{name}", SKIP, detail=reason)
            continue

        def det(name=name) -> Case:
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                runs = []
                for _ in range(3):
                    x = [t_.clone().requires_grad_() for t_ in x0]
                    out = varlen_attention(*x, metadata=meta, backend=name)
                    runs.append(torch.autograd.grad(out, x, go))
            finally:
                torch.use_deterministic_algorithms(before)
            diff = max(float((a.double() - b.double()).abs().max())
                       for r in runs[1:] for a, b in zip(runs[0], r))
            return judged("attention", f"deterministic_{name}", diff, 0.0, 0.0,
                          "max |difference| of q/k/v gradients over 3 runs under "
                          "torch.use_deterministic_algorithms(True)")
        yield _timed("attention", f"deterministic_{name}", det)


# ------------------------------------------------------------------- packed == unpacked model
def _packed_row(groups, device, share: bool):
    """``(tokens [1, T], position_ids, cu_seqlens, segment_prefix, reward_positions)`` of prompt
    groups laid out with the prompt shared (``share``) or repeated before every response."""
    toks, pos, lens, pre, rpos, t = [], [], [], [], [], 0
    for prompt, responses in groups:
        p = len(prompt)
        if share:
            toks += prompt
            pos += list(range(p))
            lens.append(p)
            pre.append((0, 0))
            start, t = t, t + p
        for r in responses:
            seq = r if share else prompt + r
            first = p if share else 0
            toks += seq
            pos += list(range(first, first + len(seq)))
            lens.append(len(seq))
            pre.append((start, start + p) if share else (0, 0))
            t += len(seq)
            rpos.append(t - 1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    as_t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return (as_t(toks)[None], as_t(pos)[None], cu.to(device), as_t(pre, torch.int32),
            as_t(rpos))


def _smollm2_model(sizes: Sizes, tmp_dir) -> tuple:
    """``(model, vocab, source)``: SmolLM2-135M-Instruct (prepared if missing) on a GPU, a tiny
    random model of the same architecture in the dry run."""
    from fastrm.models import reward_model
    from fastrm.models.smollm2 import smollm2

    if sizes.dry_run:
        dec = smollm2(vocab_size=300, num_layers=2, num_heads=3, num_kv_heads=1, embed_dim=48,
                      intermediate_dim=96, max_seq_len=512)
        torch.manual_seed(0)
        return reward_model(dec), 300, "tiny random SmolLM2-architecture model (dry run)"
    from fastrm.models import load_base_weights
    from fastrm.models.smollm2 import prepare_smollm2, smollm2_135m, smollm2_checkpointer

    ckpt_dir = prepare_smollm2(progress=False)  # idempotent; FileNotFoundError without the GGUF
    ckpt = smollm2_checkpointer(output_dir=str(tmp_dir / "smollm2_out"), checkpoint_dir=str(ckpt_dir),
                                prepare=False)
    torch.manual_seed(0)
    model = reward_model(smollm2_135m(max_seq_len=4096))
    load_base_weights(model, ckpt.load_checkpoint()["model"])
    return model, 49152, f"SmolLM2-135M-Instruct from {ckpt_dir}"


def model_cases(sizes: Sizes, tmp_dir) -> Iterator[Case]:
    """Rewards of SmolLM2-135M in bf16 on packed rows (prompts shared, and prompts repeated)
    equal the unpacked rewards (``rewards_padded``: one sequence at a time through torchtune's
    own attention), for every attention backend that runs here; plus one fp32 row."""
    from fastrm.attention import VarlenMetadata, backend_unavailable_reason

    dev = sizes.device
    try:
        model, vocab, source = _smollm2_model(sizes, tmp_dir)
    except FileNotFoundError as err:
        yield Case("smollm2_packed", "load", SKIP, detail=str(err))
        return
    model = model.to(dev).eval()
    rng = random.Random(3)
    top = 120 if not sizes.dry_run else 12
    groups = [([rng.randrange(100, vocab) for _ in range(rng.randint(3, top))],
               [[rng.randrange(100, vocab) for _ in range(rng.randint(1, top))]
                for _ in range(rng.randint(2, 4))]) for _ in range(sizes.model_groups)]
    seqs = [prompt + r for prompt, responses in groups for r in responses]
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float32, 2e-3)):
        model = model.to(dtype)
        with torch.no_grad():
            lens = torch.tensor([len(s) for s in seqs], device=dev)
            padded = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long, device=dev)
            for i, s in enumerate(seqs):
                padded[i, : len(s)] = torch.tensor(s, device=dev)
            ref = torch.cat([model.rewards_padded(padded[i: i + 8], lens[i: i + 8])
                             for i in range(0, len(seqs), 8)])
        names = ["auto"] if dtype == torch.float32 else ["flash_attn", "torch_varlen", "flex",
                                                          "sdpa_segments", "auto"]
        for name in names:
            probe = torch.zeros(1, model.decoder.layers[0].attn.num_heads,
                                model.decoder.layers[0].attn.head_dim, dtype=dtype, device=dev)
            reason = "" if name == "auto" else backend_unavailable_reason(name, probe, 0.0, False)
            if not reason and name == "flex":
                reason = ("flex compiles once per row length (tens of seconds on CUDA, eager and "
                          "slow on CPU); the attention section checks it")
            for share in (True, False):
                label = f"{name}_{'shared_prompt' if share else 'packed'}_{str(dtype)[6:]}"
                if reason:
                    yield Case("smollm2_packed", label, SKIP, detail=reason)
                    continue

                def run(name=name, share=share, label=label) -> Case:
                    tokens, pos, cu, pre, rpos = _packed_row(groups, dev, share)
                    meta = VarlenMetadata.build(cu, pre, backend=None if name == "auto" else name)
                    with torch.no_grad():
                        hidden = model.hidden_states(tokens, pos, metadata=meta)
                        got = model.score(hidden, rpos)
                    return judged("smollm2_packed", label, rel_err(got, ref, floor=1.0), tol, 0.0,
                                  f"{len(seqs)} responses, T={tokens.shape[1]}; {source}; error "
                                  "relative to max |reward| (at least 1)")
                yield _timed("smollm2_packed", label, run)
