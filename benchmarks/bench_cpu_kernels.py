"""fastrm's CPU kernels against the torch paths they replace, side by side in one run.

Two parts, both on SmolLM2-135M shapes (D = 576, 9 query / 3 kv heads of 64, MLP 1536):

``attention``
    packed causal attention forward and forward + backward, bf16: ``cpu_flash`` (fastrm's
    AVX-512 BF16 kernels) vs ``sdpa_segments`` (torch's SDPA per group of equal-length
    segments, the exact path fastrm used before and still uses elsewhere), on layouts a reward
    model sees: one long sequence, qa-feedback-like packed pairs (8 sequences of ~700-850
    tokens), the same pairs grouped (prompt once, responses with the prompt as prefix), many
    short sequences. Both backends' results are compared (relative error of the output).
``layers``
    decoder layers of the packed reward model, forward + backward, fp32 and bf16:
    ``fused_ops=True`` (fastrm's RMSNorm / SwiGLU / RoPE ops, norm outputs recomputed) vs
    torchtune's own modules, and the bytes autograd keeps for the backward per token and layer.

Timing: ``--repeats`` interleaved repeats (the two sides alternate), after a warm-up; cells are
the median with min-max, the speed-up is the ratio of medians from the same run. Threads:
``--threads`` (default 1, see benchmarks/README.md on shared CPUs).

Run:  python benchmarks/bench_cpu_kernels.py [--quick]
Writes results/cpu_kernels[_quick].json, .md and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import common
from common import RESULTS

H, HK, HD = 9, 3, 64


def _segments(lens: list[int], prefix_of: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    pre = torch.zeros(len(lens), 2, dtype=torch.int32)
    for s, p in prefix_of.items():
        pre[s] = torch.tensor([int(cu[p]), int(cu[p + 1])])
    return cu, pre


def layouts(quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named packed layouts: ``(cu_seqlens, segment_prefix)``."""
    pairs = [715, 715, 715, 763, 770, 771, 843, 846]
    out = {
        "one 1024-token sequence": _segments([1024], {}),
        "8 qa-feedback-like sequences (6.1k tokens)": _segments(pairs, {}),
        "2 prompts x 3 responses, prefix shared": _segments(
            [745, 98, 101, 111, 657, 113, 58, 114], {1: 0, 2: 0, 3: 0, 5: 4, 6: 4, 7: 4}),
        "64 sequences of 64 tokens": _segments([64] * 64, {}),
    }
    if not quick:
        out["one 2048-token sequence"] = _segments([2048], {})
    return out


