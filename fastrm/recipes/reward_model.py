"""Reward-model training recipe: packed preference pairs, varlen attention, fused head + loss.

Run it like any torchtune recipe, on one process or with FSDP2 on several::

    tune run fastrm/recipes/reward_model.py --config fastrm/recipes/configs/smollm2_135m_synthetic.yaml
    tune run --nproc_per_node 2 fastrm/recipes/reward_model.py --config <config> [key=value ...]
    fastrm train --config smollm2_135m_synthetic [key=value ...]

What a step does: the packed batch (``fastrm.data``: whole pairs or groups in rows of at most
``packing.max_seq_len`` tokens, optional prefix sharing) goes through the decoder with per-segment
attention (``fastrm.attention``); the fused reward head + loss (``RewardLoss.head_loss``, the
head bound to the loss once) reads the hidden state only at each response's last token. The loss is a weighted mean over
comparisons; to make several ranks and gradient accumulation compute exactly the global mean,
each micro-step backpropagates ``loss * n_local`` and the gradients are scaled by
``world_size / n_global`` before the optimizer step (as torchtune does with token counts).

Checkpoints (``output_dir/step_N`` or ``epoch_N``, see :mod:`fastrm.training.checkpoint`),
written to a temporary directory and renamed when complete: a standard HF reward model when the
base model is an HF directory (``<Family>ForSequenceClassification``, ``score.weight``, the
tokenizer files; loads in transformers, TRL, OpenRLHF, vLLM, and :func:`fastrm.load_reward_model`),
``reward_stats.json`` (mean/std of rewards on the validation set, for reward normalization),
``recipe_state.pt`` (trainable parameters, optimizer, scheduler, data position) and each rank's
RNG state, for exact resume with ``resume_from_checkpoint=True``.

The pieces (config checks, distributed set-up, model building and sharding, data, metrics,
evaluation, checkpoint I/O) live in :mod:`fastrm.training`; this file is the loop.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from torchtune import config, training, utils
from torchtune.training.lr_schedulers import get_lr

from fastrm.data.batch import PackedBatch
from fastrm.loss import RewardLoss
from fastrm.training import checkpoint as ckpt_io
from fastrm.training import distributed as dist_utils
from fastrm.training.config import parse, validate_config
from fastrm.training.dtype import enable_tf32, resolve_dtype
from fastrm.training.evaluation import evaluate
from fastrm.training.metrics import StepAccumulator, loss_normalizer, memory_stats, reset_memory_stats
from fastrm.training.model_setup import RewardModelStep, build_model, build_sharded_step_module
from fastrm.training.step_data import StepData, build_step_data
from fastrm.training.training_state import load_training_state, save_training_state

log = utils.get_logger("INFO")


class RewardModelRecipe:
    """torchtune-style recipe: ``setup`` builds everything from the config, ``train`` runs the
    loop with evaluation and checkpoints, ``cleanup`` closes loggers and the process group."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        self.cfg = cfg
        self.world_size, self.rank = dist_utils.init_distributed(cfg.get("device", "cpu"))
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(cfg.get("device", "cpu"))
        self.dtype = resolve_dtype(cfg.get("dtype", "fp32"), self.device)
        enable_tf32(self.device, self.dtype)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        self.output_dir = Path(cfg.output_dir)
        self.seed = int(cfg.get("seed", 0))
        self.total_epochs = int(cfg.get("epochs", 1))
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.save_every = cfg.get("save_every_n_steps", None)
        self.eval_every = cfg.get("eval_every_n_steps", None)
        self.epochs_run = 0
        self.global_step = 0
        self.step_in_epoch = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        if self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.metric_logger = config.instantiate(
                cfg.get("metric_logger") or {"_component_": "torchtune.training.metric_logging.StdoutLogger"})
            self.metric_logger.log_config(cfg)
        if cfg.get("prepare_checkpoint") is not None and self.is_rank_zero:
            config.instantiate(cfg.prepare_checkpoint)
        dist_utils.barrier()

        self.tokenizer = config.instantiate(cfg.tokenizer)
        # Data first: a dataset error (a missing column, a NaN margin) should fail before the
        # model is loaded.
        self.train_data = build_step_data(cfg, "dataset", self.tokenizer, self.world_size,
                                          self.rank, seed=self.seed, train=True)
        self.val_data = self._eval_split(cfg, "validation_dataset")
        self.test_data = self._eval_split(cfg, "test_dataset")
        self.loss_fn = config.instantiate(cfg.loss)
        if not isinstance(self.loss_fn, RewardLoss):
            raise ValueError(f"loss._component_ must be fastrm.RewardLoss (or a subclass), got "
                             f"{type(self.loss_fn).__name__}")
        if self.loss_fn.use_margin and not self.train_data.has_margin:
            raise ValueError("loss.use_margin is True but the training dataset has no margin "
                             "column; set loss.use_margin=False or add margins")

        # Initial weights from the config seed, not torchtune's per-rank seed (the head and
        # adapters from fresh_parameters(seed) on both paths, so they are the same).
        torch.manual_seed(self.seed)
        if self.world_size > 1:  # meta device, FSDP2, each rank materialises its shards
            self.step_module, self.checkpointer = build_sharded_step_module(
                cfg, self.loss_fn, self.device, self.dtype, self.world_size, self.rank, self.seed,
                cfg.get("fsdp_reshard_after_forward", True))
            utils.log_rank_zero(log, f"FSDP2 over a {self.device.type} mesh of "
                                     f"{self.world_size} ranks (built on the meta device)")
        else:
            model, self.checkpointer = build_model(cfg, self.device, self.dtype, seed=self.seed)
            self.step_module = RewardModelStep(model, self.loss_fn)
        self.model = self.step_module.model
        # the save format and its conversion, checked on the real keys before any training
        self.model_writer = ckpt_io.ModelWriter(cfg, self.checkpointer, self.tokenizer)
        self.model_writer.check(self.model)
        training.set_seed(seed=self.seed)

        params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.steps_per_epoch = self.train_data.steps_per_epoch // self.grad_accum
        if self.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, int(self.max_steps_per_epoch))
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set gives {self.train_data.steps_per_epoch} packed steps per epoch, "
                f"fewer than gradient_accumulation_steps={self.grad_accum}; lower packing.rows_per_step "
                "or gradient_accumulation_steps")
        self.lr_scheduler = None
        if cfg.get("lr_scheduler") is not None:
            self.lr_scheduler = config.instantiate(
                cfg.lr_scheduler, self.optimizer,
                num_training_steps=self.total_epochs * self.steps_per_epoch)
        if cfg.get("resume_from_checkpoint"):
            self._load_recipe_state()
        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in self.step_module.parameters())
        utils.log_rank_zero(log, f"trainable parameters: {n_train:,} of {n_all:,}; "
                                 f"{self.train_data.describe()}; dtype={self.dtype}; "
                                 f"world_size={self.world_size}")

    def _eval_split(self, cfg: DictConfig, section: str) -> Optional[StepData]:
        """An optional evaluation split (``None`` when the section is absent or null)."""
        if cfg.get(section) is None:
            return None
        return build_step_data(cfg, section, self.tokenizer, self.world_size, self.rank,
                               seed=self.seed, train=False)

    # ------------------------------------------------------------------ train
    def _forward_backward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, float]:
        batch = batch.to(self.device)
        loss, rewards = self.step_module(batch)
        n = loss_normalizer(self.loss_fn, batch)
        (loss * n).backward()
        return loss.detach() * n, rewards, n

    def train(self) -> None:
        reset_memory_stats(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(self.epochs_run, self.total_epochs):
            steps = self.train_data.epoch_steps(epoch, skip=self.step_in_epoch * self.grad_accum)
            pbar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                        disable=not self.is_rank_zero, desc=f"epoch {epoch + 1}")
            t0 = time.perf_counter()
            acc = StepAccumulator()
            for micro, batch in enumerate(steps):
                if self.step_in_epoch >= self.steps_per_epoch:
                    break
                loss_sum, rewards, n = self._forward_backward(batch)
                acc.add(loss_sum, rewards, batch, n)
                if (micro + 1) % self.grad_accum:
                    continue
                n_global = dist_utils.all_reduce_sum(acc.normalizer, self.device)
                # FSDP2 averages gradients over ranks; undo that and divide by the global count
                training.scale_grads(self.step_module, torch.tensor(self.world_size / n_global))
                grad_norm = None
                if self.clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for p in self.step_module.parameters() if p.requires_grad],
                        max_norm=float(self.clip_grad_norm))
                    grad_norm = dist_utils.full_tensor(grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                self.global_step += 1
                self.step_in_epoch += 1
                elapsed = time.perf_counter() - t0
                metrics = acc.metrics(self.device, elapsed)
                metrics["lr"] = float(get_lr(self.optimizer))  # a tensor for optimizers such as torchao's
                metrics.update(memory_stats(self.device))
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                self.history.append({"step": self.global_step, **metrics})
                pbar.update(1)
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
                if self.is_rank_zero and self.global_step % self.log_every == 0:
                    self.metric_logger.log_dict(metrics, step=self.global_step)
                if self.eval_every and self.global_step % int(self.eval_every) == 0:
                    self.evaluate()
                if self.save_every and self.global_step % int(self.save_every) == 0:
                    self.save_checkpoint(f"step_{self.global_step}", epoch_done=False)
                acc = StepAccumulator()
                t0 = time.perf_counter()
            pbar.close()
            self.epochs_run = epoch + 1
            self.step_in_epoch = 0
            if self.val_data is not None:
                self.evaluate()
            if cfg_bool(self.cfg, "save_final_checkpoint", True) or epoch + 1 < self.total_epochs:
                self.save_checkpoint(f"epoch_{epoch}", epoch_done=True)
        if self.test_data is not None:
            self.test_results = self.evaluate(self.test_data, prefix="test")
            if self.is_rank_zero:
                (self.output_dir / "test_results.json").write_text(
                    json.dumps(self.test_results, indent=2))

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, data: Optional[StepData] = None, prefix: str = "val") -> dict[str, float]:
        """Accuracy, mean margin, loss and reward mean/std over a split (the validation split by
        default; every rank evaluates its share and the sums are reduced over ranks), plus
        per-category accuracy when the data has categories (held-out synthetic categories,
        RewardBench subsets)."""
        data = self.val_data if data is None else data
        if data is None:
            return {}
        was_training = self.step_module.training
        self.step_module.eval()
        result = evaluate(self.step_module, self.loss_fn, data, self.device,
                          max_steps=self.cfg.get("eval_max_steps", None),
                          show_progress=self.is_rank_zero)
        self.step_module.train(was_training)
        if prefix == "val":
            self.last_eval = result
        if self.is_rank_zero:
            self.metric_logger.log_dict({f"{prefix}/{k}": v for k, v in result.items()},
                                        step=self.global_step)
            summary = ", ".join(f"{k}={v:.4f}" for k, v in result.items() if not k.startswith("category/"))
            log.info(f"{prefix} at step {self.global_step}: {summary}")
            cats = {k[len('category/'):]: v for k, v in result.items() if k.startswith("category/")}
            if cats:
                log.info(f"{prefix} accuracy per category: " +
                         ", ".join(f"{k}={v:.3f}" for k, v in sorted(cats.items())))
        return result

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, tag: str, epoch_done: bool) -> Path:
        """Writes the reward model (:class:`~fastrm.training.checkpoint.ModelWriter`: an HF
        reward model when the base was an HF directory), reward statistics, the recipe state and
        every rank's RNG state into ``output_dir/.tag.partial``, renames it to ``output_dir/tag``
        once complete, then points ``output_dir/latest`` at it: a failure on the way leaves the
        previous checkpoint and ``latest`` untouched."""
        from fastrm._io import commit_dir, partial_dir

        out = self.output_dir / tag
        tmp = out.with_name(f".{tag}.partial")
        stats = getattr(self, "last_eval", {})
        if self.is_rank_zero:
            partial_dir(out)
        # every rank gathers in step; rank 0 converts and writes one layer at a time
        self.model_writer.write(tmp, ckpt_io.iter_model_tensors(self.step_module.model, self.is_rank_zero),
                                stats, self.is_rank_zero)
        if self.is_rank_zero:
            ckpt_io.save_reward_stats(tmp, stats, self.global_step)
        self._save_training_state(tmp, epoch_done)
        if self.is_rank_zero:
            commit_dir(tmp, out)
            ckpt_io.point_latest(self.output_dir, tag)
            log.info(f"saved checkpoint to {out}")
        return out

    # ------------------------------------------------------------------ resumable state
    def _save_training_state(self, out: Path, epoch_done: bool) -> None:
        """``out/training_state``: trainable shards, optimizer, RNG per rank and progress,
        with torch.distributed.checkpoint (:mod:`fastrm.training.training_state`)."""
        save_training_state(out, self.step_module, self.optimizer, {
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "global_step": self.global_step,
            "epochs_run": self.epochs_run,
            "step_in_epoch": 0 if epoch_done else self.step_in_epoch,
            "seed": self.seed,
            "history": self.history,
            "rows_per_global_step": self._rows_per_global_step(),
        }, self.device)

    def _rows_per_global_step(self) -> int:
        return int(self.cfg.packing.get("rows_per_step", 1)) * self.world_size * self.grad_accum

    def _load_recipe_state(self) -> None:
        ckpt = self.output_dir / "latest"
        state = load_training_state(ckpt, self.step_module, self.optimizer, self.device)
        if state["seed"] != self.seed:
            raise ValueError(f"seed={self.seed} differs from the checkpoint's seed={state['seed']}; "
                             "resume with the same seed")
        saved_rows = state.get("rows_per_global_step", self._rows_per_global_step())
        if saved_rows != self._rows_per_global_step():
            raise ValueError(
                f"the checkpoint's optimizer steps took {saved_rows} packed rows (rows_per_step x "
                f"ranks x gradient_accumulation_steps; saved by {state['world_size']} ranks), this run's "
                f"take {self._rows_per_global_step()}; on {self.world_size} ranks set "
                f"packing.rows_per_step={saved_rows / (self.world_size * self.grad_accum):g} so the "
                "data position and the global batch carry over")
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]
        self.epochs_run = state["epochs_run"]
        self.step_in_epoch = state["step_in_epoch"]
        self.history = list(state.get("history", []))
        utils.log_rank_zero(log, f"resumed from {ckpt.resolve()} at step {self.global_step} "
                                 f"(epoch {self.epochs_run}, step {self.step_in_epoch} in epoch; "
                                 f"saved by {state['world_size']} ranks, resumed on {self.world_size})")

    def cleanup(self) -> None:
        if self.is_rank_zero:
            (self.output_dir / "history.json").write_text(json.dumps(self.history, indent=1))
            self.metric_logger.close()
        dist_utils.destroy_distributed()


def cfg_bool(cfg: DictConfig, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    return default if value is None else bool(value)


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run fastrm/recipes/reward_model.py --config <yaml> [overrides]``."""
    config.log_config(recipe_name="RewardModelRecipe", cfg=cfg)
    recipe = RewardModelRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
