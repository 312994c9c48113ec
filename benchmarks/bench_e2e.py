"""End-to-end reward-model training steps: fastrm's layouts against the common padded one.

Every layout trains on the **same comparisons in the same order, the same number per step**,
from the **same initial weights**, with the **same optimizer** (AdamW, lr 1e-5, weight decay 0.01)
and the same loss (Bradley-Terry, mean over comparisons):

``padded``
    what TRL / torchtune-style reward trainers do: every chosen and rejected sequence
    (``prompt + response``) is one row of ``[2P, L_max]``, right padded to the longest sequence
    of the step, causal attention over every row, the ``D -> 1`` head over **every** token, a
    gather at each sequence's last token, and the eager loss
    (:meth:`fastrm.RewardLoss.comparison_loss`).
``packed``
    fastrm: all sequences end to end in one ``[1, T]`` row, no padding, per-sequence (varlen)
    attention, fused reward head + loss (:meth:`fastrm.RewardLoss.from_hidden`) that reads the
    hidden state only at each response's last token.
``packed+prefix``
    ``packed`` with pair-level prefix sharing: ``[prompt][chosen][rejected]``, the prompt
    computed once per pair.
``grouped``
    responses grouped by prompt: ``[prompt][r_1]..[r_K]``, each prompt and each distinct
    response computed once, the loss over all comparisons of the group. Run where a
    prompt has more than one comparison (on pair data it is ``packed+prefix``).

Per (data set, model, layout): comparisons/s, real tokens/s (tokens of the pairs as a plain
trainer counts them: ``sum over pairs of len(prompt + chosen) + len(prompt + rejected)``),
tokens computed, the fraction of computed tokens that is padding, the benchmark epoch's time
(min / median / max over repeats) and the step time (epoch time / steps), peak memory,
achieved FLOP/s (analytic FLOPs of what the layout computes, :func:`common.layout_flops`) and
useful FLOP/s (the FLOPs of the unpadded, unshared pairs, the same work for every layout) next
to the machine's measured fp32 ``torch.mm`` rate, and every ratio to ``padded`` and to ``packed``
as min / median / max of the per-repeat ratios (the layouts run **interleaved** in one process:
repeat ``r`` runs each layout's epoch once, in an order rotated by ``r``, so machine noise hits
all of them alike).

Correctness: the first step's loss of every layout (before any update) must equal the padded
one within ``--loss-atol``: the proof that they do the same work. A mismatch is an error.

Memory (CPU): a separate worker process per model, started with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set; per layout it runs one
warm-up step (allocating AdamW's state), resets the kernel's resident high-water mark
(``/proc/self/clear_refs``), and reports ``VmHWM - VmRSS`` over the epoch's steps: activations,
gradients and optimizer temporaries of a step, above the resident model and optimizer state. On
CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the steps, same window.

Data sets (a "benchmark epoch" is the first ``steps x comparisons-per-step`` comparisons):
``longtail`` (the synthetic verifiable set, long-tailed lengths), ``uniform`` (random tokens, every
sequence the same length: padding's best case), ``long_prompt`` / ``short_prompt`` (random tokens,
pairs whose prompt is long / short next to the responses: what prefix sharing saves),
``synthetic_k4`` (the
synthetic set with 4 scored responses per prompt) and ``qa_feedback`` (real human preference
data, grouped by question, when ``../shared/data`` is present: what grouped responses save),
and a length sweep
``sweep_L<n>`` (random tokens, median sequence length ``n``) for the throughput / memory vs
length plot.

Run:  python benchmarks/bench_e2e.py --quick          (a few minutes on 2 cores)
      python benchmarks/bench_e2e.py                  (full)
      python benchmarks/bench_e2e.py --device cuda    (flash-attn + Triton head; bf16)
Writes benchmarks/results/e2e_<device>[_quick].json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import common
from common import MODELS, RESULTS, ModelSpec

LAYOUTS = ("padded", "packed", "packed+prefix", "grouped")
LR, WEIGHT_DECAY = 1e-5, 0.01
MAX_SEQ_LEN = 1024  # longest sequence (prompt + response) a data set keeps
ROPE_LEN = 2048  # RoPE cache of the models (> MAX_SEQ_LEN)
QA_MAX_SEQ_LEN = 512  # qa-feedback prompts carry ~700-token passages: cut so CPU runs stay short


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

@dataclass
class DataSpec:
    """One data set of the benchmark.

    Attributes:
        name: key in tables and JSON.
        build: ``(tokenizer, seed, num_groups) -> list[PreferenceGroup]`` in epoch order.
        layouts: layouts run on it.
        description: one line for the table.
        topic: what the data set measures: ``packing`` (packed vs padded), ``prefix_sharing``
            or ``grouped_responses``.
    """

    name: str
    build: Callable[[Any, int, int], list]
    layouts: tuple[str, ...]
    description: str
    topic: str = "packing"
    meta: dict = field(default_factory=dict)


def _draw(rng: np.random.Generator, spec: tuple, n: int, cap: int) -> np.ndarray:
    """``n`` lengths: ``("fixed", L)`` or ``("lognormal", median, sigma)``, clipped to
    ``[1, cap]``."""
    if spec[0] == "fixed":
        return np.full(n, int(spec[1]), dtype=np.int64)
    if spec[0] == "lognormal":
        raw = rng.lognormal(np.log(spec[1]), spec[2], size=n)
        return np.clip(np.round(raw), 1, cap).astype(np.int64)
    raise ValueError(f"length spec {spec!r}: use ('fixed', L) or ('lognormal', median, sigma)")


def random_groups(num_groups: int, responses: int, prompt_len: tuple, response_len: tuple,
                  seed: int, vocab: int = 49152, cap: int = MAX_SEQ_LEN):
    """Groups of random token ids: ``responses`` responses per prompt, every pair ``(i, j)``,
    ``i < j``, compared (``i`` preferred). Prompt and response lengths follow the given specs;
    a sequence longer than ``cap`` has its prompt cut from the left (as ``left_prompt``)."""
    from fastrm.data import PreferenceGroup

    rng = np.random.default_rng(seed)
    plens = _draw(rng, prompt_len, num_groups, cap // 2)
    rlens = _draw(rng, response_len, num_groups * responses, cap // 2).reshape(num_groups, responses)
    groups = []
    for g in range(num_groups):
        p = int(min(plens[g], cap - rlens[g].max()))
        prompt = rng.integers(10, vocab, size=p).tolist()
        resp = [rng.integers(10, vocab, size=int(n)).tolist() for n in rlens[g]]
        comps = [(i, j, None) for i in range(responses) for j in range(i + 1, responses)]
        groups.append(PreferenceGroup(prompt_tokens=prompt, responses=resp, comparisons=comps,
                                      prompt_id=g, source_index=g))
    return groups


def _synthetic(k: int, length_scale: float):
    def build(tok, seed: int, num_groups: int):
        from fastrm.datasets import synthetic_preference_dataset

        # ~75 % of generated prompts land in the train split
        ds = synthetic_preference_dataset(
            tok, split="train", num_prompts=int(num_groups * 1.6) + 16, seed=seed,
            responses_per_prompt=k, with_margin=False, length_scale=length_scale,
            max_seq_len=MAX_SEQ_LEN, truncation="left_prompt")
        groups = [ds[i] for i in range(len(ds))]
        return [g for g in groups if g.num_comparisons > 0][:num_groups]
    return build


def _qa_feedback(tok, seed: int, num_groups: int):
    from fastrm.datasets import qa_feedback_dataset

    ds = qa_feedback_dataset(tok, split="train", group_by_prompt=True, max_seq_len=QA_MAX_SEQ_LEN,
                             truncation="left_prompt")
    groups = [ds[i] for i in range(len(ds))]
    order = np.random.default_rng(seed).permutation(len(groups))
    return [groups[i] for i in order if groups[i].num_comparisons > 0][:num_groups]


def _random(k: int, prompt_len: tuple, response_len: tuple):
    def build(tok, seed: int, num_groups: int):
        return random_groups(num_groups, k, prompt_len, response_len, seed)
    return build


def qa_feedback_available() -> tuple[bool, str]:
    from fastrm.datasets import default_shared_data_dir

    path = default_shared_data_dir() / "qa_feedback" / "pairs.jsonl"
    return (True, str(path)) if path.is_file() else (False, f"{path} not found")


PAIR_LAYOUTS = ("padded", "packed", "packed+prefix")


def data_specs(sweep: tuple[int, ...]) -> dict[str, DataSpec]:
    specs = [
        DataSpec("longtail", _synthetic(2, 3.0), PAIR_LAYOUTS,
                 "synthetic verifiable pairs, long-tailed lengths (length_scale 3)", "packing"),
        DataSpec("uniform", _random(2, ("fixed", 32), ("fixed", 160)), PAIR_LAYOUTS,
                 "random tokens, every sequence 192 tokens (prompt 32 + response 160)", "packing"),
        DataSpec("long_prompt", _random(2, ("lognormal", 256, 0.4), ("lognormal", 40, 0.5)),
                 PAIR_LAYOUTS, "random pairs, prompt median 256, responses median 40",
                 "prefix_sharing"),
        DataSpec("short_prompt", _random(2, ("lognormal", 16, 0.4), ("lognormal", 160, 0.5)),
                 PAIR_LAYOUTS, "random pairs, prompt median 16, responses median 160",
                 "prefix_sharing"),
        DataSpec("synthetic_k4", _synthetic(4, 2.0), LAYOUTS,
                 "synthetic set, 4 scored responses per prompt (all scored pairs compared)",
                 "grouped_responses"),
        DataSpec("qa_feedback", _qa_feedback, LAYOUTS,
                 f"qa-feedback human pairs grouped by question (train split, sequences cut to "
                 f"{QA_MAX_SEQ_LEN} tokens from the prompt's left)", "grouped_responses"),
    ]
    for L in sweep:
        specs.append(DataSpec(
            f"sweep_L{L}", _random(2, ("lognormal", L // 4, 0.6), ("lognormal", 3 * L // 4, 0.6)),
            ("padded", "packed"), f"random pairs, median sequence {L} (prompt L/4, response 3L/4, "
            "lognormal sigma 0.6)", "packing", {"median_len": L}))
    return {s.name: s for s in specs}


def make_tokenizer():
    """SmolLM2's real tokenizer when its prepared checkpoint is cached (realistic token counts),
    else the byte-level tokenizer (ids < 49152 as well)."""
    try:
        from fastrm.models.smollm2 import smollm2_cache_dir
        from fastrm.models.tokenizer import smollm2_tokenizer

        d = smollm2_cache_dir()
        if (d / "tokenizer.json").is_file():
            return smollm2_tokenizer(str(d)), "SmolLM2 (tokenizer.json)"
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say so
        print(f"SmolLM2 tokenizer unavailable ({e}); using ByteChatTokenizer", file=sys.stderr)
    from fastrm.data import ByteChatTokenizer

    return ByteChatTokenizer(), "ByteChatTokenizer (bytes)"


def make_steps(groups: list, comparisons_per_step: int, steps: int) -> list[list]:
    """Consecutive groups, cut into ``steps`` steps of at least ``comparisons_per_step``
    comparisons each (exactly that many for pair data)."""
    out, cur, n = [], [], 0
    for g in groups:
        cur.append(g)
        n += g.num_comparisons
        if n >= comparisons_per_step:
            out.append(cur)
            cur, n = [], 0
            if len(out) == steps:
                return out
    raise ValueError(f"data has too few comparisons for {steps} steps of {comparisons_per_step}; "
                     "lower --steps or --pairs-per-step")


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------

def collate(layout: str, step_groups: list):
    """The batch ``layout`` trains on for one step's groups (collation is a data-loader job and
    is not timed). Pair layouts see every comparison as an independent pair."""
    from fastrm.data import collate_packed, collate_padded, expand_to_pairs

    if layout == "grouped":
        return collate_packed(step_groups, prefix_sharing=True)
    pairs = expand_to_pairs(step_groups)
    if layout == "padded":
        return collate_padded(pairs, pad_id=0)
    return collate_packed(pairs, prefix_sharing=(layout == "packed+prefix"))


def counts(spec: ModelSpec, layout: str, batch) -> dict[str, float]:
    """Tokens computed, padding and analytic FLOPs of one step's batch."""
    if layout == "padded":
        tok, pairs, head = common.padded_counts(batch)
        pad = int(batch.num_padding_tokens)
    else:
        tok, pairs, head = common.packed_counts(batch)
        pad = 0
    return {"computed_tokens": tok, "padding_tokens": pad, "attended_pairs": pairs,
            "flops": common.layout_flops(spec, tok, pairs, head)}


