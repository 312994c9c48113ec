"""The TRL side of ``bench_trl.py``: SmolLM2-135M trained by TRL's ``RewardTrainer``, timed per step.

What it runs is what a TRL user runs: ``RewardTrainer`` on a conversational preference dataset
(``prompt`` / ``chosen`` / ``rejected`` message lists), which TRL tokenizes itself with the
model's chat template (``apply_chat_template``), filters at ``max_length`` (it *drops* every pair
with a sequence longer than ``max_length``), pads right (``DataCollatorForPreference``: the
``B`` chosen rows then the ``B`` rejected rows, ``[2B, L_max]``) and scores with
``LlamaForSequenceClassification`` (one label, no bias), which reads each row at its last
non-pad token. Only the things the comparison must pin down are set explicitly:

* the order of the pairs (``train_sampling_strategy="sequential"`` over a dataset already in the
  benchmark's order), so each TRL step holds exactly the pairs of the matching fastrm step;
* the optimizer: a ``torch.optim.AdamW`` built by ``common.make_adamw`` (the benchmark's lr,
  betas, eps, weight decay and implementation) over all parameters, with a constant schedule (``LambdaLR(1.0)``), gradient
  clipping at ``max_grad_norm``;
* the reward head (``score.weight [1, D]``) copied from the benchmark's plan (the same values
  fastrm's head gets);
* dtype (``bf16=False``; the weights are loaded in the plan's dtype) and gradient
  checkpointing (on or off; TRL's CPU defaults are bf16 autocast + checkpointing).

Where TRL reads the reward: SmolLM2's ``pad_token`` is ``<|im_end|>`` (id 2), the token that ends
every turn. The chat template closes the assistant turn with ``<|im_end|>\\n``, so the last
non-pad token of a TRL sequence is the final ``\\n`` and that is where TRL's reward is read
(transformers' ``GenericForSequenceClassification``: ``argmax(arange(L) * (ids != pad))``).
fastrm's pairs in the plan are fastrm's own tokenization plus that ``\\n`` token, so both sides
score identical token sequences at identical positions (``bench_trl.py`` checks every pair id by
id against ``apply_chat_template`` and this worker checks TRL's processed dataset again).

Run through ``bench_trl.py`` (one subprocess per run, so peak RSS is this run's alone).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import torch

import common


def trl_versions() -> dict[str, str]:
    """Versions of the TRL stack (raises ImportError when the ``bench`` extra is missing)."""
    import accelerate
    import datasets
    import transformers
    import trl
    return {"trl": trl.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def run_trl(plan: dict[str, Any], gradient_checkpointing: bool) -> dict[str, Any]:
    """Trains ``plan["warmup"] + plan["steps"]`` steps with TRL's ``RewardTrainer``.

    Args:
        plan: the benchmark plan (see ``trl_plan.make_plan``): ``rows`` (conversational pairs in
            the benchmark order, every pair including those TRL will drop), ``kept_pairs`` (the
            token ids of the pairs TRL keeps, in order), ``head_weight [1, D]``, ``spec``.
        gradient_checkpointing: TRL's ``gradient_checkpointing`` flag.

    Returns:
        per-step ``step_s`` (``on_step_begin`` to ``on_step_end``: forward, backward, clipping,
        AdamW step, zero_grad; the batch was collated and put on the device by the data
        loader before), ``collate_s`` (TRL's collator, untimed), ``loss``, ``grad_norm``
        (pre-clip), ``tokens_computed`` (``2B * L_max``), ``real_tokens`` (attention-mask sum),
        ``pairs``; ``dropped_pairs`` (TRL's own length filter over all rows),
        ``peak_rss_bytes``, ``peak_rss_before_train_bytes`` (loading), ``load_s``,
        ``shape_warmup_batches`` (with ``spec["shape_warmup"]``: each step's batch ran forward
        + backward once, untimed, before training).
    """
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl import RewardConfig, RewardTrainer

    spec = plan["spec"]
    torch.set_num_threads(spec["threads"])
    common.set_fp32_matmul(spec)
    dtype = getattr(torch, spec["dtype"])
    t_load = time.perf_counter()
    ckpt = plan["checkpoint_dir"]
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(
        ckpt, num_labels=1, dtype=dtype, attn_implementation=spec["attn_implementation"])
    if model.score.bias is not None:
        raise RuntimeError("expected a bias-free score head (LlamaForSequenceClassification)")
    with torch.no_grad():
        model.score.weight.copy_(plan["head_weight"].to(dtype))
    if model.get_input_embeddings().padding_idx != plan["embedding_padding_idx"]:
        raise RuntimeError(f"the embedding's padding_idx is {model.get_input_embeddings().padding_idx}"
                           f", the plan expects {plan['embedding_padding_idx']}")

    rows = plan["rows"]
    train = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                                "rejected": r["rejected"]} for r in rows])
    n_steps = spec["warmup"] + spec["steps"]
    out_dir = tempfile.mkdtemp(prefix="fastrm_trl_bench_")
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is
    # a deprecated alias); set whichever this version has, so the setting is the one we ask for
    import dataclasses
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    ckpt_arg = ({"activation_checkpointing": gradient_checkpointing}
                if "activation_checkpointing" in fields
                else {"gradient_checkpointing": gradient_checkpointing})
    args = RewardConfig(
        output_dir=out_dir,
        **ckpt_arg,
        per_device_train_batch_size=spec["batch_pairs"],
        gradient_accumulation_steps=1,
        max_steps=n_steps,
        learning_rate=spec["lr"],
        max_grad_norm=spec["max_grad_norm"],
        bf16=False,
        fp16=False,
        max_length=spec["max_length"],
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=spec.get("device", "cpu") == "cpu",
        seed=spec["seed"],
        disable_tqdm=True,
    )
    optimizer = common.make_adamw(model.parameters(), spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    record: dict[str, list] = {"step_s": [], "collate_s": [], "loss": [], "tokens_computed": [],
                               "real_tokens": [], "pairs": []}
    recording = {"on": True}

    cuda = spec.get("device", "cpu") == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            record["step_s"].append(time.perf_counter() - self.t0)

    class RecordingRewardTrainer(RewardTrainer):
        """RewardTrainer that also records each step's loss and token counts."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if model.training and recording["on"]:
                ids = inputs["input_ids"]
                record["loss"].append(float(loss.detach()))
                record["tokens_computed"].append(int(ids.numel()))
                record["real_tokens"].append(int(inputs["attention_mask"].sum()))
                record["pairs"].append(int(ids.shape[0] // 2))
            return (loss, outputs) if return_outputs else loss

    trainer = RecordingRewardTrainer(model=model, args=args, train_dataset=train,
                                     processing_class=tokenizer,
                                     optimizers=(optimizer, scheduler), callbacks=[Timer()])
    # the same pairs, token for token, as the plan (and so as fastrm's steps)
    kept = plan["kept_pairs"]
    ds = trainer.train_dataset
    if len(ds) != len(kept):
        raise RuntimeError(f"TRL kept {len(ds)} pairs, the plan expects {len(kept)}")
    for k in range(min(len(kept), n_steps * spec["batch_pairs"])):
        p = kept[k]
        if (list(ds[k]["chosen_ids"]) != p["prompt"] + p["chosen"]
                or list(ds[k]["rejected_ids"]) != p["prompt"] + p["rejected"]):
            raise RuntimeError(f"TRL's tokens of pair {k} (row {p['row']}) differ from the plan's")
    collate = trainer.data_collator

    def timed_collate(features):  # in the data loader, before on_step_begin: not in step_s
        t0 = time.perf_counter()
        out = collate(features)
        record["collate_s"].append(time.perf_counter() - t0)
        return out

    trainer.data_collator = timed_collate
    load_s = time.perf_counter() - t_load
    shape_warmup = 0
    if spec.get("shape_warmup"):  # forward + backward once per step's batch, untimed
        recording["on"] = False
        model.train()
        for inputs, _ in zip(trainer.get_train_dataloader(), range(n_steps)):
            trainer.compute_loss(model, inputs).backward()
            model.zero_grad(set_to_none=True)
            shape_warmup += 1
        sync()
        recording["on"] = True
        record["collate_s"].clear()
    rss_before = common.peak_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing to keep
    # the pre-clip gradient norm of each step (Trainer logs clip_grad_norm_'s return value)
    grad_norm = [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    if len(grad_norm) != n_steps:
        raise RuntimeError(f"expected {n_steps} logged gradient norms, got {len(grad_norm)}")
    checkpointing_on = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    if checkpointing_on != gradient_checkpointing:
        raise RuntimeError(f"asked for gradient checkpointing={gradient_checkpointing}, the model "
                           f"ran with {checkpointing_on}")
    return {
        **record,
        "grad_norm": grad_norm,
        "collate_s": record["collate_s"][:n_steps],
        "shape_warmup_batches": shape_warmup,
        "dropped_pairs": len(rows) - len(ds),
        "total_pairs": len(rows),
        "truncated_pairs": 0,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "peak_rss_before_train_bytes": rss_before,
        "peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "load_s": load_s,
        "checkpointing_on": checkpointing_on,
        "versions": trl_versions(),
    }
