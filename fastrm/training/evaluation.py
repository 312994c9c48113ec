"""Evaluation of a split: accuracy, mean margin, loss, reward statistics, per-category accuracy."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from fastrm.loss import RewardLoss
from fastrm.training.distributed import all_gather_objects
from fastrm.training.metrics import ComparisonSums, LossSums, all_reduce, loss_normalizer
from fastrm.training.step_data import StepData


@torch.no_grad()
def evaluate(step_module: nn.Module, loss_fn: RewardLoss, data: StepData, device: torch.device,
             max_steps: Optional[int] = None, show_progress: bool = True) -> dict[str, float]:
    """Runs every evaluation step of ``data`` (at most ``max_steps``; all ranks run the same
    number of forwards, see :meth:`StepData.eval_steps`) and returns the metrics of
    :meth:`ComparisonSums.metrics`, the loss (the training normalization) and
    ``category/<name>`` accuracies when the batches carry categories."""
    rewards_sum, losses = ComparisonSums(), LossSums()
    by_category: dict[str, ComparisonSums] = {}
    total = data.num_eval_steps() if max_steps is None else min(int(max_steps), data.num_eval_steps())
    steps = itertools.islice(data.eval_steps(), total)
    for batch, real in tqdm(steps, total=total, disable=not show_progress, desc="eval", leave=False):
        batch = batch.to(device)
        loss, rewards = step_module(batch)
        if not real:
            continue
        n = loss_normalizer(loss_fn, batch)
        rewards_sum += ComparisonSums.of_batch(rewards, batch)
        losses.add(float(loss) * n, n)
        if batch.categories is not None:
            for name in set(batch.categories) - {None}:
                keep = torch.tensor([c == name for c in batch.categories])
                part = ComparisonSums.of(rewards, batch.chosen_index[keep], batch.rejected_index[keep])
                by_category[name] = by_category.get(name, ComparisonSums()) + part
    rewards_sum, losses = all_reduce([rewards_sum, losses], device)
    out = {**rewards_sum.metrics(), "loss": losses.loss / max(losses.normalizer, 1e-12)}
    merged: dict[str, ComparisonSums] = {}
    for part in all_gather_objects(by_category):
        for name, sums in part.items():
            merged[name] = merged.get(name, ComparisonSums()) + sums
    for name in sorted(merged):
        out[f"category/{name}"] = merged[name].metrics()["accuracy"]
    return out
