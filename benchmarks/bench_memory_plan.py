"""``fastrm plan`` against measured training runs of SmolLM2-135M, and the 8x H100 plans.

For each case, the SmolLM2-135M reward model of ``smollm2_135m_synthetic`` (the prepared
checkpoint, ``fastrm prepare smollm2``) trains ``--steps`` real optimizer steps on the CPU, in one
process, as the recipe builds it (:func:`fastrm.training.memory_plan.measure_training_memory`):
the actual storage bytes of parameters, buffers, gradients and AdamW state, and the bytes
autograd keeps per packed token (``saved_tensors_hooks``, each storage once, only what is still
referenced when the forward ends) are set beside what ``fastrm plan`` computes for the same
config on the meta device. Cases: full fine-tune, full with activation checkpointing, the
config's own policy (last 4 layers), and full in bf16 where the CPU runs bf16 natively (the
``cpu_flash`` backend). Prefix sharing is off: on CPU fp32 the ``sdpa_segments`` fallback also
keeps per-group masks that the flash backends do not (see the tests).

The second table is ``fastrm plan --gpus 8`` for the four shipped Llama-3.1 8x H100 configs.

    python benchmarks/bench_memory_plan.py            # 3 steps per case
    python benchmarks/bench_memory_plan.py --quick    # 1 step, fp32 cases only

Writes ``benchmarks/results/memory_plan_cpu.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import common
from common import RESULTS
from fastrm.config import resolve_config
from fastrm.training.dtype import cpu_has_fast_bf16
from fastrm.training.memory_plan import GIB, measure_training_memory, plan_memory

BIG = ["llama3_1_8b_full_8xh100", "llama3_1_8b_lora_8xh100", "llama3_1_70b_full_8xh100",
       "llama3_1_70b_lora_8xh100"]
PARTS = ("weights_bytes", "buffers_bytes", "gradients_bytes", "optimizer_bytes")


def smollm2_cfg(case: str):
    cfg = OmegaConf.load(resolve_config("smollm2_135m_synthetic"))
    cfg.packing.prefix_sharing = False
    cfg.dataset.num_prompts = 200
    cfg.dtype = "bf16" if case == "full_bf16" else "fp32"
    if case != "last4_layers":
        del cfg["trainable"]
    if case == "full_checkpointing":
        cfg.enable_activation_checkpointing = True
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    common.set_threads(args.threads)
    info = common.machine_info(args.threads)
    steps = 1 if args.quick else args.steps
    cases = ["full", "full_checkpointing", "last4_layers"]
    if not args.quick and cpu_has_fast_bf16():
        cases.append("full_bf16")
    from torchtune import config

    rows, measured_rows = [], []
    for case in cases:
        cfg = smollm2_cfg(case)
        checkpoint_dir = cfg.checkpointer.checkpoint_dir
        if not (Path(checkpoint_dir) / "model.safetensors").is_file():
            raise SystemExit(f"SmolLM2-135M is not prepared in {checkpoint_dir}: run "
                             "`fastrm prepare smollm2` first")
        plan = plan_memory(cfg, gpus=1)
        tok = config.instantiate(cfg.tokenizer)
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        t0 = time.perf_counter()
        m = measure_training_memory(cfg, tok, steps=steps, dtype=dtype)
        secs = time.perf_counter() - t0
        kept_formula = plan.activation_bytes_per_token - plan.activation_recompute_bytes_per_token
        worst = max(abs(k / kept_formula - 1) for k in m["activation_bytes_per_token"])
        row = {"case": case, "dtype": plan.dtype, "backend": plan.attention_backend,
               "parameters": plan.parameters, "trainable": plan.trainable_parameters,
               "steps": steps, "tokens": m["tokens"], "seconds": round(secs, 1)}
        for part in PARTS:
            row[f"plan_{part}"] = getattr(plan, part)
            row[f"measured_{part}"] = m[part]
        row["plan_activation_bytes_per_token"] = kept_formula
        row["measured_activation_bytes_per_token"] = m["activation_bytes_per_token"]
        row["activation_max_rel_error"] = worst
        row["exact_parts"] = all(getattr(plan, p) == m[p] for p in PARTS)
        rows.append(row)
        measured_rows.append({
            "case": case, "dtype": plan.dtype, "backend": plan.attention_backend,
            "weights MiB plan/measured": f"{plan.weights_bytes / 2**20:.2f} / {m['weights_bytes'] / 2**20:.2f}",
            "grads MiB plan/measured": f"{plan.gradients_bytes / 2**20:.2f} / {m['gradients_bytes'] / 2**20:.2f}",
            "AdamW MiB plan/measured": f"{plan.optimizer_bytes / 2**20:.2f} / {m['optimizer_bytes'] / 2**20:.2f}",
            "act KiB/token plan": f"{kept_formula / 1024:.2f}",
            "act KiB/token measured": ", ".join(f"{k / 1024:.2f}" for k in m["activation_bytes_per_token"]),
            "max rel err": f"{worst:.2e}",
        })
        print(f"{case}: parts exact={row['exact_parts']}, activation max rel error {worst:.2e} ({secs:.0f} s)")

    big = []
    for name in BIG:
        p = plan_memory(OmegaConf.load(resolve_config(name)), gpus=8)
        big.append({"config": name, **p.to_dict()})
    big_rows = [{
        "config": b["config"], "params": f"{b['parameters'] / 1e9:.2f}B",
        "trainable": f"{b['trainable_parameters'] / 1e6:.1f}M",
        "weights": f"{b['weights_bytes'] / GIB:.2f}", "grads": f"{b['gradients_bytes'] / GIB:.2f}",
        "optimizer": f"{b['optimizer_bytes'] / GIB:.2f}",
        "FSDP bufs": f"{b['fsdp_buffers_bytes'] / GIB:.2f}",
        "act KiB/token (AC)": f"{b['activation_bytes_per_token'] / 1024:.0f}",
        "tokens/rank": b["tokens_per_step"], "activations": f"{b['activation_bytes'] / GIB:.2f}",
        "total GiB / 80": f"{b['total_bytes'] / GIB:.2f}", "fits (15% headroom)": b["fits"],
    } for b in big]

    info["load_average_after"] = common.load_average()
    out = {"machine": info, "smollm2_135m": rows, "llama3_1_8xh100": big}
    common.write_json(RESULTS / "memory_plan_cpu.json", out)
    md = ["# fastrm plan vs measured training memory", "", common.machine_line(info), "",
          f"SmolLM2-135M reward model, 1 process, {steps} real AdamW steps per case, packed rows "
          "of 1024 tokens; bytes are actual tensor storage (activations: what autograd keeps per "
          "packed token, one value per step).", "",
          common.md_table(measured_rows, [(k, k) for k in measured_rows[0]]), "",
          "## fastrm plan --gpus 8 for the shipped Llama-3.1 configs (GiB per rank, H100 80GB)", "",
          common.md_table(big_rows, [(k, k) for k in big_rows[0]])]
    (RESULTS / "memory_plan_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [r["case"] for r in rows]
    x = range(len(rows))
    for i, part in enumerate(("weights_bytes", "gradients_bytes", "optimizer_bytes")):
        axes[0].bar([j + 0.27 * (i - 1) for j in x], [r[f"plan_{part}"] / 2**20 for r in rows],
                    width=0.25, label=f"{part.split('_')[0]} (plan)")
        axes[0].scatter([j + 0.27 * (i - 1) for j in x], [r[f"measured_{part}"] / 2**20 for r in rows],
                        color="k", marker="x", zorder=3)
    axes[0].set_xticks(list(x), labels, rotation=15)
    axes[0].set_ylabel("MiB (bars: plan, x: measured)")
    axes[0].set_title("SmolLM2-135M: states")
    axes[0].legend(fontsize=8)
    axes[1].bar(list(x), [r["plan_activation_bytes_per_token"] / 1024 for r in rows], width=0.5,
                label="plan")
    for j, r in enumerate(rows):
        axes[1].scatter([j] * len(r["measured_activation_bytes_per_token"]),
                        [k / 1024 for k in r["measured_activation_bytes_per_token"]],
                        color="k", marker="x", zorder=3, label="measured (per step)" if j == 0 else None)
    axes[1].set_xticks(list(x), labels, rotation=15)
    axes[1].set_ylabel("KiB kept per packed token")
    axes[1].set_title("SmolLM2-135M: activations")
    axes[1].legend(fontsize=8)
    common.save_figure(fig, RESULTS / "memory_plan_cpu.png")


if __name__ == "__main__":
    main()