def attention_inputs(cu: torch.Tensor, pre: torch.Tensor, seed: int = 0):
    """Random bf16 ``q [T, H, D]``, ``k, v [T, H_kv, D]``, ``grad_out`` and the layout's
    :class:`VarlenMetadata` (no prefix table when no segment has one)."""
    from fastrm.attention import VarlenMetadata

    t = int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, H, HD, generator=g).bfloat16().requires_grad_()
    k = torch.randn(t, HK, HD, generator=g).bfloat16().requires_grad_()
    v = torch.randn(t, HK, HD, generator=g).bfloat16().requires_grad_()
    go = torch.randn(t, H, HD, generator=g).bfloat16()
    meta = VarlenMetadata.build(cu, pre if bool((pre[:, 1] > pre[:, 0]).any()) else None)
    return q, k, v, go, meta


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(ts: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def bench_attention(quick: bool, repeats: int) -> list[dict[str, Any]]:
    from fastrm.attention import varlen_attention
    from fastrm.attention.varlen import cpu_flash_unavailable_reason

    reason = cpu_flash_unavailable_reason(torch.zeros(1, 1, HD, dtype=torch.bfloat16))
    if reason:
        print(f"attention: skipped ({reason})")
        return [{"skipped": reason}]
    rows = []
    for name, (cu, pre) in layouts(quick).items():
        t = int(cu[-1])
        q, k, v, go, meta = attention_inputs(cu, pre)
        outs = {}

        def fwd(be):
            with torch.no_grad():
                outs[be] = varlen_attention(q, k, v, metadata=meta, backend=be)

        def fwd_bwd(be):
            o = varlen_attention(q, k, v, metadata=meta, backend=be)
            torch.autograd.grad(o, (q, k, v), go)

        res = {be: {"fwd": [], "fwd_bwd": []} for be in ("sdpa_segments", "cpu_flash")}
        for r in range(repeats + 1):
            order = ("sdpa_segments", "cpu_flash") if r % 2 else ("cpu_flash", "sdpa_segments")
            for be in order:
                tf, tb = _time(lambda: fwd(be)), _time(lambda: fwd_bwd(be))
                if r:  # r == 0 is the warm-up
                    res[be]["fwd"].append(tf)
                    res[be]["fwd_bwd"].append(tb)
        err = float((outs["cpu_flash"].double() - outs["sdpa_segments"].double()).norm()
                    / outs["sdpa_segments"].double().norm())
        row = {"layout": name, "tokens": t, "rel_diff_out": err}
        for be in res:
            row[be] = {k_: _stats(v_) for k_, v_ in res[be].items()}
        row["speedup_fwd"] = row["sdpa_segments"]["fwd"]["median_ms"] / row["cpu_flash"]["fwd"]["median_ms"]
        row["speedup_fwd_bwd"] = (row["sdpa_segments"]["fwd_bwd"]["median_ms"]
                                  / row["cpu_flash"]["fwd_bwd"]["median_ms"])
        print(f"attention | {name}: fwd+bwd sdpa {row['sdpa_segments']['fwd_bwd']['median_ms']:.1f} ms, "
              f"cpu_flash {row['cpu_flash']['fwd_bwd']['median_ms']:.1f} ms ({row['speedup_fwd_bwd']:.2f}x), "
              f"out rel diff {err:.1e}", flush=True)
        rows.append(row)
    return rows


def bench_layers(quick: bool, repeats: int, num_layers: int) -> list[dict[str, Any]]:
    from fastrm.data import collate_packed
    from fastrm.data.group import PreferenceGroup
    from fastrm.models import reward_model
    from fastrm.models.fused import saved_activation_bytes

    g = torch.Generator().manual_seed(1)
    groups = []
    for i in range(4):
        lens = torch.randint(550, 750, (1,), generator=g).item(), *torch.randint(60, 140, (2,), generator=g).tolist()
        toks = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lens]
        groups.append(PreferenceGroup(prompt_tokens=toks[0], responses=toks[1:],
                                      comparisons=[(0, 1, None)], prompt_id=i, source_index=i))
    batch = collate_packed(groups, prefix_sharing=False)
    t = batch.tokens.shape[1]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {}
        for fused in (False, True):
            torch.manual_seed(0)
            m = reward_model("fastrm.models.smollm2.smollm2_135m", fused_ops=fused)
            m.decoder.layers = m.decoder.layers[:num_layers]
            models[fused] = m.to(dtype)
        models[False].load_state_dict(models[True].state_dict())

        def step(m):
            h = m(batch)
            (h.float().square().mean()).backward()
            m.zero_grad(set_to_none=True)

        times = {False: [], True: []}
        for r in range(repeats + 1):
            for fused in ((False, True) if r % 2 else (True, False)):
                dt = _time(lambda: step(models[fused]))
                if r:
                    times[fused].append(dt)
        kept = {f: saved_activation_bytes(lambda: models[f](batch), models[f].parameters())
                / t / num_layers for f in (False, True)}
        with torch.no_grad():
            h0, h1 = models[False](batch), models[True](batch)
        err = float((h1.double() - h0.double()).norm() / h0.double().norm())
        row = {"dtype": str(dtype).replace("torch.", ""), "tokens": t, "layers": num_layers,
               "torchtune": _stats(times[False]), "fused": _stats(times[True]),
               "kept_bytes_per_token_layer": {"torchtune": kept[False], "fused": kept[True]},
               "rel_diff_hidden": err}
        row["speedup"] = row["torchtune"]["median_ms"] / row["fused"]["median_ms"]
        row["memory_ratio"] = kept[True] / kept[False]
        print(f"layers | {row['dtype']}: torchtune {row['torchtune']['median_ms']:.0f} ms, fused "
              f"{row['fused']['median_ms']:.0f} ms ({row['speedup']:.2f}x); kept for backward "
              f"{kept[False] / 1024:.1f} -> {kept[True] / 1024:.1f} KiB per token and layer "
              f"({row['memory_ratio']:.2f}x); hidden rel diff {err:.1e}", flush=True)
        rows.append(row)
    return rows


