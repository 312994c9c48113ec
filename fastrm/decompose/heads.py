"""Decomposed reward heads: PCA directions, oriented by preference, as a ``D -> k`` linear head.

Head ``i`` is a unit direction ``v_i`` in embedding space and scores a response by
``r_i(x, y) = v_i . e(x, y)``. PCA fixes ``v_i`` only up to sign; :func:`orient_components`
picks the sign under which head ``i`` prefers the chosen response on most training pairs:

    s_i = +1 if #{p : v_i . z_p > 0} >= #{p : v_i . z_p < 0} else -1
    (ties broken by the sign of sum_p v_i . z_p)

A user's reward is a weighted mix ``r_alpha = sum_i alpha_i r_i + b``: again one linear head,
with weight ``w = W^T alpha [D]`` (``W [k, D]`` the stacked heads). That is how the heads reach
the reward model of the training recipe: :meth:`DecomposedHeads.combine` gives ``(w, b)`` for
head ``i`` (``alpha = e_i``) or any ``alpha``, :func:`load_into_head` copies them into a
``nn.Linear(D, 1)`` (``RewardModel.head``), and the fused reward head + loss path of
:mod:`fastrm.ops` then scores and trains with it unchanged. :meth:`DecomposedHeads.as_linear`
gives the ``nn.Linear(D, k)`` that scores all ``k`` heads at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fastrm.decompose.pca import PCAResult, Source, iter_chunks

HEADS_FORMAT = "fastrm.decompose.heads/v1"


@dataclass
class DecomposedHeads:
    """``k`` oriented reward heads over ``D``-dimensional embeddings.

    Attributes:
        weight: ``[k, D]`` float32 unit rows ``v_i`` (orthonormal), by decreasing variance.
        explained_variance: ``[k]`` float64 ``lambda_i`` (variance of ``z . v_i``).
        explained_variance_ratio: ``[k]`` ``lambda_i / trace(C)``.
        train_accuracy: ``[k]`` fraction of training pairs with ``v_i . z_p > 0``.
        flipped: ``[k]`` bool, True where the orientation negated the PCA component.
        mean: ``[D]`` PCA mean (zeros for the uncentered decomposition).
        total_variance, num_train_pairs, centered, method: from the PCA.
        info: free-form provenance (backbone, dataset, config), saved as JSON.
    """

    weight: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    train_accuracy: torch.Tensor
    flipped: torch.Tensor
    mean: torch.Tensor
    total_variance: float
    num_train_pairs: int
    centered: bool
    method: str
    info: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    # -- scoring -------------------------------------------------------------------------
    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings [N, D] -> [N, k]``: every head's reward ``v_i . e``."""
        if embeddings.shape[-1] != self.dim:
            raise ValueError(f"embeddings have D={embeddings.shape[-1]}, the heads D={self.dim}")
        return embeddings.float() @ self.weight.to(embeddings.device).T

    def combine(self, weights: Optional[torch.Tensor | Sequence[float]] = None,
                head: Optional[int] = None, bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``D -> 1`` head: ``w = W^T alpha [D]``, ``b [1]``.

        Pass ``head=i`` for head ``i`` alone (``alpha = e_i``) or ``weights=alpha [k]`` for a
        mix (e.g. :attr:`fastrm.decompose.adapt.HeadWeights.weights` with its ``bias``).
        """
        if (weights is None) == (head is None):
            raise ValueError("pass exactly one of head= (an index) or weights= (k coefficients)")
        if head is not None:
            if not 0 <= head < self.num_heads:
                raise ValueError(f"head={head} is out of range; there are {self.num_heads} heads")
            alpha = torch.zeros(self.num_heads)
            alpha[head] = 1.0
        else:
            alpha = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if alpha.shape[0] != self.num_heads:
                raise ValueError(f"weights has {alpha.shape[0]} entries, expected one per head "
                                 f"({self.num_heads})")
        w = (alpha.to(torch.float64) @ self.weight.to(torch.float64)).to(torch.float32)
        return w, torch.tensor([float(bias)], dtype=torch.float32)

    def as_linear(self) -> nn.Linear:
        """``nn.Linear(D, k)`` (zero bias) scoring every head at once."""
        lin = nn.Linear(self.dim, self.num_heads, bias=True)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.zero_()
        return lin

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, weights: Optional[dict[str, "object"]] = None) -> Path:
        """Writes ``<path>/heads.safetensors`` (``weight [k, D]``, ``bias [k]``, statistics) and
        ``<path>/heads.json`` (metadata); ``weights`` (name -> :class:`HeadWeights`) are saved
        beside as ``weights_<name>.json``. Returns ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "weight": self.weight.contiguous(),
                "bias": torch.zeros(self.num_heads),
                "explained_variance": self.explained_variance.contiguous(),
                "explained_variance_ratio": self.explained_variance_ratio.contiguous(),
                "train_accuracy": self.train_accuracy.contiguous(),
                "flipped": self.flipped.to(torch.uint8).contiguous(),
                "mean": self.mean.contiguous(),
            },
            str(path / "heads.safetensors"),
        )
        meta = {"format": HEADS_FORMAT, "num_heads": self.num_heads, "dim": self.dim,
                "total_variance": self.total_variance, "num_train_pairs": self.num_train_pairs,
                "centered": self.centered, "method": self.method, "info": self.info}
        (path / "heads.json").write_text(json.dumps(meta, indent=1))
        for name, hw in (weights or {}).items():
            hw.save(path / f"weights_{name}.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DecomposedHeads":
        path = Path(path)
        if not (path / "heads.safetensors").exists():
            raise ValueError(f"no decomposed heads at {path} (heads.safetensors missing)")
        meta = json.loads((path / "heads.json").read_text())
        if meta.get("format") != HEADS_FORMAT:
            raise ValueError(f"{path / 'heads.json'} has format {meta.get('format')!r}, "
                             f"expected {HEADS_FORMAT}")
        t = load_file(str(path / "heads.safetensors"))
        return cls(
            weight=t["weight"], explained_variance=t["explained_variance"],
            explained_variance_ratio=t["explained_variance_ratio"],
            train_accuracy=t["train_accuracy"], flipped=t["flipped"].bool(), mean=t["mean"],
            total_variance=float(meta["total_variance"]),
            num_train_pairs=int(meta["num_train_pairs"]), centered=bool(meta["centered"]),
            method=str(meta["method"]), info=meta.get("info", {}),
        )


@torch.no_grad()
def projection_counts(directions: torch.Tensor, source: Source, chunk_size: int = 4096,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """One pass over the differences ``z``: for each direction ``v_i`` (``directions [k, D]``)
    the counts of ``v_i . z > 0`` and ``< 0``, and ``sum_p v_i . z_p``; plus ``n``."""
    w = directions.to(torch.float64)
    pos = torch.zeros(w.shape[0], dtype=torch.long)
    neg = torch.zeros(w.shape[0], dtype=torch.long)
    total = torch.zeros(w.shape[0], dtype=torch.float64)
    n = 0
    for chunk in tqdm(iter_chunks(source, chunk_size), desc="heads: projections", unit="chunk",
                      disable=not progress, leave=False):
        p = chunk.to(w.device, torch.float64) @ w.T
        pos += (p > 0).sum(0).cpu()
        neg += (p < 0).sum(0).cpu()
        total += p.sum(0).cpu()
        n += chunk.shape[0]
    return {"pos": pos, "neg": neg, "sum": total, "n": torch.tensor(n)}


def orient_components(pca: PCAResult, source: Source, chunk_size: int = 4096,
                      info: Optional[dict] = None, progress: bool = True) -> DecomposedHeads:
    """Turns PCA components into :class:`DecomposedHeads`, each signed so that it prefers the
    chosen response on the majority of the training pairs in ``source`` (module docstring)."""
    counts = projection_counts(pca.components, source, chunk_size, progress)
    n = int(counts["n"])
    if n == 0:
        raise ValueError("cannot orient heads on an empty training source")
    pos, neg, tot = counts["pos"], counts["neg"], counts["sum"]
    flip = (neg > pos) | ((neg == pos) & (tot < 0))
    sign = 1.0 - 2.0 * flip.to(torch.float32)
    acc = torch.where(flip, neg, pos).to(torch.float64) / n
    return DecomposedHeads(
        weight=(pca.components * sign[:, None]).contiguous(),
        explained_variance=pca.explained_variance.clone(),
        explained_variance_ratio=pca.explained_variance_ratio.clone(),
        train_accuracy=acc,
        flipped=flip,
        mean=pca.mean.clone(),
        total_variance=pca.total_variance,
        num_train_pairs=n,
        centered=pca.centered,
        method=pca.method,
        info=dict(info or {}),
    )


def head_accuracy(heads: DecomposedHeads | torch.Tensor, source: Source, chunk_size: int = 4096,
                  progress: bool = False) -> torch.Tensor:
    """``[k]`` pairwise accuracy of each head (or each row of a ``[k, D]`` tensor) on
    ``source``: the fraction of pairs with ``v_i . (e_chosen - e_rejected) > 0`` (a tie counts
    as wrong, as in :class:`fastrm.training.metrics.ComparisonSums`)."""
    w = heads.weight if isinstance(heads, DecomposedHeads) else heads
    if w.dim() == 1:
        w = w[None]
    counts = projection_counts(w, source, chunk_size, progress)
    n = int(counts["n"])
    if n == 0:
        raise ValueError("cannot measure accuracy on an empty source")
    return counts["pos"].to(torch.float64) / n


def load_into_head(linear: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Linear:
    """Copies a combined head ``weight [D]`` (and ``bias [1]``) into ``linear`` (an
    ``nn.Linear(D, 1)``, e.g. ``RewardModel.head``) in place, keeping its dtype and device; a
    linear without bias takes the weight only (a bias cancels in every comparison)."""
    if linear.weight.shape != (1, weight.shape[-1]):
        raise ValueError(f"the head to load into must be nn.Linear({weight.shape[-1]}, 1), got "
                         f"weight {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(weight.reshape(1, -1).to(linear.weight))
        if linear.bias is not None:
            linear.bias.copy_((bias if bias is not None else torch.zeros(1)).reshape(1).to(linear.bias))
    return linear


def multihead_rewards(hidden: torch.Tensor, reward_positions: torch.Tensor,
                      heads: DecomposedHeads) -> torch.Tensor:
    """Every head's reward at once from a packed forward: ``hidden [T, D]`` (or ``[1, T, D]``),
    ``reward_positions [N]`` -> ``[N, k]``. Evaluation only (no loss, no backward)."""
    h = hidden.reshape(-1, hidden.shape[-1])[reward_positions]
    return heads.scores(h)


def head_loss(
    hidden: torch.Tensor,
    batch,
    heads: DecomposedHeads,
    head: Optional[int] = None,
    weights=None,
    bias: float = 0.0,
    loss_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and rewards of head ``i`` (``head=i``) or a mix (``weights=alpha [k]``, e.g.
    :attr:`HeadWeights.weights` with ``bias=HeadWeights.bias``) on a packed batch, through the
    training recipe's fused reward head + loss: ``loss_fn.from_hidden(hidden, w, b, batch)``
    with the combined ``D -> 1`` head ``w = W^T alpha``.

    Args:
        hidden: ``[T, D]`` (or ``[1, T, D]``) hidden states of ``batch`` (``RewardModel(batch)``).
        batch: the :class:`~fastrm.data.batch.PackedBatch`.
        loss_fn: a :class:`fastrm.loss.RewardLoss` (default: plain Bradley-Terry).

    Returns ``(loss, rewards [N])`` as :meth:`fastrm.loss.RewardLoss.from_hidden`.
    """
    from fastrm.loss import RewardLoss

    w, b = heads.combine(weights=weights, head=head, bias=bias)
    loss_fn = loss_fn if loss_fn is not None else RewardLoss()
    return loss_fn.from_hidden(hidden, w.to(hidden), b.to(hidden), batch)
