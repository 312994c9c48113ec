"""The recipe's view of one data split: packed steps for this rank, per epoch."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from torchtune import config

from fastrm.data.batch import PackedBatch
from fastrm.data.packing import PackedPreferenceDataset


class StepData:
    """Packed steps of one split for this rank.

    Training: :class:`fastrm.data.PackedPreferenceDataset` plans rows once per epoch (seeded by
    ``seed`` and the epoch), cuts them into steps of ``packing.rows_per_step`` rows per rank and
    deals whole steps to ranks, so ``N`` ranks with ``rows_per_step = r`` see exactly the rows of
    one rank with ``rows_per_step = N * r``. Evaluation sees every row: steps are dealt
    round-robin and a rank with nothing left re-runs a step whose result it ignores (every rank
    must run the same number of forwards under FSDP).

    With a ``prompt_embedder`` (cross-prompt training) every group's prompt is embedded once,
    the collator gives each scored response its group's embedding, and training steps hold
    similar prompts (random-projection order), since the contrast only helps between related
    prompts.
    """

    def __init__(self, groups, packing: DictConfig, world_size: int, rank: int, seed: int,
                 train: bool, prompt_embedder: Optional[Any] = None) -> None:
        self.world_size, self.rank, self.train = world_size, rank, train
        kwargs: dict[str, Any] = dict(max_seq_len=int(packing.max_seq_len),
                                      rows_per_step=int(packing.get("rows_per_step", 1)),
                                      prefix_sharing=packing.get("prefix_sharing", None), seed=seed)
        if prompt_embedder is not None:
            from fastrm.data.cross_prompt import SimilarityOrder, embed_groups

            kwargs["prompt_embeddings"] = embed_groups(groups, prompt_embedder).float()
            if train:
                kwargs["order_key"] = SimilarityOrder(kwargs["prompt_embeddings"], seed)
        if train:
            self.packed = PackedPreferenceDataset(groups, rank=rank, world_size=world_size, **kwargs)
        else:  # every rank plans every step; eval_steps deals them out without dropping any
            self.packed = PackedPreferenceDataset(groups, rank=0, world_size=1, **kwargs)
        self.has_margin = any(c[2] is not None for g in self.packed.units for c in g.comparisons)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.packed)

    def describe(self) -> str:
        s = self.packed.stats
        return (f"{len(self.packed.units)} groups in {self.packed.num_rows} rows of "
                f"{self.packed.max_seq_len} tokens (fill {self.packed.epoch_fill_rate:.1%}), "
                f"{len(self.packed)} steps/epoch/rank, prefix_sharing={self.packed.prefix_sharing}, "
                f"prompt tokens saved {s.prompt_tokens_saved}, split groups {s.split_groups}, "
                f"comparisons dropped by splitting {s.cross_subgroup_dropped}")

    def epoch_steps(self, epoch: int, skip: int = 0) -> Iterator[PackedBatch]:
        """The steps of ``epoch`` from step ``skip`` on (resume)."""
        self.packed.set_epoch(epoch, start_step=skip)
        return iter(self.packed.dataloader())

    def num_eval_steps(self) -> int:
        return -(-len(self.packed) // self.world_size)

    def eval_steps(self) -> Iterator[tuple[PackedBatch, bool]]:
        """``(batch, real)`` per evaluation step of this rank, lazily; ``real`` is False for
        the padding step a rank runs when it has no step left."""
        self.packed.set_epoch(0)
        n = len(self.packed)
        for i in range(self.num_eval_steps()):
            j = i * self.world_size + self.rank
            yield self.packed[j if j < n else 0], j < n


def build_step_data(cfg: DictConfig, section: str, tokenizer, world_size: int, rank: int,
                    seed: int, train: bool) -> StepData:
    """Instantiates the dataset builder of config section ``section`` (``_component_:
    fastrm.datasets.<builder>``) with the recipe's tokenizer and packs it as ``cfg.packing``
    says. With ``loss.cross_prompt`` the prompts are embedded by ``cross_prompt.embedder``
    (default: hashed token n-grams)."""
    groups = config.instantiate(cfg[section], tokenizer=tokenizer)
    if len(groups) == 0:
        raise ValueError(f"config section {section!r} produced no preference pairs; check its "
                         "source, split and filters")
    embedder = None
    if cfg.loss.get("cross_prompt", False):
        from fastrm.data.cross_prompt import HashedNgramEmbedder

        ecfg = (cfg.get("cross_prompt") or {}).get("embedder")
        embedder = config.instantiate(ecfg) if ecfg is not None else HashedNgramEmbedder()
    return StepData(groups, cfg.packing, world_size, rank, seed, train, embedder)
