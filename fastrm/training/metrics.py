"""What the recipe logs: reward statistics as named additive sums, step and memory metrics.

Every statistic is a sum over comparisons or scored responses (:class:`ComparisonSums`), so
micro-batches, ranks, evaluation steps and categories add up exactly, and the logged means are
taken once at the end. The same sums serve a training step, an evaluation, per-category
accuracy and :meth:`fastrm.RewardLoss.metrics`.
"""

from __future__ import annotations

import resource
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from fastrm.data.batch import ScoredBatch
    from fastrm.loss import RewardLoss

S = TypeVar("S", bound="Sums")


class Sums:
    """Base of dataclasses whose fields are all additive floats: ``a + b`` adds them field by
    field, :func:`all_reduce` sums them over ranks."""

    def __add__(self: S, other: S) -> S:
        return type(self)(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls: type[S], t: torch.Tensor) -> S:
        return cls(*(float(x) for x in t.tolist()))


def all_reduce(sums: list[Sums], device: torch.device) -> list[Sums]:
    """``sums`` summed over ranks in one collective (unchanged in a single process)."""
    if not dist.is_initialized():
        return sums
    sizes = [len(fields(s)) for s in sums]
    t = torch.cat([s.to_tensor() for s in sums]).to(device)
    dist.all_reduce(t)
    return [type(s).from_tensor(part) for s, part in zip(sums, t.cpu().split(sizes))]


@dataclass
class ComparisonSums(Sums):
    """Sums over the comparisons ``(r_c, r_r)`` and the scored rewards ``r`` of a batch."""

    correct: float = 0.0      # comparisons with r_c > r_r (a tie counts as wrong)
    margin: float = 0.0       # sum of r_c - r_r
    chosen: float = 0.0       # sum of r_c
    rejected: float = 0.0     # sum of r_r
    comparisons: float = 0.0
    reward: float = 0.0       # sum of r over the scored responses
    reward_sq: float = 0.0    # sum of r^2
    responses: float = 0.0

    @classmethod
    def of(cls, rewards: torch.Tensor, chosen_index: torch.Tensor,
           rejected_index: torch.Tensor) -> "ComparisonSums":
        """The sums for ``rewards [N]`` and ``P`` comparisons given as index pairs (float64)."""
        r = rewards.detach().reshape(-1).double().cpu()
        r_c, r_r = r[chosen_index.cpu()], r[rejected_index.cpu()]
        diff = r_c - r_r
        return cls(float((diff > 0).sum()), float(diff.sum()), float(r_c.sum()),
                   float(r_r.sum()), float(diff.numel()), float(r.sum()), float((r * r).sum()),
                   float(r.numel()))

    @classmethod
    def of_batch(cls, rewards: torch.Tensor, batch: "ScoredBatch") -> "ComparisonSums":
        return cls.of(rewards, batch.chosen_index, batch.rejected_index)

    def metrics(self) -> dict[str, float]:
        """``accuracy`` (``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``chosen_reward`` /
        ``rejected_reward`` (means over comparisons), ``reward_mean`` / ``reward_std`` (over
        the scored responses; population std) and the ``comparisons`` count."""
        count, n = max(self.comparisons, 1.0), max(self.responses, 1.0)
        mean = self.reward / n
        return {"accuracy": self.correct / count, "margin": self.margin / count,
                "chosen_reward": self.chosen / count, "rejected_reward": self.rejected / count,
                "reward_mean": mean, "reward_std": max(self.reward_sq / n - mean * mean, 0.0) ** 0.5,
                "comparisons": self.comparisons}


@dataclass
class LossSums(Sums):
    """The loss of several micro-batches as one mean, ``loss / normalizer``: ``loss`` sums
    each micro-batch's mean loss times its normalizer (:func:`loss_normalizer`)."""

    loss: float = 0.0
    normalizer: float = 0.0
    real_tokens: float = 0.0      # tokens of every pair as a plain trainer would see them
    computed_tokens: float = 0.0  # what the model ran (fewer with prefix sharing)

    def add(self, loss_sum: float, normalizer: float, real_tokens: float = 0.0,
            computed_tokens: float = 0.0) -> None:
        """``loss_sum``: a micro-batch's mean loss times its ``normalizer``."""
        self.loss += loss_sum
        self.normalizer += normalizer
        self.real_tokens += real_tokens
        self.computed_tokens += computed_tokens


def loss_normalizer(loss_fn: "RewardLoss", batch: "ScoredBatch") -> float:
    """What the loss is a mean over on this micro-batch: comparisons, the sum of group weights
    (``weighting="group"``: one per group), or groups (listwise objectives)."""
    if (loss_fn.weighting == "group" or loss_fn.listwise) and batch.group_index is not None:
        return float(torch.unique(batch.group_index).numel())
    return float(batch.num_comparisons)


class StepAccumulator:
    """Sums the statistics of the micro-batches of one optimizer step; reduces them over ranks
    when the step's metrics are asked for."""

    def __init__(self) -> None:
        self.rewards = ComparisonSums()
        self.losses = LossSums()

    @property
    def normalizer(self) -> float:
        """This rank's loss normalizer so far (the gradient scale needs the global sum first)."""
        return self.losses.normalizer

    def add(self, loss_sum: torch.Tensor, rewards: torch.Tensor, batch, normalizer: float) -> None:
        """``loss_sum``: the micro-batch's mean loss times ``normalizer``; ``batch``: its
        :class:`~fastrm.data.batch.PackedBatch`."""
        self.rewards += ComparisonSums.of_batch(rewards, batch)
        self.losses.add(float(loss_sum), normalizer, batch.num_real_tokens + batch.prompt_tokens_saved,
                        batch.num_tokens)

    def metrics(self, device: torch.device, elapsed: float) -> dict[str, float]:
        rewards, losses = all_reduce([self.rewards, self.losses], device)
        return {
            "loss": losses.loss / max(losses.normalizer, 1e-12),
            **rewards.metrics(),
            "tokens_per_second": losses.real_tokens / max(elapsed, 1e-9),
            "computed_tokens_per_second": losses.computed_tokens / max(elapsed, 1e-9),
            "step_time": elapsed,
        }


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: allocated/reserved on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_memory_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def reset_memory_stats(device: torch.device) -> None:
    """Frees what set-up left behind and restarts the peak counters (torchtune's helper
    assumes an accelerator namespace)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
