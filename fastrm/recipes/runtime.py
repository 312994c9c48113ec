"""The pieces of the reward-model recipe that are not the loop itself: distributed set-up,
model building and sharding, checkpoint I/O, metric accumulation and evaluation.

Kept apart from :mod:`fastrm.recipes.reward_model` so the recipe file reads like torchtune's
own recipes (``setup`` / ``train`` / ``cleanup``) and these helpers can be tested on their own.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from torchtune import config, training, utils

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss

log = utils.get_logger("INFO")


# ---------------------------------------------------------------------- distributed
def init_distributed(device: str) -> tuple[int, int]:
    """Initialises the process group when launched by torchrun / ``tune run --nproc_per_node``
    (gloo on CPU, nccl on CUDA); a plain ``tune run`` stays single-process. Returns
    ``(world_size, rank)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" or (device != "cpu" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def cleanup_before_training(device: torch.device) -> None:
    """Frees what set-up left behind (torchtune's helper assumes an accelerator namespace)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32``, ``bf16``, or ``auto``: bf16 on CUDA with bf16 support and on CPUs whose matmul
    is fast in bf16 (AVX-512 bf16 / AMX), fp32 elsewhere (on AVX2-only CPUs bf16 matmul is
    hundreds of times slower than fp32)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return training.get_dtype(name, device=device)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles: bf16 matmul at least as fast as fp32 (elsewhere, e.g. AVX2,
    it is emulated and hundreds of times slower)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: no probe, assume not
        return False


# ---------------------------------------------------------------------- model
def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                is_rank_zero: bool) -> tuple[nn.Module, Any]:
    """Instantiates ``cfg.model`` (a :class:`fastrm.models.RewardModel`), loads the backbone
    through ``cfg.checkpointer`` and the head from ``cfg.head_checkpoint``, applies the
    trainable-parameter policy, attention backend and activation checkpointing. Returns
    ``(model, checkpointer)`` (``checkpointer`` is ``None`` without a ``checkpointer`` section)."""
    from fastrm.models import load_base_weights

    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    if not hasattr(model, "head") or not hasattr(model, "decoder"):
        raise ValueError("model._component_ must build a fastrm.models.RewardModel "
                         "(e.g. fastrm.models.reward_model)")
    checkpointer = None
    if cfg.get("checkpointer") is not None:
        checkpointer = config.instantiate(cfg.checkpointer)
        state = checkpointer.load_checkpoint()
        report = load_base_weights(model, state[training.MODEL_KEY])
        utils.log_rank_zero(log, f"loaded {report.loaded} backbone tensors from "
                                 f"{getattr(checkpointer, '_checkpoint_dir', '?')}")
    if cfg.get("head_checkpoint"):
        head_sd = load_file(str(cfg.head_checkpoint))
        model.head.load_state_dict({k: v.to(dtype) for k, v in head_sd.items()})
    if cfg.get("attention_backend"):
        from fastrm.attention import set_attention_backend

        set_attention_backend(model, cfg.attention_backend)
    apply_trainable_policy(model, cfg.get("trainable"))
    if cfg.get("enable_activation_checkpointing", False):
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if cfg.get("compile", False):
        for layer in model.decoder.layers:
            layer.compile()
    return model.to(device), checkpointer


def apply_trainable_policy(model: nn.Module, trainable: Optional[DictConfig]) -> None:
    """``trainable: {last_n_layers: k, embeddings: false, final_norm: true}`` freezes the
    backbone except its last ``k`` layers (and the final norm / embeddings when asked); the
    reward head always trains. Without the section every parameter trains (LoRA builders set
    their own policy and must not be combined with this section)."""
    if trainable is None:
        return
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("config section 'trainable' cannot be combined with a LoRA model "
                         "(LoRA already trains only adapters + head); remove 'trainable'")
    k = int(trainable.get("last_n_layers", 0))
    layers = model.decoder.layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"trainable.last_n_layers={k} must lie in [0, {len(layers)}]")
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    if trainable.get("final_norm", k > 0):
        for p in model.decoder.norm.parameters():
            p.requires_grad_(True)
    if trainable.get("embeddings", False):
        for p in model.decoder.tok_embeddings.parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)


def shard(step_module: nn.Module, reshard_after_forward: bool = True) -> None:
    """FSDP2: every decoder layer is its own unit, the root (embeddings, norm, head) the last."""
    from torch.distributed.fsdp import fully_shard

    for layer in step_module.model.decoder.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(step_module, reshard_after_forward=reshard_after_forward)


def full_state_dict(model: nn.Module, is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """Full CPU state dict (gathered from shards under FSDP); empty on ranks > 0 when sharded."""
    if dist.is_initialized():
        return training.gather_cpu_state_dict(model, is_rank_zero)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, is_rank_zero: bool) -> dict:
    if dist.is_initialized():
        return training.get_full_optimizer_state_dict(module, optimizer, is_rank_zero)
    return optimizer.state_dict()


def load_trainable_state(model: nn.Module, sd: dict[str, torch.Tensor], device: torch.device) -> None:
    """Loads the saved trainable parameters (the frozen rest comes from the base checkpoint)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=False,
                                                                 strict=False))
        return
    missing = set(sd) - set(model.state_dict())
    if missing:
        raise KeyError(f"checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(sd, strict=False)


def load_optimizer_state(module: nn.Module, optimizer, sd: dict, device: torch.device) -> None:
    if dist.is_initialized():
        training.load_from_full_optimizer_state_dict(module, optimizer, sd, device)
    else:
        optimizer.load_state_dict(sd)


def save_backbone(cfg: DictConfig, checkpointer: Any, backbone_sd: dict[str, torch.Tensor],
                  out: Path) -> None:
    """Saves the backbone so users load it back the way they loaded the base model: HF
    safetensors + the base checkpoint's config/tokenizer files for an HF checkpointer (LoRA
    adapters merged), torchtune's format otherwise."""
    if any("lora_" in k for k in backbone_sd):
        from torchtune.modules.peft import get_merged_lora_ckpt

        backbone_sd = get_merged_lora_ckpt(dict(backbone_sd), rank=int(cfg.model.lora_rank),
                                           alpha=float(cfg.model.lora_alpha))
    from torchtune.training import FullModelHFCheckpointer

    if isinstance(checkpointer, FullModelHFCheckpointer):
        from torchtune.models import convert_weights

        src = Path(checkpointer._checkpoint_dir)
        hf_cfg = json.loads((src / "config.json").read_text())
        hf_sd = convert_weights.tune_to_hf(
            backbone_sd, num_heads=hf_cfg["num_attention_heads"],
            num_kv_heads=hf_cfg["num_key_value_heads"], dim=hf_cfg["hidden_size"],
            head_dim=hf_cfg.get("head_dim"))
        hf_sd.pop("lm_head.weight", None)
        if not hf_cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in hf_sd:
            # the reward model dropped the LM head; keep the file loadable as a causal LM
            base = load_base_lm_head(src)
            if base is not None:
                hf_sd["lm_head.weight"] = base
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copy(src / name, out / name)
    else:
        torch.save(backbone_sd, out / "backbone.pt")


def load_base_lm_head(src: Path) -> Optional[torch.Tensor]:
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(str(f))
        if "lm_head.weight" in sd:
            return sd["lm_head.weight"]
    return None


# ---------------------------------------------------------------------- metrics
def loss_normalizer(loss_fn: RewardLoss, batch: PackedBatch) -> float:
    """What the loss is a mean over on this micro-batch: comparisons, the sum of group weights
    (``weighting="group"``: one per group), or groups (listwise objectives)."""
    if (loss_fn.weighting == "group" or loss_fn.listwise) and batch.group_index is not None:
        return float(torch.unique(batch.group_index).numel())
    return float(batch.num_comparisons)


def comparison_sums(rewards: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Additive per-batch statistics (float64, reducible over micro-batches and ranks):
    ``[correct comparisons, sum of r_c - r_r, comparisons, sum r, sum r^2, rewards]``."""
    r = rewards.detach().double().cpu()
    diff = r[batch.chosen_index.cpu()] - r[batch.rejected_index.cpu()]
    return torch.tensor([float((diff > 0).sum()), float(diff.sum()), float(diff.numel()),
                         float(r.sum()), float((r * r).sum()), float(r.numel())],
                        dtype=torch.float64)


def metrics_from_sums(s: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean margin, reward mean/std and comparison count from summed
    :func:`comparison_sums`."""
    count, nr = max(s[2].item(), 1.0), max(s[5].item(), 1.0)
    mean = s[3].item() / nr
    return {"accuracy": s[0].item() / count, "margin": s[1].item() / count,
            "reward_mean": mean, "reward_std": max(s[4].item() / nr - mean * mean, 0.0) ** 0.5,
            "comparisons": s[2].item()}


class StepAccumulator:
    """Sums per-comparison statistics over the micro-batches of one optimizer step; reduces
    them over ranks when the step's metrics are asked for."""

    def __init__(self) -> None:
        self.normalizer = 0.0
        # comparison_sums, then the loss sum, real tokens and computed tokens
        self.sums = torch.zeros(9, dtype=torch.float64)

    def add(self, loss_sum: torch.Tensor, rewards: torch.Tensor, batch: PackedBatch, n: float) -> None:
        self.normalizer += n
        self.sums[:6] += comparison_sums(rewards, batch)
        self.sums[6] += float(loss_sum)
        self.sums[7] += batch.num_real_tokens + batch.prompt_tokens_saved
        self.sums[8] += batch.num_tokens

    def metrics(self, device: torch.device, n_global: float, elapsed: float) -> dict[str, float]:
        s = all_reduce_tensor(self.sums.clone().to(device)).cpu()
        return {
            "loss": s[6].item() / max(n_global, 1e-12),
            **metrics_from_sums(s[:6]),
            # "real" tokens: the tokens of every pair as a plain trainer would see them;
            # computed tokens: what the model actually ran (fewer with prefix sharing).
            "tokens_per_second": s[7].item() / max(elapsed, 1e-9),
            "computed_tokens_per_second": s[8].item() / max(elapsed, 1e-9),
            "step_time": elapsed,
        }


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: allocated/reserved on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_memory_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@torch.no_grad()
def evaluate(step_module: nn.Module, loss_fn: RewardLoss, data, device: torch.device,
             max_steps: Optional[int] = None, show_progress: bool = True) -> dict[str, float]:
    """Runs every validation step (all ranks run the same number of forwards; a rank with no
    rows left re-runs a row and ignores it) and returns accuracy, mean margin, loss, reward
    mean/std, and ``category/<name>`` accuracies when the data has categories."""
    # comparison_sums, then the loss times its normalizer (as in training) and the normalizers
    totals = torch.zeros(8, dtype=torch.float64)
    categories: dict[str, list[float]] = {}
    total = data.num_eval_steps() if max_steps is None else min(int(max_steps), data.num_eval_steps())
    steps = itertools.islice(data.eval_steps(), total)
    for batch, real, cats in tqdm(steps, total=total, disable=not show_progress, desc="eval",
                                  leave=False):
        batch = batch.to(device)
        loss, rewards = step_module(batch)
        if not real:
            continue
        n = loss_normalizer(loss_fn, batch)
        totals[:6] += comparison_sums(rewards, batch)
        totals[6] += float(loss) * n
        totals[7] += n
        if len(cats) != batch.num_comparisons:
            raise RuntimeError(f"{len(cats)} categories for {batch.num_comparisons} comparisons")
        r = rewards.detach().double().cpu()
        diff = r[batch.chosen_index.cpu()] - r[batch.rejected_index.cpu()]
        for name, d in zip(cats, diff.tolist()):
            if name is not None:
                c = categories.setdefault(name, [0.0, 0.0])
                c[0] += float(d > 0)
                c[1] += 1.0
    t = all_reduce_tensor(totals.to(device)).cpu()
    out = {**metrics_from_sums(t[:6]), "loss": t[6].item() / max(t[7].item(), 1e-12)}
    names = sorted(categories)
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, categories)
        categories = {}
        for part in gathered:
            for k, (a, b) in part.items():
                c = categories.setdefault(k, [0.0, 0.0])
                c[0] += a
                c[1] += b
        names = sorted(categories)
    for k in names:
        out[f"category/{k}"] = categories[k][0] / max(categories[k][1], 1.0)
    return out


# ---------------------------------------------------------------------- data
class StepData:
    """The recipe's view of one split: packed steps for this rank, per epoch.

    Training: :class:`fastrm.data.PackedPreferenceDataset` plans rows once per epoch (seeded by
    ``seed`` and the epoch), cuts them into steps of ``packing.rows_per_step`` rows per rank and
    deals whole steps to ranks, so ``N`` ranks with ``rows_per_step = r`` see exactly the rows of
    one rank with ``rows_per_step = N * r``. Evaluation sees every row: steps are dealt
    round-robin and a rank with nothing left re-runs a step whose result it ignores (every rank
    must run the same number of forwards under FSDP).
    """

    def __init__(self, groups, packing: DictConfig, world_size: int, rank: int, seed: int,
                 train: bool, prompt_embedder: Optional[Any] = None) -> None:
        from fastrm.data import PackedPreferenceDataset

        self.groups = groups
        self.world_size, self.rank, self.train = world_size, rank, train
        kwargs = dict(max_seq_len=int(packing.max_seq_len),
                      rows_per_step=int(packing.get("rows_per_step", 1)),
                      prefix_sharing=packing.get("prefix_sharing", None), seed=seed)
        self.group_embeddings: Optional[torch.Tensor] = None
        if prompt_embedder is not None:
            # Cross-prompt (RPO) training: one prompt embedding per group, and packed steps of
            # similar prompts (random-projection order), since the contrast only helps between
            # related prompts.
            from fastrm.data.cross_prompt import SimilarityOrder, embed_groups

            self.group_embeddings = embed_groups(groups, prompt_embedder).float()
            if train:
                kwargs["order_key"] = SimilarityOrder(self.group_embeddings, seed)
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
        self.packed.set_epoch(epoch, start_step=skip)
        if self.group_embeddings is None:
            return iter(self.packed.dataloader())
        return (self.step(i) for i in range(skip, len(self.packed)))

    def step(self, i: int) -> PackedBatch:
        """Packed step ``i`` of the current epoch, with ``extras["prompt_embeddings"]`` (``[N,
        E]``, one per scored response) for cross-prompt training."""
        batch = self.packed[i]
        if self.group_embeddings is not None:
            units = [u for row in self.packed.steps[i] for u in row.tolist()]
            source = torch.as_tensor(self.packed.unit_source[units])
            # collate_packed scores each group's responses in order, group after group
            counts = torch.tensor([len(self.packed.units[u].responses) for u in units])
            batch.extras["prompt_embeddings"] = self.group_embeddings[source].repeat_interleave(counts, 0)
        return batch

    def num_eval_steps(self) -> int:
        return -(-len(self.packed) // self.world_size)

    def eval_steps(self) -> Iterator[tuple[PackedBatch, bool, list[Optional[str]]]]:
        """``(batch, counts, categories)`` per evaluation step of this rank, lazily;
        ``categories`` gives each comparison's group category (``None`` where there is none)."""
        self.packed.set_epoch(0)
        n = len(self.packed)
        for i in range(self.num_eval_steps()):
            j = i * self.world_size + self.rank
            real = j < n
            batch = self.step(j if real else 0)
            # collate_packed lists each comparison's group category ("" / absent: none)
            cats = batch.extras.get("category") or [None] * batch.num_comparisons
            yield batch, real, [c or None for c in cats]


def build_step_data(cfg: DictConfig, ds_cfg: DictConfig, tokenizer, world_size: int, rank: int,
                    seed: int, train: bool) -> StepData:
    """Instantiates a fastrm dataset builder (``_component_: fastrm.datasets.<builder>``) with
    the recipe's tokenizer and packs it as ``cfg.packing`` says. With ``loss.cross_prompt`` the
    prompts are embedded by ``cross_prompt.embedder`` (default: hashed token n-grams)."""
    groups = config.instantiate(ds_cfg, tokenizer=tokenizer)
    if len(groups) == 0:
        name = "dataset" if train else "validation_dataset"
        raise ValueError(f"config section {name!r} produced no preference pairs; check its "
                         "source, split and filters")
    embedder = None
    if cfg.loss.get("cross_prompt", False):
        from fastrm.data.cross_prompt import HashedNgramEmbedder

        ecfg = (cfg.get("cross_prompt") or {}).get("embedder")
        embedder = config.instantiate(ecfg) if ecfg is not None else HashedNgramEmbedder()
    return StepData(groups, cfg.packing, world_size, rank, seed, train, embedder)