def _cell(s: dict[str, float]) -> str:
    return f"{s['median_ms']:.1f} ({s['min_ms']:.1f}-{s['max_ms']:.1f})"


def write_report(result: dict[str, Any], stem: Path) -> None:
    """``stem.md`` (both tables) and ``stem.png`` (attention time, layer activation memory)."""
    lines = [f"CPU kernels: {common.machine_line(result['machine'])}; {result['repeats']} interleaved "
             "repeats; cells: median (min-max) ms.", ""]
    att = [r for r in result["attention"] if "skipped" not in r]
    if att:
        lines += ["Packed attention, bf16, 9 / 3 heads of 64 (SmolLM2-135M):", "",
                  "| layout | tokens | sdpa_segments fwd | cpu_flash fwd | fwd speed-up | "
                  "sdpa_segments fwd+bwd | cpu_flash fwd+bwd | fwd+bwd speed-up | out rel. diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in att:
            lines.append(f"| {r['layout']} | {r['tokens']} | {_cell(r['sdpa_segments']['fwd'])} | "
                         f"{_cell(r['cpu_flash']['fwd'])} | {r['speedup_fwd']:.2f}x | "
                         f"{_cell(r['sdpa_segments']['fwd_bwd'])} | {_cell(r['cpu_flash']['fwd_bwd'])} | "
                         f"{r['speedup_fwd_bwd']:.2f}x | {r['rel_diff_out']:.1e} |")
    elif result["attention"]:
        lines.append(f"Packed attention: skipped ({result['attention'][0]['skipped']})")
    lines += ["", f"Decoder layers (SmolLM2-135M shape, {result['layers'][0]['layers']} layers, "
              f"{result['layers'][0]['tokens']} packed tokens), forward + backward:", "",
              "| dtype | torchtune modules | fastrm fused ops | speed-up | kept for backward, "
              "KiB / token / layer (torchtune -> fused) | memory ratio | hidden rel. diff |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["layers"]:
        kb = r["kept_bytes_per_token_layer"]
        lines.append(f"| {r['dtype']} | {_cell(r['torchtune'])} | {_cell(r['fused'])} | "
                     f"{r['speedup']:.2f}x | {kb['torchtune'] / 1024:.1f} -> {kb['fused'] / 1024:.1f} | "
                     f"{r['memory_ratio']:.2f}x | {r['rel_diff_hidden']:.1e} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    if att:
        ax = axes[0]
        names = [r["layout"] for r in att]
        xs = range(len(att))
        ax.bar([x - 0.2 for x in xs], [r["sdpa_segments"]["fwd_bwd"]["median_ms"] for r in att], 0.4,
               label="sdpa_segments")
        ax.bar([x + 0.2 for x in xs], [r["cpu_flash"]["fwd_bwd"]["median_ms"] for r in att], 0.4,
               label="cpu_flash")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n[:28] for n in names], rotation=15, fontsize=7)
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title("packed attention, bf16")
        ax.legend()
    ax = axes[1]
    lr = result["layers"]
    xs = range(len(lr))
    ax.bar([x - 0.2 for x in xs], [r["kept_bytes_per_token_layer"]["torchtune"] / 1024 for r in lr], 0.4,
           label="torchtune modules")
    ax.bar([x + 0.2 for x in xs], [r["kept_bytes_per_token_layer"]["fused"] / 1024 for r in lr], 0.4,
           label="fastrm fused ops")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['dtype']} ({r['speedup']:.2f}x faster)" for r in lr])
    ax.set_ylabel("KiB kept for backward / token / layer")
    ax.set_title("decoder layer activations")
    ax.legend()
    common.save_figure(fig, stem.with_suffix(".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer layouts and repeats (a minute)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 quick, 7)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2 quick, 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="output stem (default results/cpu_kernels[_quick])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    result = {"date": common.utc_now(), "threads": args.threads, "repeats": repeats,
              "machine": common.machine_info(args.threads)}
    result["attention"] = bench_attention(args.quick, repeats)
    result["layers"] = bench_layers(args.quick, repeats, args.layers or (2 if args.quick else 6))
    stem = Path(args.out) if args.out else RESULTS / f"cpu_kernels{'_quick' if args.quick else ''}"
    common.write_json(stem.with_suffix(".json"), result)
    write_report(result, stem)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
