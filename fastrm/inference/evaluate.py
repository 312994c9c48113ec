"""Pairwise evaluation of a reward model: ``fastrm eval`` and :func:`evaluate_pairs`.

Data: preference rows (``chosen`` / ``rejected`` with an optional ``prompt``, every layout of
:class:`fastrm.data.formats.PairTransform`; the category is the ``category`` column, else
RewardBench's ``subset``) or any fastrm dataset (a :class:`~fastrm.data.PreferenceDataset` of
groups with comparisons, e.g. ``fastrm.datasets.synthetic_preference_dataset``). Each group is
scored with its prompt computed once (:meth:`RewardScorer.score_groups`).

Metrics (:func:`pair_metrics`):

* ``accuracy``: fraction of comparisons with ``r_chosen > r_rejected`` (a tie is wrong, as in
  RewardBench; ``ties`` counts them); ``accuracy_by_category``; ``mean_category_accuracy`` (each
  category weighs the same);
* ``margin``: statistics of ``r_chosen - r_rejected`` (mean, std, min, 5/25/50/75/95th
  percentiles, max); ``chosen`` / ``rejected``: mean and std of the rewards;
* ``rewardbench``: the four section scores and their mean when categories are RewardBench
  subsets (:mod:`fastrm.inference.rewardbench`).

Rewards are the scorer's (normalized when it normalizes: the accuracy does not change).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fastrm.data.group import PreferenceGroup
from fastrm.inference.rewardbench import is_rewardbench, section_scores

__all__ = ["evaluate_pairs", "pair_metrics", "score_pairs", "pair_groups", "format_table",
           "write_report"]


def pair_groups(rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[PreferenceGroup]:
    """Preference rows -> groups with comparisons (the training data path: PairTransform,
    tokenize_group). The category column is ``category``, else ``subset`` (RewardBench). Pairs
    whose chosen and rejected texts are identical are dropped (they cannot be ranked)."""
    from fastrm.data.dataset import PreferenceDataset

    column_map = {}
    if rows and "category" not in rows[0] and "subset" in rows[0]:
        column_map["category"] = "subset"
    ds = PreferenceDataset(tokenizer, data=list(rows), column_map=column_map,
                           on_identical="drop", progress=False)
    return list(ds.groups)


def score_pairs(scorer, groups: Sequence[PreferenceGroup], progress: bool = False
                ) -> dict[str, list]:
    """Scores every comparison of ``groups``: ``{"chosen": [P], "rejected": [P], "category":
    [P], "row": [P]}`` (rewards normalized when the scorer normalizes). Groups are scored in
    chunks of about ``scorer.chunk_tokens`` tokens (a progress bar in pairs with ``progress``)."""
    from tqdm.auto import tqdm

    from fastrm.data.batch import shares_prefix

    out: dict[str, list] = {"chosen": [], "rejected": [], "category": [], "row": []}
    bar = tqdm(total=sum(len(g.comparisons) for g in groups), unit="pair", desc="evaluating",
               disable=not progress, dynamic_ncols=True)
    chunk: list[PreferenceGroup] = []
    tokens = 0
    for n, g in enumerate(groups):
        chunk.append(g)
        tokens += g.num_tokens(shares_prefix(g, True))
        if tokens < scorer.chunk_tokens and n + 1 < len(groups):
            continue
        for cg, r in zip(chunk, scorer.score_groups(chunk)):
            r = scorer.normalized(r)
            for i, j, _ in cg.comparisons:
                out["chosen"].append(r[i])
                out["rejected"].append(r[j])
                out["category"].append(cg.category or "")
                out["row"].append(cg.source_index)
            bar.update(len(cg.comparisons))
        chunk, tokens = [], 0
    bar.close()
    return out


def _stats(x: np.ndarray) -> dict[str, float]:
    if not x.size:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(x.mean()), "std": float(x.std())}


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float],
                 categories: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The metrics of the module docstring from per-comparison rewards."""
    rc = np.asarray(chosen, np.float64)
    rr = np.asarray(rejected, np.float64)
    if rc.shape != rr.shape or rc.ndim != 1:
        raise ValueError(f"chosen {rc.shape} and rejected {rr.shape} must be equal-length lists")
    cats = list(categories) if categories is not None else [""] * rc.size
    if len(cats) != rc.size:
        raise ValueError(f"categories has {len(cats)} entries for {rc.size} comparisons")
    win = rc > rr
    margin = rc - rr
    q = (np.percentile(margin, [5, 25, 50, 75, 95]) if margin.size else [math.nan] * 5)
    out: dict[str, Any] = {
        "pairs": int(rc.size),
        "accuracy": float(win.mean()) if rc.size else math.nan,
        "ties": int((rc == rr).sum()),
        "margin": {**_stats(margin),
                   "min": float(margin.min()) if margin.size else math.nan,
                   **{f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), q)},
                   "max": float(margin.max()) if margin.size else math.nan},
        "chosen": _stats(rc),
        "rejected": _stats(rr),
    }
    named = sorted({c for c in cats if c})
    if named:
        arr = np.asarray(cats, dtype=object)
        by = {}
        for c in named:
            m = arr == c
            by[c] = {"accuracy": float(win[m].mean()), "pairs": int(m.sum()),
                     "margin_mean": float(margin[m].mean())}
        if any(not c for c in cats):
            m = arr == ""
            by["(none)"] = {"accuracy": float(win[m].mean()), "pairs": int(m.sum()),
                            "margin_mean": float(margin[m].mean())}
        out["accuracy_by_category"] = by
        out["mean_category_accuracy"] = float(np.mean([v["accuracy"] for v in by.values()]))
        if is_rewardbench(named):
            out["rewardbench"] = section_scores({c: v["accuracy"] for c, v in by.items()})
    return out