def loss_of(layout: str, model, loss_fn, batch) -> torch.Tensor:
    """Forward of one step: the scalar loss."""
    if layout == "padded":
        hidden = model.forward_padded(batch.tokens)              # [N, L, D], causal SDPA
        all_r = model.head(hidden).squeeze(-1).float()           # [N, L]: head over every token
        r = all_r.gather(1, batch.reward_positions[:, None]).squeeze(1)  # [N]
        return loss_fn.comparison_loss(r, batch.chosen_index, batch.rejected_index)
    hidden = model(batch)                                        # [T, D], varlen attention
    loss, _ = loss_fn.from_hidden(hidden, model.head.weight, model.head.bias, batch)
    return loss


def train_epoch(layout: str, model, opt, loss_fn, batches: list, device: str) -> float:
    """Runs the epoch's optimizer steps; returns wall seconds (GPU work included)."""
    common.sync(device)
    t0 = time.perf_counter()
    for b in batches:
        loss = loss_of(layout, model, loss_fn, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    common.sync(device)
    return time.perf_counter() - t0


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


# --------------------------------------------------------------------------------------------
# one (data set, model) configuration
# --------------------------------------------------------------------------------------------

def prepare(data: DataSpec, tok, args) -> tuple[list[list], dict[str, list]]:
    n_groups = args.steps * args.pairs_per_step + 64
    groups = data.build(tok, args.seed, n_groups)
    steps = make_steps(groups, args.pairs_per_step, args.steps)
    batches = {lay: [collate(lay, s).to(args.device) for s in steps] for lay in data.layouts}
    return steps, batches


def time_config(data: DataSpec, spec: ModelSpec, tok, args, dtype) -> dict[str, Any]:
    """Timing (interleaved repeats) and the first-step loss check for one configuration."""
    from fastrm import RewardLoss

    steps, batches = prepare(data, tok, args)
    loss_fn = RewardLoss()
    model = common.build_model(spec, ROPE_LEN, args.seed, args.device, dtype)
    model.train()
    # first-step loss of every layout from the same initial weights, before any update
    first_loss = {}
    for lay in data.layouts:
        loss = loss_of(lay, model, loss_fn, batches[lay][0])
        loss.backward()
        model.zero_grad(set_to_none=True)
        first_loss[lay] = float(loss.detach())
    ref = first_loss["padded"]
    diffs = {lay: abs(v - ref) for lay, v in first_loss.items()}
    bad = {lay: d for lay, d in diffs.items() if d > args.loss_atol * max(1.0, abs(ref))}
    if bad:
        raise RuntimeError(f"{data.name}/{spec.name}: first-step loss differs from padded "
                           f"({first_loss}); the layouts do not compute the same thing")
    # one optimizer shared by the layouts: they alternate epochs on the same weights (timing
    # does not depend on the weights' values; memory stays that of one model)
    opt = make_optimizer(model)
    times: dict[str, list[float]] = {lay: [] for lay in data.layouts}
    layouts = list(data.layouts)
    for lay in layouts:  # warm-up (allocator, AdamW state, kernel selection)
        train_epoch(lay, model, opt, loss_fn, batches[lay][:args.warmup_steps], args.device)
    for r in range(args.repeats):
        k = r % len(layouts)
        for lay in layouts[k:] + layouts[:k]:
            times[lay].append(train_epoch(lay, model, opt, loss_fn, batches[lay], args.device))
    per_layout = {}
    real_tokens = sum(len(g.prompt_tokens) * 2 + len(g.responses[i]) + len(g.responses[j])
                      for s in steps for g in s for i, j, _ in g.comparisons)
    comparisons = sum(g.num_comparisons for s in steps for g in s)
    for lay in layouts:
        c = [counts(spec, lay, b) for b in batches[lay]]
        per_layout[lay] = {
            "computed_tokens": sum(x["computed_tokens"] for x in c),
            "padding_tokens": sum(x["padding_tokens"] for x in c),
            "flops": sum(x["flops"] for x in c),
            "epoch_time_s": common.summarize(times[lay]),
            "first_step_loss": first_loss[lay],
            "first_step_loss_abs_diff_vs_padded": diffs[lay],
        }
    del model, opt
    gc.collect()
    return {"steps": len(steps), "comparisons": comparisons, "real_tokens": real_tokens,
            "groups": sum(len(s) for s in steps), "layouts": per_layout,
            "times": times}


def memory_config(data: DataSpec, spec: ModelSpec, tok, args, dtype) -> dict[str, dict]:
    """Peak memory (MiB) per layout above the resident model + optimizer state, the maximum
    over the epoch's steps of three windows that start just before a step's forward:
    ``forward`` (saved activations), ``fwd_bwd`` (+ backward, gradients included) and ``step``
    (+ the AdamW update, the whole training step)."""
    from fastrm import RewardLoss

    _, batches = prepare(data, tok, args)
    loss_fn = RewardLoss()
    model = common.build_model(spec, ROPE_LEN, args.seed, args.device, dtype)
    opt = make_optimizer(model)
    out = {}
    cuda = args.device.startswith("cuda")

    def start() -> int:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if not common.reset_peak_rss():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): Linux >= 4.0 needed")
        return common.rss_bytes()

    def peak(base: int) -> float:
        if cuda:
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return max(0, common.peak_rss_bytes() - base) / 2 ** 20

    for lay in data.layouts:
        train_epoch(lay, model, opt, loss_fn, batches[lay][:1], args.device)  # AdamW state
        res = {"forward": 0.0, "fwd_bwd": 0.0, "step": 0.0}
        for b in batches[lay]:
            gc.collect()
            base = start()
            loss = loss_of(lay, model, loss_fn, b)
            res["forward"] = max(res["forward"], peak(base))
            loss.backward()
            res["fwd_bwd"] = max(res["fwd_bwd"], peak(base))
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
            res["step"] = max(res["step"], peak(base))
        out[lay] = res
    del model, opt
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

