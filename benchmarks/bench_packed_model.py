"""Packed reward-model training step vs the padded batch common trainers use, on CPU.

For the same preference pairs (prompt, chosen and rejected lengths drawn from long-tailed
log-normals) one training step (forward + backward of the Bradley-Terry loss) is timed three ways:

``packed``
    fastrm: all ``2B`` full sequences (prompt + response) laid end to end in one row ``[1, T]``
    (no padding), per-sequence causal attention (``sdpa_segments``), reward head only at the
    ``2B`` last tokens.
``packed_shared``
    fastrm with prefix sharing: ``[prompt][chosen][rejected]`` per pair, each response attends to
    its prompt (computed once) plus causally to itself.
``padded``
    what TRL-style trainers do: chosen and rejected concatenated into ``[2B, L_max]``, right
    padded to the longest sequence, causal attention over every row, the ``D -> 1`` head over
    every token ``[2B, L_max, 1]``, then a gather at each sequence's last token.

Reported per model: step time min / median / max over repeats, real tokens/s (tokens of the
pairs' full sequences / median step time), peak memory of the step (peak RSS of a fresh worker
process minus its RSS just before the first step), the fraction of computed tokens that are
padding, the fraction of the step's FLOPs spent on padding and the FLOPs relative to plain
packing (analytic: linear layers + attention pairs + head, forward + backward = 3x forward).
All modes are checked to give the same loss. An attention-only micro benchmark compares the
grouped per-segment SDPA with a block-diagonal ``[T, T]`` mask and a per-segment loop.

Run:  python benchmarks/bench_packed_model.py [--models small,medium] [--pairs 8] [--repeats 5]
Writes benchmarks/results/packed_model_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from common import RESULTS

MODES = ("packed", "packed_shared", "padded")

MODELS = {
    # name: tiny_llama3 kwargs (torchtune llama3 component builder)
    "small": dict(vocab_size=8192, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256),
    "medium": dict(vocab_size=8192, num_layers=8, num_heads=9, num_kv_heads=3, embed_dim=576,
                   intermediate_dim=1536),
}


def sample_pairs(pairs: int, seed: int, prompt_median: int, response_median: int, sigma: float,
                 max_len: int) -> list[tuple[int, int, int]]:
    """Long-tailed log-normal ``(prompt, chosen, rejected)`` lengths, each >= 4, with
    ``prompt + max(chosen, rejected) <= max_len`` (responses clipped first, then the prompt)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pairs):
        p, c, r = (int(max(4, round(x))) for x in (
            rng.lognormal(np.log(prompt_median), sigma),
            rng.lognormal(np.log(response_median), sigma),
            rng.lognormal(np.log(response_median), sigma)))
        c, r = min(c, max_len // 2), min(r, max_len // 2)
        p = min(p, max_len - max(c, r))
        out.append((p, c, r))
    return out


def analytic_flops(cfg: dict, segments: list[tuple[int, int]], head_tokens: int) -> float:
    """Forward+backward FLOPs (3x forward) of the decoder layers, attention and head.

    ``segments``: ``(L, P)`` per computed segment (query length, shared-prefix length; padded
    rows are segments of ``L_max``). Per token and layer ``2 * (linear params)``; attention
    ``2 * 2 * H * head_dim`` per (query, key) pair, ``L * P + L (L + 1) / 2`` pairs per segment
    (prefix keys plus the causal triangle). Head: ``2 * D`` per scored token; embedding free.
    """
    d, h, hk = cfg["embed_dim"], cfg["num_heads"], cfg["num_kv_heads"]
    hd = d // h
    inter = cfg.get("intermediate_dim")
    if inter is None:  # torchtune's llama3 default (scale_hidden_dim_for_mlp, multiple of 256)
        inter = int(8 * d / 3)
        inter = 256 * ((inter + 255) // 256)
    lin = 2 * d * h * hd + 2 * d * hk * hd + 3 * d * inter
    tokens = sum(L for L, _ in segments)
    pairs = sum(L * P + L * (L + 1) / 2 for L, P in segments)
    per_layer = 2 * lin * tokens + 4 * h * hd * pairs
    return 3.0 * (cfg["num_layers"] * per_layer + 2 * d * head_tokens)


def worker(args) -> dict:
    """One (model, mode) measurement in a fresh process (so peak RSS is this step's)."""
    from fastrm.data.batch import PackedBatch
    from fastrm.functional import comparison_loss, pair_loss
    from fastrm.models import reward_model, tiny_llama3

    torch.set_num_threads(args.threads)
    cfg = dict(MODELS[args.model])
    spec = sample_pairs(args.pairs, args.seed, args.prompt_median, args.response_median,
                        args.sigma, args.max_len)
    torch.manual_seed(args.seed)
    model = reward_model(tiny_llama3(max_seq_len=args.max_len, **cfg),
                         attention_backend="sdpa_segments")
    model.train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    rand = lambda n: torch.randint(0, cfg["vocab_size"], (n,), generator=gen)  # noqa: E731
    pairs = [(rand(p), rand(c), rand(r)) for p, c, r in spec]
    b = args.pairs
    # full (unshared) sequences: chosen_1..chosen_B, rejected_1..rejected_B
    seqs = [torch.cat([p, c]) for p, c, _ in pairs] + [torch.cat([p, r]) for p, _, r in pairs]
    lengths = [len(s) for s in seqs]
    seq_tokens = sum(lengths)
    lmax = max(lengths)

    if args.mode in ("packed", "packed_shared"):
        toks, pos, segs, prefix, reward_pos = [], [], [], [], []
        t = 0
        if args.mode == "packed":
            # every full sequence its own segment; pair i = segments (i, B + i)
            for s_ in seqs:
                toks.append(s_)
                pos.append(torch.arange(len(s_)))
                segs.append(len(s_))
                prefix.append((0, 0))
                t += len(s_)
                reward_pos.append(t - 1)
            chosen, rejected = torch.arange(b), torch.arange(b) + b
        else:
            # [prompt][chosen][rejected]: responses attend to the prompt (shared prefix) and
            # continue its positions; rewards ordered (c_1, r_1, c_2, r_2, ...)
            for p, c, r in pairs:
                p_start = t
                toks.append(p)
                pos.append(torch.arange(len(p)))
                segs.append(len(p))
                prefix.append((0, 0))
                t += len(p)
                for resp in (c, r):
                    toks.append(resp)
                    pos.append(torch.arange(len(p), len(p) + len(resp)))
                    segs.append(len(resp))
                    prefix.append((p_start, p_start + len(p)))
                    t += len(resp)
                    reward_pos.append(t - 1)
            chosen, rejected = torch.arange(0, 2 * b, 2), torch.arange(1, 2 * b, 2)
        cu = torch.zeros(len(segs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(segs), 0)
        batch = PackedBatch(
            tokens=torch.cat(toks)[None], position_ids=torch.cat(pos)[None], cu_seqlens=cu,
            segment_prefix=torch.tensor(prefix, dtype=torch.int32),
            reward_positions=torch.tensor(reward_pos), chosen_index=chosen,
            rejected_index=rejected,
        )
        batch.validate()
        processed = batch.num_tokens
        pre = batch.segment_prefix
        flop_segments = list(zip(segs, (pre[:, 1] - pre[:, 0]).tolist()))
        head_tokens = 2 * b

        def step():
            r = model.rewards(batch)                          # head at 2B positions only
            loss = comparison_loss(r, batch.chosen_index, batch.rejected_index)
            loss.backward()
            return loss
    else:
        tokens = torch.zeros(2 * b, lmax, dtype=torch.long)
        for i, s_ in enumerate(seqs):
            tokens[i, : len(s_)] = s_
        last = torch.tensor(lengths) - 1
        processed = 2 * b * lmax
        flop_segments = [(lmax, 0)] * (2 * b)
        head_tokens = processed

        def step():
            hidden = model.forward_padded(tokens)            # [2B, L, D], causal SDPA
            all_r = model.head(hidden).squeeze(-1).float()   # [2B, L]: head over every token
            r = all_r[torch.arange(2 * b), last]
            loss = pair_loss(r[:b], r[b:])
            loss.backward()
            return loss

    rss0 = common.rss_bytes()
    times, loss = [], None
    for i in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    peak = common.peak_rss_bytes()
    flops = analytic_flops(cfg, flop_segments, head_tokens)
    flops_plain = analytic_flops(cfg, [(L, 0) for L in lengths], 2 * b)
    pad = processed - seq_tokens if args.mode == "padded" else 0
    return {
        "model": args.model, "mode": args.mode, "pairs": b, "loss": float(loss),
        "sequence_tokens": seq_tokens, "processed_tokens": processed, "max_len": lmax,
        "prompt_tokens_saved": seq_tokens - processed if args.mode == "packed_shared" else 0,
        "time_s": {"min": min(times), "median": statistics.median(times), "max": max(times),
                   "all": times},
        "real_tokens_per_s": seq_tokens / statistics.median(times),
        "peak_step_memory_mib": max(0, peak - rss0) / 2**20,
        "pad_token_fraction": pad / processed,
        "pad_flop_fraction": max(0.0, 1.0 - flops_plain / flops) if args.mode == "padded" else 0.0,
        "flops_vs_plain_packed": flops / flops_plain,
        "gflops_per_step": flops / 1e9,
    }


def attention_micro(args) -> dict:
    """Attention alone (fwd + bwd) on one packed row: fastrm's grouped per-segment SDPA vs a
    block-diagonal ``[T, T]`` mask over the whole row vs one SDPA call per segment."""
    import torch.nn.functional as F

    from fastrm.attention import VarlenMetadata, varlen_attention

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    lens, t = [], 0
    while t < args.attn_tokens:
        n = int(np.clip(round(rng.lognormal(np.log(args.prompt_median + args.response_median),
                                           args.sigma)), 1, args.max_len))
        n = min(n, args.attn_tokens - t)
        lens.append(n)
        t += n
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    h, hk, d = 8, 2, 64
    q = torch.randn(t, h, d, requires_grad=True)
    k = torch.randn(t, hk, d, requires_grad=True)
    v = torch.randn(t, hk, d, requires_grad=True)
    go = torch.randn(t, h, d)

    def grouped():
        meta = VarlenMetadata.build(cu)  # per step, as in the model (plan built once, reused)
        return varlen_attention(q, k, v, metadata=meta, backend="sdpa_segments")

    def block_diagonal():
        mask = VarlenMetadata.build(cu).dense_mask()
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    def per_segment_loop():
        outs = []
        c = cu.tolist()
        for a, b in zip(c, c[1:]):
            outs.append(F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, enable_gqa=True).transpose(0, 1))
        return torch.cat(outs)

    res = {"tokens": t, "segments": len(lens), "distinct_lengths": len(set(lens)),
           "heads": h, "kv_heads": hk, "head_dim": d, "methods": {}}
    ref = None
    for name, fn in (("sdpa_segments (fastrm)", grouped), ("block-diagonal [T,T] mask", block_diagonal),
                     ("SDPA per segment, python loop", per_segment_loop)):
        times = []
        for i in range(args.warmup + args.repeats):
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            out = fn()
            out.backward(go)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if ref is None:
            ref = out.detach()
        res["methods"][name] = {
            "min": min(times), "median": statistics.median(times), "max": max(times),
            "max_abs_diff_vs_fastrm": float((out.detach() - ref).abs().max()),
        }
    return res


def plot(result: dict, path: Path) -> None:
    """Bar charts: real tokens/s and peak step memory, packed vs padded, per model."""
    plt = common.pyplot()
    models = list(result["model_configs"])
    runs = {(r["model"], r["mode"]): r for r in result["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(models))
    for ax, key, title in ((axes[0], "real_tokens_per_s", "real tokens / s (median step)"),
                           (axes[1], "peak_step_memory_mib", "peak step memory (MiB)")):
        for j, mode in enumerate(MODES):
            vals = [runs[(m, mode)][key] for m in models]
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=mode)
        ax.set_xticks(x, models)
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.suptitle(f"{result['settings']['pairs']} pairs, long-tailed lengths, CPU fwd+bwd", fontsize=10)
    common.save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,medium")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-median", type=int, default=48, help="median prompt length")
    p.add_argument("--response-median", type=int, default=48, help="median response length")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma (tail weight)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1: stable timings on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-tokens", type=int, default=4096,
                   help="row length of the attention-only micro benchmark (0: skip it)")
    p.add_argument("--out", default=str(RESULTS / "packed_model_cpu.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return

    from tqdm import tqdm

    runs = []
    jobs = [(m, mode) for m in args.models.split(",") for mode in MODES]
    for m, mode in tqdm(jobs, desc="bench_packed_model"):
        cmd = [sys.executable, __file__, "--worker", "--model", m, "--mode", mode]
        for k in ("pairs", "repeats", "warmup", "prompt_median", "response_median", "sigma",
                  "max_len", "threads", "seed"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    header = (f"{'model':7} {'mode':13} {'seq tok':>7} {'computed':>8} {'t min':>7} "
              f"{'t med':>7} {'t max':>7} {'real tok/s':>10} {'peak MiB':>8} {'pad tok':>7} "
              f"{'pad FLOP':>8} {'FLOP/plain':>10} {'loss':>8}")
    lines = [header, "-" * len(header)]
    for r in runs:
        t = r["time_s"]
        lines.append(
            f"{r['model']:7} {r['mode']:13} {r['sequence_tokens']:7d} {r['processed_tokens']:8d} "
            f"{t['min']:7.3f} {t['median']:7.3f} {t['max']:7.3f} {r['real_tokens_per_s']:10.0f} "
            f"{r['peak_step_memory_mib']:8.0f} {r['pad_token_fraction']:7.1%} "
            f"{r['pad_flop_fraction']:8.1%} {r['flops_vs_plain_packed']:10.2f} {r['loss']:8.5f}"
        )
    summary = {}
    for m in args.models.split(","):
        by = {r["mode"]: r for r in runs if r["model"] == m}
        pk, sh, pd = by["packed"], by["packed_shared"], by["padded"]
        med = lambda r: r["time_s"]["median"]  # noqa: E731
        mem = lambda r: max(r["peak_step_memory_mib"], 1e-9)  # noqa: E731
        summary[m] = {
            "speedup_packed_vs_padded": med(pd) / med(pk),
            "speedup_shared_vs_padded": med(pd) / med(sh),
            "speedup_shared_vs_packed": med(pk) / med(sh),
            "memory_ratio_padded_vs_packed": mem(pd) / mem(pk),
            "memory_ratio_padded_vs_shared": mem(pd) / mem(sh),
            "loss_abs_diff_packed_padded": abs(pk["loss"] - pd["loss"]),
            "loss_abs_diff_shared_padded": abs(sh["loss"] - pd["loss"]),
        }
        s_ = summary[m]
        lines.append(
            f"{m}: median step speedup vs padded: packed {s_['speedup_packed_vs_padded']:.2f}x, "
            f"packed_shared {s_['speedup_shared_vs_padded']:.2f}x "
            f"(shared vs packed {s_['speedup_shared_vs_packed']:.2f}x); step memory padded/packed "
            f"{s_['memory_ratio_padded_vs_packed']:.2f}x; |loss - loss_padded| packed "
            f"{s_['loss_abs_diff_packed_padded']:.1e}, shared {s_['loss_abs_diff_shared_padded']:.1e}")
    attn = None
    if args.attn_tokens:
        attn = attention_micro(args)
        lines.append("")
        lines.append(f"attention only, fwd+bwd, one row of T={attn['tokens']} tokens, "
                     f"{attn['segments']} segments ({attn['distinct_lengths']} distinct lengths), "
                     f"H={attn['heads']}, H_kv={attn['kv_heads']}, D={attn['head_dim']}:")
        for name, r in attn["methods"].items():
            lines.append(f"  {name:32} min {r['min']:.3f}s  median {r['median']:.3f}s  "
                         f"max {r['max']:.3f}s  (max |diff| {r['max_abs_diff_vs_fastrm']:.1e})")
    table = "\n".join(lines)
    print(table)
    result = {
        "benchmark": "packed_model_cpu",
        "description": "forward+backward of a BT reward-model step, packed vs padded (pad to "
                       "longest, chosen+rejected concatenated, head over every token)",
        "settings": {k: getattr(args, k) for k in
                     ("models", "pairs", "repeats", "warmup", "prompt_median", "response_median",
                      "sigma", "max_len", "threads", "seed")},
        "model_configs": {m: MODELS[m] for m in args.models.split(",")},
        "machine": common.machine_info(args.threads),
        "note": "CPU shared with other processes; times are indicative",
        "runs": runs,
        "summary": summary,
        "attention_micro": attn,
        "table": table,
    }
    common.write_json(Path(args.out), result, indent=2)
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"saved {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