def evaluate_pairs(scorer, data, *, return_scores: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    """Pairwise accuracy, per-category accuracy, margin statistics and (RewardBench data) the
    section scores of ``scorer`` on ``data``: preference rows (dicts) or a sequence of
    :class:`PreferenceGroup` (a fastrm dataset). With ``return_scores`` the result also holds
    ``"scores"``: the per-comparison rewards of :func:`score_pairs`; ``progress`` shows a bar."""
    items = [data[i] for i in range(len(data))]
    if items and all(isinstance(x, PreferenceGroup) for x in items):
        groups = items
    else:
        groups = pair_groups(items, scorer.tokenizer)
    groups = [g for g in groups if g.comparisons]
    scores = score_pairs(scorer, groups, progress)
    out = pair_metrics(scores["chosen"], scores["rejected"], scores["category"])
    if return_scores:
        out["scores"] = scores
    return out


def _f(x: Optional[float], pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:+.4f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """A Markdown table of the metrics (accuracy per category, sections, margins)."""
    lines = ["| category | pairs | accuracy % | mean margin |", "|---|---:|---:|---:|"]
    for c, v in metrics.get("accuracy_by_category", {}).items():
        lines.append(f"| {c} | {v['pairs']} | {_f(v['accuracy'])} | {_f(v['margin_mean'], False)} |")
    lines.append(f"| **all** | {metrics['pairs']} | {_f(metrics['accuracy'])} | "
                 f"{_f(metrics['margin']['mean'], False)} |")
    if "rewardbench" in metrics:
        rb = metrics["rewardbench"]
        lines += ["", "| RewardBench | " + " | ".join(rb) + " |",
                  "|---|" + "---:|" * len(rb),
                  "| score % | " + " | ".join(_f(v) for v in rb.values()) + " |"]
    m = metrics["margin"]
    lines += ["", f"margin r_chosen - r_rejected: mean {m['mean']:+.4f}, std {m['std']:.4f}, "
                  f"p5 {m['p5']:+.4f}, median {m['p50']:+.4f}, p95 {m['p95']:+.4f}; ties "
                  f"{metrics['ties']}"]
    return "\n".join(lines)


def write_report(metrics: Mapping[str, Any], scores: Mapping[str, list], output_dir: str | Path,
                 title: str = "") -> dict[str, str]:
    """Writes ``metrics.json``, ``scores.jsonl`` (one line per comparison), ``table.md`` and
    ``eval.png`` (chosen vs rejected reward histograms; accuracy per category) into
    ``output_dir``, atomically; returns the paths."""
    from fastrm._io import atomic_path

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "scores": out / "scores.jsonl",
             "table": out / "table.md", "figure": out / "eval.png"}
    with atomic_path(paths["metrics"]) as tmp:
        tmp.write_text(json.dumps(dict(metrics), indent=1))
    with atomic_path(paths["scores"]) as tmp:
        with open(tmp, "w") as f:
            for c, r, cat, row in zip(scores["chosen"], scores["rejected"], scores["category"],
                                      scores["row"]):
                f.write(json.dumps({"row": row, "category": cat, "chosen_reward": c,
                                    "rejected_reward": r}) + "\n")
    with atomic_path(paths["table"]) as tmp:
        tmp.write_text(format_table(metrics) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rc, rr = np.asarray(scores["chosen"]), np.asarray(scores["rejected"])
    both = np.concatenate([rc, rr]) if rc.size else np.zeros(1)
    bins = np.linspace(both.min(), both.max() + 1e-9, 40)
    axes[0].hist(rc, bins=bins, alpha=0.6, label=f"chosen (mean {rc.mean():.3f})" if rc.size else "chosen")
    axes[0].hist(rr, bins=bins, alpha=0.6, label=f"rejected (mean {rr.mean():.3f})" if rr.size else "rejected")
    axes[0].set_xlabel("reward")
    axes[0].set_ylabel("responses")
    axes[0].legend()
    axes[0].set_title(f"reward distributions ({metrics['pairs']} pairs)")
    by = metrics.get("accuracy_by_category") or {"all": {"accuracy": metrics["accuracy"]}}
    names = list(by)
    axes[1].barh(names, [100 * by[n]["accuracy"] for n in names])
    axes[1].axvline(50, color="gray", linestyle="--", linewidth=1)
    axes[1].set_xlim(0, 100)
    axes[1].set_xlabel("accuracy %")
    axes[1].set_title("pairwise accuracy per category")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(paths["figure"]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
