"""PNG plots of the end-to-end benchmark (``bench_e2e.py``'s JSON).

* ``e2e_<device>_speedup.png``: per data set and model, the speed-up of every layout over the
  padded baseline (bar = median of per-repeat ratios, whisker = min-max), and tokens computed
  relative to padded;
* ``e2e_<device>_sweep.png``: real tokens/s and peak step memory vs the median sequence length
  (``sweep_L*`` data sets), packed vs padded.

Run:  python benchmarks/plots.py benchmarks/results/e2e_cpu_quick.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import common

COLORS = {"padded": "#9e9e9e", "packed": "#1f77b4", "packed+prefix": "#2ca02c",
          "grouped": "#d62728"}


def speedup_plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: speed-up vs padded (left) and tokens computed / padded's (right)."""
    plt = common.pyplot()
    cfgs = [c for c in result["configs"] if not c["data"].startswith("sweep_")]
    labels = [f"{c['data']}\n{c['model']}" for c in cfgs]
    layouts = [lay for lay in COLORS if any(r["layout"] == lay for c in cfgs for r in c["rows"])]
    x = np.arange(len(cfgs))
    w = 0.8 / max(1, len(layouts))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(cfgs) * 2), 4.2))
    for j, lay in enumerate(layouts):
        med, lo, hi, tok = [], [], [], []
        for c in cfgs:
            r = next((r for r in c["rows"] if r["layout"] == lay), None)
            if r is None:
                med.append(np.nan), lo.append(0), hi.append(0), tok.append(np.nan)
                continue
            s = r["speedup_vs_padded"]
            med.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            tok.append(r["tokens_vs_padded"])
        off = (j - (len(layouts) - 1) / 2) * w
        axes[0].bar(x + off, med, w, yerr=[lo, hi], capsize=2, label=lay, color=COLORS[lay])
        axes[1].bar(x + off, tok, w, label=lay, color=COLORS[lay])
    axes[0].axhline(1.0, color="k", lw=0.6)
    axes[0].set_ylabel("speed-up vs padded (epoch time)")
    axes[0].set_title("training-step speed-up (median, min-max over repeats)", fontsize=9)
    axes[1].set_ylabel("tokens computed / padded's")
    axes[1].set_title("tokens computed per epoch", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
    axes[0].legend(fontsize=8)
    info = result["machine"]
    fig.suptitle(f"fastrm end to end, {info.get('gpu') or info['cpu']}, "
                 f"{info['torch_threads']} threads, {info['date_utc']}", fontsize=9)
    return common.save_figure(fig, path)


def sweep_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Real tokens/s and peak step memory vs median sequence length, packed vs padded."""
    cfgs = [c for c in result["configs"] if c["data"].startswith("sweep_")]
    if not cfgs:
        return None
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    models = list(dict.fromkeys(c["model"] for c in cfgs))
    for m in models:
        mc = sorted((c for c in cfgs if c["model"] == m), key=lambda c: int(c["data"][7:]))
        lengths = [int(c["data"][7:]) for c in mc]
        for lay in ("padded", "packed"):
            rows = [next(r for r in c["rows"] if r["layout"] == lay) for c in mc]
            style = dict(color=COLORS[lay], marker="o", ls="-" if m == models[0] else "--",
                         label=f"{lay} ({m})")
            axes[0].plot(lengths, [r["real_tokens_per_s"] for r in rows], **style)
            mem = [r.get("peak_fwd_bwd_memory_mib") for r in rows]
            if all(v is not None for v in mem):
                axes[1].plot(lengths, mem, **style)
    for ax, t in ((axes[0], "real tokens / s"), (axes[1], "peak fwd+bwd memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("median sequence length (tokens)")
        ax.set_title(t, fontsize=9)
    axes[0].legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"{s['pairs_per_step']} pairs per step, lognormal lengths, {s['device']} "
                 f"{s['dtype']}, {result['machine']['date_utc']}", fontsize=9)
    return common.save_figure(fig, path)


def plot_all(json_path: Path) -> list[Path]:
    """Every plot of one bench_e2e JSON, beside it; returns the PNG paths."""
    result = json.loads(Path(json_path).read_text())
    stem = Path(json_path).with_suffix("")
    out = [speedup_plot(result, Path(f"{stem}_speedup.png"))]
    sw = sweep_plot(result, Path(f"{stem}_sweep.png"))
    if sw is not None:
        out.append(sw)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="bench_e2e result files")
    for path in p.parse_args().json:
        for png in plot_all(Path(path)):
            print(f"saved {png}")


if __name__ == "__main__":
    main()
