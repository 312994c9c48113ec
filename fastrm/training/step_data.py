"""The recipe's view of one data split: packed steps for this rank, per epoch.

Prepared once: the tokenized groups and the packing plans come from the data cache
(``data_cache_dir``, :mod:`fastrm.data.cache`) when it holds them; rank 0 builds what is
missing while the other ranks wait. Steps reach the recipe through one DataLoader per split
(``dataloader`` section, :func:`dataloader_settings`): on CUDA a worker process collates the
next steps into pinned memory while the GPU runs, and the recipe copies them non-blocking.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

from omegaconf import DictConfig

from torchtune import config, utils

from fastrm.data.batch import PackedBatch
from fastrm.data.cache import DataCache, cache_dir_from_config, data_key, plan_key
from fastrm.data.packing import PackedPreferenceDataset
from fastrm.training.config import PLAIN_SECTIONS

DATALOADER_KEYS = PLAIN_SECTIONS["dataloader"]


def dataloader_settings(section: Optional[Mapping[str, Any]], device_type: str) -> dict:
    """DataLoader arguments of the ``dataloader`` section; an absent or null key takes the
    device's default: on CUDA one worker, pinned memory and persistent workers (the GPU does
    not wait for collation); on CPU none of them (a worker would compete with the training
    threads for the same cores, and pinning only serves copies to a GPU)."""
    section = dict(section or {})
    unknown = set(section) - set(DATALOADER_KEYS)
    if unknown:
        raise ValueError(f"unknown dataloader keys {sorted(unknown)}; known: {DATALOADER_KEYS}")
    cuda = device_type == "cuda"
    workers = section.get("num_workers")
    workers = (1 if cuda else 0) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"dataloader.num_workers must be >= 0, got {workers}")
    pin = section.get("pin_memory")
    pin = cuda if pin is None else bool(pin)
    persistent = section.get("persistent_workers")
    persistent = True if persistent is None else bool(persistent)
    return {"num_workers": workers, "pin_memory": pin, "persistent_workers": persistent and workers > 0}


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
                 train: bool, prompt_embedder: Optional[Any] = None,
                 loader: Optional[Mapping[str, Any]] = None,
                 plans: Optional[Callable[[PackedPreferenceDataset], dict]] = None) -> None:
        self.world_size, self.rank, self.train = world_size, rank, train
        self.loader_kwargs = dict(loader or {})
        self._train_loader = self._eval_loader = None
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
        if plans is not None:
            self.packed.use_plans(plans(self.packed))
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
        if self._train_loader is None:  # one loader for every epoch: persistent workers stay
            self._train_loader = self.packed.dataloader(**self.loader_kwargs)
        return iter(self._train_loader)

    def num_eval_steps(self) -> int:
        return -(-len(self.packed) // self.world_size)

    def eval_steps(self) -> Iterator[tuple[PackedBatch, bool]]:
        """``(batch, real)`` per evaluation step of this rank, lazily; ``real`` is False for
        the padding step a rank runs when it has no step left."""
        self.packed.set_epoch(0)
        n = len(self.packed)
        mine = [i * self.world_size + self.rank for i in range(self.num_eval_steps())]
        if self._eval_loader is None:
            self._eval_loader = self.packed.dataloader(
                keys=[(0, j if j < n else 0) for j in mine], **self.loader_kwargs)
        for batch, j in zip(self._eval_loader, mine):
            yield batch, j < n


def build_step_data(cfg: DictConfig, section: str, tokenizer, world_size: int, rank: int,
                    seed: int, train: bool) -> StepData:
    """Instantiates the dataset builder of config section ``section`` (``_component_:
    fastrm.datasets.<builder>``) with the recipe's tokenizer and packs it as ``cfg.packing``
    says, through the data cache of ``data_cache_dir`` (absent: ``~/.cache/fastrm/data``,
    null: off). With ``loss.cross_prompt`` the prompts are embedded by
    ``cross_prompt.embedder`` (default: hashed token n-grams) and plans are not cached (they
    follow the embedder)."""
    def build():
        return config.instantiate(cfg[section], tokenizer=tokenizer)

    cache_dir = cache_dir_from_config(cfg)
    cache = DataCache(cache_dir, utils.get_logger()) if cache_dir is not None else None
    builder = str(cfg[section]["_component_"]).rsplit(".", 1)[-1]
    key = None
    if cache is None:
        groups = build()
    else:
        key = data_key(cfg[section], cfg.tokenizer, tokenizer)
        groups = cache.groups(f"{section}-{builder}", key, build)
    if len(groups) == 0:
        raise ValueError(f"config section {section!r} produced no preference pairs; check its "
                         "source, split and filters")
    embedder = None
    if cfg.loss.get("cross_prompt", False):
        from fastrm.data.cross_prompt import HashedNgramEmbedder

        ecfg = (cfg.get("cross_prompt") or {}).get("embedder")
        embedder = config.instantiate(ecfg) if ecfg is not None else HashedNgramEmbedder()
    plans = None
    if cache is not None and embedder is None:
        epochs = list(range(int(cfg.get("epochs", 1)))) if train else [0]
        pkey = plan_key(key, cfg.packing, seed, epochs, train)

        def plans(packed: PackedPreferenceDataset) -> dict:
            return cache.plans(f"{section}-plan", pkey,
                               lambda: {e: packed.plan_epoch(e) for e in epochs}, len(packed.units))

    device_type = utils.get_device(cfg.get("device", "cpu")).type
    loader = dataloader_settings(cfg.get("dataloader"), device_type)
    return StepData(groups, cfg.packing, world_size, rank, seed, train, embedder, loader, plans)
