"""Per-head report: explained variance and held-out accuracy as a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fastrm.decompose.heads import DecomposedHeads, head_accuracy


@dataclass
class HeadReport:
    """Per-head statistics (lists of length ``k``) and the adaptation results.

    Attributes:
        explained_variance_ratio: ``lambda_i / trace(C)``.
        cumulative_variance_ratio: running sum of the above.
        train_accuracy: accuracy of head ``i`` on the training pairs (after orientation).
        heldout_accuracy: accuracy of head ``i`` on the held-out pairs (``None`` without them).
        num_train_pairs, num_heldout_pairs: set sizes.
        adaptation: per method, ``{"num_shots", "trials", "accuracy_mean", "accuracy_std",
            "first_head_accuracy", "best_single_head_accuracy", "weights"}`` (see the recipe).
    """

    explained_variance_ratio: list[float]
    cumulative_variance_ratio: list[float]
    train_accuracy: list[float]
    heldout_accuracy: Optional[list[float]]
    num_train_pairs: int
    num_heldout_pairs: int
    adaptation: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return len(self.explained_variance_ratio)

    def to_markdown(self) -> str:
        """The per-head table (and an adaptation table when there is one)."""
        lines = [
            f"| head | explained variance | cumulative | train accuracy (n={self.num_train_pairs}) "
            f"| held-out accuracy (n={self.num_heldout_pairs}) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i in range(self.num_heads):
            ho = "-" if self.heldout_accuracy is None else f"{self.heldout_accuracy[i]:.4f}"
            lines.append(
                f"| {i} | {self.explained_variance_ratio[i]:.4f} | "
                f"{self.cumulative_variance_ratio[i]:.4f} | {self.train_accuracy[i]:.4f} | {ho} |"
            )
        if self.adaptation:
            lines += ["", "| adaptation | split | shots | trials | accuracy on the rest (mean +- std) "
                      "| head 0 | best single head |", "|---|---|---:|---:|---:|---:|---:|"]
            for method, a in self.adaptation.items():
                lines.append(
                    f"| {method} | {a['split']} | {a['num_shots']} | {a['trials']} | "
                    f"{a['accuracy_mean']:.4f} +- {a['accuracy_std']:.4f} | "
                    f"{a['first_head_accuracy']:.4f} | {a['best_single_head_accuracy']:.4f} |"
                )
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def plot(self, path: str | Path, title: str = "Decomposed reward heads") -> Path:
        """Bars: explained variance ratio per head (left axis) with its cumulative sum;
        lines: train and held-out accuracy per head (right axis), the 0.5 chance line, and
        each adaptation method's mean accuracy as a dashed level."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = self.num_heads
        x = list(range(k))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * k + 3), 4.2))
        ax.bar(x, self.explained_variance_ratio, color="#9ecae1", label="explained variance")
        ax.plot(x, self.cumulative_variance_ratio, color="#3182bd", marker=".", lw=1,
                label="cumulative variance")
        ax.set_xlabel("head (principal component)")
        ax.set_ylabel("fraction of variance")
        ax.set_ylim(0, 1.02)
        ax2 = ax.twinx()
        ax2.plot(x, self.train_accuracy, color="#e6550d", marker="o", ms=3, lw=1,
                 label="train accuracy")
        if self.heldout_accuracy is not None:
            ax2.plot(x, self.heldout_accuracy, color="#a63603", marker="s", ms=3, lw=1.5,
                     label="held-out accuracy")
        ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
        colors = ["#31a354", "#756bb1", "#636363"]
        for c, (method, a) in zip(colors, self.adaptation.items()):
            ax2.axhline(a["accuracy_mean"], color=c, lw=1.2, ls="--",
                        label=f"{method} mix, {a['num_shots']} shots ({a['split']})")
        ax2.set_ylabel("pairwise accuracy")
        lo = min([0.45] + list(self.train_accuracy) + list(self.heldout_accuracy or []))
        ax2.set_ylim(lo - 0.02, 1.0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
        ax.set_xticks(x)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
        plt.close(fig)
        return path


def build_report(heads: DecomposedHeads, heldout=None, chunk_size: int = 4096) -> HeadReport:
    """Per-head statistics of ``heads``; held-out accuracy on ``heldout`` (any source with
    ``iter_diffs``) when given."""
    evr = heads.explained_variance_ratio.double()
    ho = None
    n_ho = 0
    if heldout is not None and len(heldout) > 0:
        ho = head_accuracy(heads, heldout, chunk_size).tolist()
        n_ho = len(heldout)
    return HeadReport(
        explained_variance_ratio=evr.tolist(),
        cumulative_variance_ratio=torch.cumsum(evr, 0).tolist(),
        train_accuracy=heads.train_accuracy.double().tolist(),
        heldout_accuracy=ho,
        num_train_pairs=heads.num_train_pairs,
        num_heldout_pairs=n_ho,
    )