def finish(cfg: dict[str, Any], spec: ModelSpec, memory: dict[str, float],
           mm: dict[str, float]) -> list[dict[str, Any]]:
    """Per-layout rows with rates and ratios (to padded and to packed, per repeat)."""
    rows = []
    times = cfg["times"]
    useful = cfg["layouts"]["packed"]["flops"]  # unpadded, unshared pairs: the same for all
    for lay, r in cfg["layouts"].items():
        med = r["epoch_time_s"]["median"]
        row = {
            "layout": lay,
            "comparisons": cfg["comparisons"], "real_tokens": cfg["real_tokens"],
            "computed_tokens": r["computed_tokens"],
            "pad_fraction": r["padding_tokens"] / r["computed_tokens"],
            "computed_vs_real": r["computed_tokens"] / cfg["real_tokens"],
            "epoch_time_s": r["epoch_time_s"],
            "step_time_s": {k: v / cfg["steps"] for k, v in r["epoch_time_s"].items() if k != "all"},
            "comparisons_per_s": cfg["comparisons"] / med,
            "real_tokens_per_s": cfg["real_tokens"] / med,
            "achieved_flops": r["flops"] / med,
            "useful_flops": useful / med,
            "useful_fraction_of_matmul": useful / med / mm["median_flops"],
            "peak_step_memory_mib": memory.get(lay, {}).get("step"),
            "peak_fwd_bwd_memory_mib": memory.get(lay, {}).get("fwd_bwd"),
            "peak_forward_memory_mib": memory.get(lay, {}).get("forward"),
            "first_step_loss": r["first_step_loss"],
            "first_step_loss_abs_diff_vs_padded": r["first_step_loss_abs_diff_vs_padded"],
            "speedup_vs_padded": common.ratio_stats(times["padded"], times[lay]),
            "speedup_vs_packed": common.ratio_stats(times["packed"], times[lay]),
            "tokens_vs_padded": r["computed_tokens"] / cfg["layouts"]["padded"]["computed_tokens"],
            "tokens_vs_packed": r["computed_tokens"] / cfg["layouts"]["packed"]["computed_tokens"],
        }
        if memory.get(lay) and memory.get("padded"):
            row["memory_vs_padded"] = memory[lay]["step"] / max(memory["padded"]["step"], 1e-9)
            row["fwd_bwd_memory_vs_padded"] = (memory[lay]["fwd_bwd"]
                                               / max(memory["padded"]["fwd_bwd"], 1e-9))
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The Markdown tables of one bench_e2e run."""
    info = result["machine"]
    mm = result["matmul"]
    lines = [
        f"End-to-end training steps (fwd + bwd + AdamW), {info['device']}, "
        f"{result['settings']['dtype']}: {common.machine_line(info)}.",
        f"Measured `torch.mm` {mm['n']}x{mm['n']} {mm['dtype']}: "
        f"{mm['median_flops'] / 1e9:.1f} GFLOP/s median, {mm['max_flops'] / 1e9:.1f} best. "
        f"{result['settings']['steps']} steps x {result['settings']['pairs_per_step']} comparisons "
        f"per step (benchmark epoch), {result['settings']['repeats']} interleaved repeats; "
        f"tokenizer: {result['settings']['tokenizer']}.",
        "Speed-ups are per-repeat ratios of epoch time measured side by side: median (min-max).",
        "",
    ]
    cols = [("data", "data"), ("model", "model"), ("layout", "layout"),
            ("ctok", "tokens computed"), ("pad", "pad %"), ("step", "step s (min/med/max)"),
            ("cps", "pairs/s"), ("tps", "real tok/s"), ("gf", "achieved GFLOP/s"),
            ("ugf", "useful GFLOP/s"), ("memfb", "peak fwd+bwd MiB"), ("mem", "peak step MiB"),
            ("spd", "speed-up vs padded"), ("spk", "vs packed"), ("dl", "|Δ loss₀|")]
    rows = []
    for c in result["configs"]:
        for r in c["rows"]:
            st = r["step_time_s"]
            rows.append({
                "data": c["data"], "model": c["model"], "layout": r["layout"],
                "ctok": f"{r['computed_tokens']:,}", "pad": f"{100 * r['pad_fraction']:.1f}",
                "step": f"{st['min']:.3f} / {st['median']:.3f} / {st['max']:.3f}",
                "cps": f"{r['comparisons_per_s']:.1f}", "tps": f"{r['real_tokens_per_s']:,.0f}",
                "gf": f"{r['achieved_flops'] / 1e9:.1f}", "ugf": f"{r['useful_flops'] / 1e9:.1f}",
                "mem": "" if r["peak_step_memory_mib"] is None else f"{r['peak_step_memory_mib']:.0f}",
                "memfb": ("" if r["peak_fwd_bwd_memory_mib"] is None
                          else f"{r['peak_fwd_bwd_memory_mib']:.0f}"),
                "spd": common.fmt_ratio(r["speedup_vs_padded"]),
                "spk": common.fmt_ratio(r["speedup_vs_packed"]),
                "dl": f"{r['first_step_loss_abs_diff_vs_padded']:.1e}",
            })
    lines.append(common.md_table(rows, cols, align_right={k for k, _ in cols[3:]}))
    lines.append("")
    lines.append("Data sets: " + "; ".join(f"`{k}`: {v}" for k, v in result["data_sets"].items()))
    if result.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in result["skipped"].items()))
    return "\n".join(lines)


def worker_memory(args) -> None:
    """``--memory-worker``: memory of every (data set, model) of this run, printed as JSON."""
    common.set_threads(args.threads)
    dtype = dtype_of(args)
    tok, _ = make_tokenizer()
    specs = data_specs(tuple(args.sweep))
    out = {}
    for name, model_name in json.loads(args.memory_jobs):
        out[f"{name}|{model_name}"] = memory_config(specs[name], MODELS[model_name], tok, args, dtype)
    print("MEMORY_JSON " + json.dumps(out))


def dtype_of(args) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def plan(args) -> list[tuple[str, str]]:
    """(data set, model) jobs of this run."""
    jobs = []
    for m in args.models:
        data = args.data_small if m == args.models[0] else args.data_large
        jobs.extend((d, m) for d in data)
    return jobs


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 steps x 4 comparisons, 3 repeats, fewer data sets for the larger model")
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                   help="model sizes (first: runs every data set; others: --data-large)")
    p.add_argument("--data-small", nargs="+", default=None, help="data sets for the first model")
    p.add_argument("--data-large", nargs="+", default=None, help="data sets for the other models")
    p.add_argument("--sweep", nargs="*", type=int, default=None, help="median lengths of the sweep")
    p.add_argument("--steps", type=int, default=None, help="steps per benchmark epoch")
    p.add_argument("--pairs-per-step", type=int, default=None, help="comparisons per step")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps per layout before the repeats (default: 1 quick, an epoch full)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-atol", type=float, default=1e-4,
                   help="tolerance of the first-step loss check (relative above |loss| = 1)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-jobs", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.models = args.models or ["llama-4L-256", "smollm2-8L"]
    all_data = ["longtail", "uniform", "long_prompt", "short_prompt", "synthetic_k4", "qa_feedback"]
    args.sweep = args.sweep if args.sweep is not None else ([64, 128, 256] if q else [64, 128, 256, 512])
    args.data_small = args.data_small or all_data + [f"sweep_L{L}" for L in args.sweep]
    args.data_large = args.data_large or (["longtail", "uniform"] if q else
                                          ["longtail", "uniform", "long_prompt", "short_prompt",
                                           "synthetic_k4", "qa_feedback"])
    args.steps = args.steps or (2 if q else 6)
    args.pairs_per_step = args.pairs_per_step or (4 if q else 8)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if q else args.steps)
    args.repeats = args.repeats or (3 if q else 5)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.memory_worker:
        worker_memory(args)
        return {}
    common.set_threads(args.threads)
    dtype = dtype_of(args)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or RESULTS / f"e2e_{dev}{'_quick' if q else ''}.json")

    from tqdm import tqdm

    specs = data_specs(tuple(args.sweep))
    skipped = {}
    ok, why = qa_feedback_available()
    jobs = []
    for d, m in plan(args):
        if d not in specs:
            raise ValueError(f"unknown data set {d!r}; known: {', '.join(specs)}")
        if d == "qa_feedback" and not ok:
            skipped["qa_feedback"] = f"shared data absent ({why})"
            continue
        jobs.append((d, m))
    tok, tok_name = make_tokenizer()
    info = common.machine_info(args.threads, args.device)
    mm = common.matmul_rate(args.device, torch.float32 if dtype == torch.float32 else dtype)

    memory: dict[str, dict] = {}
    if not args.no_memory:
        memory = run_memory(args, jobs)
    configs = []
    for d, m in tqdm(jobs, desc="bench_e2e"):
        t0 = time.perf_counter()
        cfg = time_config(specs[d], MODELS[m], tok, args, dtype)
        rows = finish(cfg, MODELS[m], memory.get(f"{d}|{m}", {}), mm)
        configs.append({"data": d, "model": m, "topic": specs[d].topic,
                        "steps": cfg["steps"], "groups": cfg["groups"],
                        "comparisons": cfg["comparisons"], "real_tokens": cfg["real_tokens"],
                        "wall_s": time.perf_counter() - t0, "rows": rows})
        tqdm.write(f"{d:14s} {m:14s} " + "  ".join(
            f"{r['layout']} {r['speedup_vs_padded']['median']:.2f}x" for r in rows))
    from fastrm.attention.varlen import select_backend
    from fastrm.ops import resolve_backend

    probe = torch.zeros(1, 1, 8, device=args.device, dtype=dtype)
    result = {
        "benchmark": f"e2e_{dev}",
        "machine": info,
        "matmul": mm,
        "settings": {"quick": q, "models": args.models, "steps": args.steps,
                     "warmup_steps": args.warmup_steps,
                     "pairs_per_step": args.pairs_per_step, "repeats": args.repeats,
                     "threads": args.threads, "device": args.device, "dtype": args.dtype,
                     "seed": args.seed, "optimizer": f"AdamW(lr={LR}, weight_decay={WEIGHT_DECAY})",
                     "loss": "Bradley-Terry, mean over comparisons", "tokenizer": tok_name,
                     "attention_backend": select_backend(probe),
                     "head_backend": resolve_backend(None, torch.device(args.device)),
                     "memory_method": ("CUDA max_memory_allocated above the allocation before the "
                                       "steps" if dev == "cuda" else
                                       "VmHWM - VmRSS of a worker process with "
                                       f"MALLOC_MMAP_THRESHOLD_={common.MMAP_THRESHOLD}, after a "
                                       "warm-up step (model and AdamW state excluded); max over "
                                       "steps; fwd+bwd: forward and backward (gradients "
                                       "included); step: + the AdamW update")},
        "model_specs": {m: MODELS[m].as_dict() for m in args.models},
        "data_sets": {d: specs[d].description for d in dict.fromkeys(d for d, _ in jobs)},
        "skipped": skipped,
        "configs": configs,
    }
    result["machine"]["load_average_after"] = common.load_average()
    result["table"] = markdown(result)
    common.write_json(out, result)
    out.with_suffix(".md").write_text(result["table"] + "\n")
    print(result["table"])
    print(f"saved {out} and {out.with_suffix('.md')}")
    return result


def run_memory(args, jobs: list[tuple[str, str]]) -> dict[str, dict]:
    """Peak step memory of every job: in a worker process on CPU (see the module docstring),
    in this process on CUDA."""
    if args.device.startswith("cuda"):
        tok, _ = make_tokenizer()
        specs = data_specs(tuple(args.sweep))
        return {f"{d}|{m}": memory_config(specs[d], MODELS[m], tok, args, dtype_of(args))
                for d, m in jobs}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(common.MMAP_THRESHOLD),
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--memory-worker", "--memory-jobs", json.dumps(jobs),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
           "--steps", str(args.steps), "--pairs-per-step", str(args.pairs_per_step),
           "--seed", str(args.seed), "--sweep", *map(str, args.sweep)]
    print(f"memory worker: {len(jobs)} configurations ...", file=sys.stderr)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in res.stdout.splitlines() if x.startswith("MEMORY_JSON ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"memory worker failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(line[len("MEMORY_JSON "):])


if __name__ == "__main__":
    main()
