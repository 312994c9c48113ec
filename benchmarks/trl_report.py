"""The Markdown table and PNG of a ``bench_trl.py`` result (``--report-only`` rewrites them from
the JSON). Memory is labelled by device: peak RSS of the run's process on CPU, torch's peak
allocated CUDA memory on a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
from trl_plan import CONFIGS


def memory_label(result: dict[str, Any]) -> str:
    """The memory column's name for the result's device."""
    return ("peak CUDA allocated" if result["spec"].get("device", "cpu") == "cuda"
            else "peak RSS")


def _mem(summary: dict[str, Any]) -> float:
    return summary.get("peak_memory_gib", summary.get("peak_rss_gib"))  # older results: RSS


def _backends(result: dict[str, Any]) -> str:
    names = sorted({run.get("attention_backend", "?") for r in result["datasets"].values()
                    for run in r.get("runs", {}).values() if run.get("side") == "fastrm"
                    and "error" not in run})
    return "/".join(names) if names else "n/a"


def _fmt_row(dataset: str, name: str, ac: bool, s: dict, lp: str, ratio: str, mem: str) -> str:
    collate = s.get("collate_s_median")
    return (f"| {dataset} | {name} | {'on' if ac else 'off'} | {s['pairs_per_s']:.3f} | "
            f"{s['real_tokens_per_s']:.0f} | {s['tokens_computed_per_step']:.0f} | "
            f"{100 * s['pad_fraction']:.1f}% | {s['step_s_min']:.2f} / {s['step_s_median']:.2f} / "
            f"{s['step_s_max']:.2f} | {'n/a' if collate is None else format(1e3 * collate, '.1f')} | "
            f"{_mem(s):.2f} | {lp} | {ratio} | {mem} |")


def _proof_lines(result: dict[str, Any]) -> list[str]:
    ps = result.get("proof_settings")
    if ps is None:
        return []
    lines = ["", "**Same work.** (1) fp32 first step, no TF32, identical weights and pairs: loss "
             f"within {ps['fp32_loss_atol']:g} and pre-clip gradient norm within "
             f"{ps['fp32_grad_norm_rtol']:g} (relative) of TRL's. (2) The first step of every "
             f"timed run, in its dtype ({result['spec']['dtype']}): |dloss| <= c u B with "
             f"c = {ps['rounding_c']:g}, u the dtype's unit roundoff and B = (1/P) sum_p "
             "sigmoid(r_rej - r_ch) (S_ch + S_rej), S = sum_d |h_d w_d| from that step's "
             "hidden states and head (`bench_trl.rounding_scale`). Later steps are reported, "
             "not checked.", "",
             "| data | check | run | TRL | fastrm | difference | allowed | |",
             "|---|---|---|---|---|---|---|---|"]
    for ds, r in result["datasets"].items():
        proof = r.get("proof", {})
        for key, c in proof.get("fp32", {}).get("checks", {}).items():
            if "error" in c:
                lines.append(f"| {ds} | fp32 | {key} | | | {c['error']} | | FAILED |")
                continue
            ok = "ok" if c["ok"] else "FAILED"
            lines.append(f"| {ds} | fp32 loss | {key} | {c['loss_trl']:.7f} | "
                         f"{c['loss_fastrm']:.7f} | {c['abs_diff_loss']:.2e} | "
                         f"{c['loss_atol']:.0e} | {ok} |")
            lines.append(f"| {ds} | fp32 grad norm | {key} | {c['grad_norm_trl']:.6g} | "
                         f"{c['grad_norm_fastrm']:.6g} | {c['rel_diff_grad_norm']:.2e} rel. | "
                         f"{c['grad_norm_rtol']:.0e} | {ok} |")
        for key, c in proof.get("first_step_bound", {}).items():
            later = c.get("later_steps_abs_diff_loss") or []
            later_s = f"; later steps max {max(later):.2e}" if later else ""
            lines.append(f"| {ds} | {result['spec']['dtype']} first step | {key} | | | "
                         f"{c['abs_diff_loss']:.2e} ({c['ratio']:.2f} of the bound{later_s}) | "
                         f"{c['bound']:.2e} (B = {c['rounding_scale']:.3g}) | "
                         f"{'ok' if c['ok'] else 'FAILED'} |")
    return lines


def write_report(result: dict[str, Any], stem: Path) -> None:
    """``stem.md`` (the table, the same-work proof) and ``stem.png`` (pairs/s and peak memory
    per run, memory labelled by device)."""
    spec, mem_name = result["spec"], memory_label(result)
    lines = [f"TRL {result['versions'].get('trl')} (transformers {result['versions'].get('transformers')}) "
             f"vs fastrm, SmolLM2-135M-Instruct, {spec.get('device', 'cpu')}, "
             f"{spec['dtype']}, "
             f"{spec['threads']} threads, batch {spec['batch_pairs']} pairs, "
             f"AdamW ({spec.get('adamw', 'foreach')}) lr {spec['lr']}, "
             f"fastrm attention {_backends(result)}, {result['mode']} mode "
             f"({spec['warmup']} warm-up + {spec['steps']} timed steps per run"
             f"{'; every step batch run once untimed first' if spec.get('shape_warmup') else ''}). "
             f"Machine: {result['machine'].get('cpu')} ({result['machine']['logical_cpus']} CPUs shared, "
             f"load average {result['machine']['load_average_1_5_15'][0]:.1f} at start, "
             f"{result['machine'].get('load_average_after', [0])[0]:.1f} at end); {result['date']}.", ""]
    if result.get("timed_span"):
        lines += [f"Timed span (both sides): {result['timed_span']}. Rates are medians over the "
                  "timed steps of each step's pairs (tokens) / step time; speed-up vs TRL is the "
                  "median over the timed steps of TRL's step time / fastrm's on the same pairs.", ""]
    lines += [f"| data | run | act. ckpt | pairs/s | real tok/s | tokens computed/step | pad | "
              f"step s min / med / max | collate ms (untimed) | {mem_name} GiB | "
              f"dropped / truncated for length | speed-up vs TRL | {mem_name} vs TRL |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
                    sp = fr.get("speedup_vs_trl",
                                fr["summary"]["pairs_per_s"] / trl["summary"]["pairs_per_s"])
                    ratio = f"{sp:.2f}x"
                    mem = f"{_mem(fr['summary']) / _mem(trl['summary']):.2f}x"
                fl = lp["fastrm_left_prompt"]
                lines.append(_fmt_row(ds, f"fastrm {cfg}", ac, fr["summary"],
                                      f"{fl['dropped']} dropped, {fl['truncated_prompts']} "
                                      "prompts left-truncated (*)", ratio, mem))
    lines += ["", "(*) fastrm's length policy (``truncation=\"left_prompt\"`` at the same bound) over "
              "the whole set: a pair is dropped only when a response alone is too long. The timed "
              "steps of both sides hold the same pairs (those TRL keeps), so the ratios compare "
              "the same work. Tokens computed: TRL `2B x L_max` (padding included), fastrm the "
              "packed row (prompts once per pair or group with prefix sharing); real tokens are "
              "the pairs' full sequences on both sides."]
    lines += _proof_lines(result)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    plt = common.pyplot()
    dsets = [d for d, r in result["datasets"].items() if "runs" in r]
    fig, axes = plt.subplots(len(dsets), 2, figsize=(12, 3.6 * max(1, len(dsets))), squeeze=False)
    names = ["TRL"] + [f"fastrm {c}" for c in CONFIGS]
    keys = ["trl"] + [f"fastrm_{c}" for c in CONFIGS]
    for row, ds in enumerate(dsets):
        runs = result["datasets"][ds]["runs"]
        for col, (metric, label) in enumerate((("pairs_per_s", "pairs/s (median)"),
                                               (None, f"{mem_name} (GiB)"))):
            ax = axes[row][col]
            for k, ac in enumerate((False, True)):
                vals = []
                for key in keys:
                    summ = runs.get(f"{key}_{int(ac)}", {}).get("summary", {})
                    vals.append((summ.get(metric, 0.0) if metric else _mem(summ) or 0.0)
                                if summ else 0.0)
                xs = [i + (k - 0.5) * 0.38 for i in range(len(keys))]
                ax.bar(xs, vals, width=0.38, label=f"act. ckpt {'on' if ac else 'off'}")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(names)
            ax.set_ylabel(label)
            ax.set_title(f"{ds} ({result['spec'].get('device', 'cpu')}, {result['spec']['dtype']}): {label}")
            ax.legend(fontsize=8)
    common.save_figure(fig, stem.with_suffix(".png"))
