"""The Markdown table and PNG of a ``bench_trl.py`` result (``--report-only`` rewrites them from
the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
from trl_plan import CONFIGS


def _mem_name(result: dict[str, Any]) -> str:
    return "peak allocated" if result["spec"].get("device", "cpu") == "cuda" else "peak RSS"


def _backends(result: dict[str, Any]) -> str:
    names = sorted({run.get("attention_backend", "?") for r in result["datasets"].values()
                    for run in r.get("runs", {}).values() if run.get("side") == "fastrm"
                    and "error" not in run})
    return "/".join(names) if names else "n/a"


def _fmt_row(dataset: str, name: str, ac: bool, s: dict, lp: str, ratio: str, mem: str) -> str:
    return (f"| {dataset} | {name} | {'on' if ac else 'off'} | {s['pairs_per_s']:.3f} | "
            f"{s['real_tokens_per_s']:.0f} | {s['tokens_computed_per_step']:.0f} | "
            f"{100 * s['pad_fraction']:.1f}% | {s['step_s_min']:.1f} / {s['step_s_median']:.1f} / "
            f"{s['step_s_max']:.1f} | {s['peak_rss_gib']:.2f} | {lp} | {ratio} | {mem} |")


def write_report(result: dict[str, Any], stem: Path) -> None:
    """``stem.md`` (the table, loss agreement) and ``stem.png`` (pairs/s and peak memory per run)."""
    lines = [f"TRL {result['versions'].get('trl')} (transformers {result['versions'].get('transformers')}) "
             f"vs fastrm, SmolLM2-135M-Instruct, {result['spec'].get('device', 'cpu')}, "
             f"{result['spec']['dtype']}, "
             f"{result['spec']['threads']} threads, batch {result['spec']['batch_pairs']} pairs, "
             f"AdamW ({result['spec'].get('adamw', 'foreach')}) lr {result['spec']['lr']}, "
             f"fastrm attention {_backends(result)}, {result['mode']} mode "
             f"({result['spec']['warmup']} warm-up + {result['spec']['steps']} timed steps per run). "
             f"Machine: {result['machine'].get('cpu')} ({result['machine']['logical_cpus']} CPUs shared, "
             f"load average {result['machine']['load_average_1_5_15'][0]:.1f} at start, "
             f"{result['machine'].get('load_average_after', [0])[0]:.1f} at end); {result['date']}.", "",
             f"| data | run | act. ckpt | pairs/s | real tok/s | tokens computed/step | pad | "
             f"step s min / med / max | {_mem_name(result)} GiB | dropped / truncated for length | "
             f"pairs/s vs TRL | {_mem_name(result)} vs TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ds, r in result["datasets"].items():
        if "error" in r:
            lines.append(f"| {ds} | skipped: {r['error']} |")
            continue
        lp = r["length_policy"]
        for ac in (False, True):
            trl = r["runs"].get(f"trl_{int(ac)}")
            if trl is None:
                continue
            if "error" in trl:
                lines.append(f"| {ds} | TRL RewardTrainer | {'on' if ac else 'off'} | {trl['error']} |")
            else:
                lines.append(_fmt_row(ds, "TRL RewardTrainer", ac, trl["summary"],
                                      f"{lp['trl_dropped']} of {lp['pairs']} dropped", "1.00x",
                                      "1.00x"))
            for cfg in CONFIGS:
                fr = r["runs"].get(f"fastrm_{cfg}_{int(ac)}")
                if fr is None:
                    continue
                if "error" in fr:
                    lines.append(f"| {ds} | fastrm {cfg} | {'on' if ac else 'off'} | {fr['error']} |")
                    continue
                ratio = mem = "n/a"
                if trl is not None and "error" not in trl:
                    ratio = f"{fr['summary']['pairs_per_s'] / trl['summary']['pairs_per_s']:.2f}x"
                    mem = f"{fr['summary']['peak_rss_gib'] / trl['summary']['peak_rss_gib']:.2f}x"
                fl = lp["fastrm_left_prompt"]
                lines.append(_fmt_row(ds, f"fastrm {cfg}", ac, fr["summary"],
                                      f"{fl['dropped']} dropped, {fl['truncated_prompts']} "
                                      "prompts left-truncated (*)", ratio, mem))
    lines += ["", "(*) fastrm's length policy (``truncation=\"left_prompt\"`` at the same bound) over "
              "the whole set: a pair is dropped only when a response alone is too long. The timed "
              "steps of both sides hold the same pairs (those TRL keeps), so the ratios compare "
              "the same work. Tokens computed: TRL `2B x L_max` (padding included), fastrm the "
              "packed row (prompts once per pair or group with prefix sharing); real tokens are "
              "the pairs' full sequences on both sides.",
              "", "Loss agreement with TRL (same pairs, same steps): "]
    for ds, r in result["datasets"].items():
        for key, chk in r.get("loss_check", {}).items():
            lines.append(f"- {ds} {key}: first step |dloss| {chk['max_abs_diff_first']:.2e}, "
                         f"later steps max {chk['max_abs_diff_later'] if chk['max_abs_diff_later'] is None else format(chk['max_abs_diff_later'], '.2e')}"
                         f" ({'ok' if chk['ok'] else 'FAILED'})")
    lines.append(f"\nTolerances: first step {result['tolerance']['first']}, later steps "
                 f"{result['tolerance']['later']} (absolute, on the Bradley-Terry loss).")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    plt = common.pyplot()
    dsets = [d for d, r in result["datasets"].items() if "runs" in r]
    fig, axes = plt.subplots(len(dsets), 2, figsize=(12, 3.6 * max(1, len(dsets))), squeeze=False)
    names = ["TRL"] + [f"fastrm {c}" for c in CONFIGS]
    keys = ["trl"] + [f"fastrm_{c}" for c in CONFIGS]
    for row, ds in enumerate(dsets):
        runs = result["datasets"][ds]["runs"]
        for col, (metric, label) in enumerate((("pairs_per_s", "pairs/s"),
                                               ("peak_rss_gib", "peak RSS (GiB)"))):
            ax = axes[row][col]
            for k, ac in enumerate((False, True)):
                vals = [runs.get(f"{key}_{int(ac)}", {}).get("summary", {}).get(metric, 0.0)
                        for key in keys]
                xs = [i + (k - 0.5) * 0.38 for i in range(len(keys))]
                ax.bar(xs, vals, width=0.38, label=f"act. ckpt {'on' if ac else 'off'}")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(names)
            ax.set_ylabel(label)
            ax.set_title(f"{ds}: {label}")
            ax.legend(fontsize=8)
    common.save_figure(fig, stem.with_suffix(".png"))
