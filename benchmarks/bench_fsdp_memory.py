"""Peak resident memory per rank of full fine-tuning with FSDP2 from the meta device: the same
reward-model recipe run on 1 rank and on 2 ranks (torchrun, gloo), same data, same steps.

A random Llama-shaped model (default 24 layers, D=1024, 16 heads, 8 KV heads, FFN 4096, vocab
32000: 0.41B parameters in the reward model) is written as an HF checkpoint to a temporary
folder, layer by layer; each run loads it through torchtune's ``FullModelHFCheckpointer`` and
trains it fully with AdamW in fp32 for a few steps. 1 rank takes the one-process path (the
model built on the CPU, the checkpoint loaded into it); 2 ranks build it on the meta device,
shard it (FSDP2) and receive the checkpoint's tensors from rank 0, one at a time. Each rank
reports its resident high-water mark (``VmHWM``, which counts loading) after set-up and after
the last step; losses of the two runs must agree within ``--loss-tol``.

Targets (issue 21): 2-rank peak per rank <= 0.6x the 1-rank peak; losses within 1e-5.

    python benchmarks/bench_fsdp_memory.py            # the 0.4B model (~8 GiB RAM per run)
    python benchmarks/bench_fsdp_memory.py --quick    # a tiny model, seconds (the test's mode)

Writes ``results/fsdp_memory[_quick].json``, ``.md`` and ``.png``. The runs go one after the
other (the 2-rank run's ranks together), never beside another measured run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.6


def model_args(args) -> dict[str, int]:
    return dict(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, embed_dim=args.dim, intermediate_dim=args.ffn,
                max_seq_len=args.max_seq_len)


def recipe_config(args, ckpt: dict, out_dir: Path, world: int) -> dict[str, Any]:
    """The recipe config of one run: ``rows_per_step`` per rank so that every run trains on
    the same global batches (N ranks with r rows = 1 rank with N*r rows)."""
    data = {"_component_": "fastrm.datasets.synthetic_preference_dataset", "split": "train",
            "num_prompts": args.prompts, "seed": 0, "length_scale": 0.3,
            "max_seq_len": args.seq // 2, "progress": False}
    return {
        "output_dir": str(out_dir), "seed": 1234, "device": "cpu", "dtype": "fp32",
        "tokenizer": {"_component_": "fastrm.models.tokenizer.hf_tokenizer",
                      "path": ckpt["checkpoint_dir"]},
        "model": {"_component_": "fastrm.models.tiny_llama3_reward_model", **model_args(args)},
        "checkpointer": ckpt,
        "dataset": data,
        "packing": {"max_seq_len": args.seq, "rows_per_step": args.global_rows // world,
                    "prefix_sharing": True},
        "loss": {"_component_": "fastrm.RewardLoss", "use_margin": True},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.0},
        "epochs": 1, "max_steps_per_epoch": args.steps, "save_final_checkpoint": False,
        "num_threads": args.threads, "log_every_n_steps": 1,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(out_dir / "logs")},
    }


def worker(cfg_path: str, report: str) -> None:
    """One rank (started by torchrun): the recipe's set-up and training, then this process's
    high-water marks."""
    from omegaconf import OmegaConf

    from fastrm.recipes.reward_model import RewardModelRecipe

    cfg = OmegaConf.load(cfg_path)
    rank = int(os.environ.get("RANK", "0"))
    recipe = RewardModelRecipe(cfg)
    t0 = time.perf_counter()
    recipe.setup(cfg)
    setup_s = time.perf_counter() - t0
    setup_hwm = common.peak_rss_bytes()
    t0 = time.perf_counter()
    recipe.train()
    train_s = time.perf_counter() - t0
    out = {"rank": rank, "world_size": recipe.world_size,
           "peak_rss_after_setup": setup_hwm, "peak_rss": common.peak_rss_bytes(),
           "setup_s": setup_s, "train_s": train_s,
           "losses": [h["loss"] for h in recipe.history],
           "params": sum(p.numel() for p in recipe.step_module.parameters()) if recipe.world_size == 1
           else None}
    recipe.cleanup()
    Path(f"{report}.rank{rank}").write_text(json.dumps(out))


def launch(args, ckpt: dict, work: Path, world: int) -> list[dict]:
    """``torchrun --nproc_per_node world`` of :func:`worker`; the ranks' reports."""
    from omegaconf import OmegaConf

    out_dir = work / f"run_{world}"
    cfg_path = work / f"run_{world}.yaml"
    OmegaConf.save(OmegaConf.create(recipe_config(args, ckpt, out_dir, world)), cfg_path)
    report = work / f"report_{world}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           # freed memory goes back to the OS at once, so VmHWM follows live tensors
           "MALLOC_MMAP_THRESHOLD_": str(common.MMAP_THRESHOLD),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), str(Path(__file__).resolve()), "--_worker", str(cfg_path), str(report)]
    print(f"running {world} rank(s): {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (work / f"run_{world}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the {world}-rank run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return [json.loads(Path(f"{report}.rank{r}").read_text()) for r in range(world)]


def summarize(args, one: list[dict], two: list[dict]) -> dict[str, Any]:
    gib = 2 ** 30
    base = one[0]["peak_rss"]
    rows = []
    for run in (one, two):
        for r in run:
            rows.append({"ranks": r["world_size"], "rank": r["rank"],
                         "peak_after_setup_gib": round(r["peak_rss_after_setup"] / gib, 3),
                         "peak_gib": round(r["peak_rss"] / gib, 3),
                         "vs_1_rank": round(r["peak_rss"] / base, 3),
                         "setup_s": round(r["setup_s"], 1), "train_s": round(r["train_s"], 1)})
    loss_one, loss_two = one[0]["losses"], two[0]["losses"]
    diff = max(abs(a - b) for a, b in zip(loss_one, loss_two)) if loss_one else float("nan")
    ratio = max(r["peak_rss"] for r in two) / base
    params = one[0]["params"]
    return {
        "rows": rows, "losses_1_rank": loss_one, "losses_2_ranks": loss_two,
        "max_abs_loss_diff": diff, "max_peak_ratio_2_ranks_vs_1": ratio,
        "params": params, "fp32_weight_gib": params * 4 / gib,
        "targets": {"peak_ratio_max": TARGET_RATIO, "loss_tol": args.loss_tol},
        "pass": {"peak_ratio": ratio <= TARGET_RATIO, "losses": diff <= args.loss_tol},
    }


def report_md(result: dict, info: dict, args) -> str:
    cols = [("ranks", "ranks"), ("rank", "rank"), ("peak_after_setup_gib", "peak after set-up GiB"),
            ("peak_gib", "peak GiB"), ("vs_1_rank", "peak / 1-rank peak"),
            ("setup_s", "set-up s"), ("train_s", "train s")]
    p = result["params"]
    lines = [
        f"# FSDP2 memory per rank: 1 vs 2 ranks{' (quick)' if args.quick else ''}", "",
        common.machine_line(info), "",
        f"Model: {args.layers} layers, D={args.dim}, {args.heads} heads ({args.kv_heads} KV), "
        f"FFN {args.ffn}, vocab {args.vocab}: {p / 1e9:.3f}B parameters "
        f"({result['fp32_weight_gib']:.2f} GiB fp32); full fine-tuning, AdamW, fp32, "
        f"{args.steps} steps of {args.global_rows} packed rows x {args.seq} tokens.", "",
        common.md_table(result["rows"], cols), "",
        f"* worst 2-rank peak / 1-rank peak: **{result['max_peak_ratio_2_ranks_vs_1']:.3f}** "
        f"(target <= {TARGET_RATIO}: {'met' if result['pass']['peak_ratio'] else 'NOT met'})",
        f"* max |loss(1 rank) - loss(2 ranks)| over {len(result['losses_1_rank'])} steps: "
        f"**{result['max_abs_loss_diff']:.2e}** (target <= {args.loss_tol:g}: "
        f"{'met' if result['pass']['losses'] else 'NOT met'})",
        "* peak = the process's resident high-water mark (VmHWM), loading included; each run in "
        "fresh processes, one run at a time, MALLOC_MMAP_THRESHOLD_=64 KiB.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = [f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}\nrank {r['rank']}" for r in result["rows"]]
    setup = [r["peak_after_setup_gib"] for r in result["rows"]]
    peak = [r["peak_gib"] for r in result["rows"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], setup, 0.4, label="peak after set-up (loading)")
    ax.bar([i + 0.2 for i in x], peak, 0.4, label="peak over the run")
    ax.axhline(result["rows"][0]["peak_gib"] * TARGET_RATIO, color="k", ls="--", lw=1,
               label=f"{TARGET_RATIO}x 1-rank peak")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title(f"{result['params'] / 1e9:.2f}B RM, full FT, AdamW fp32")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-seq-len", type=int, default=2048, help="the model's RoPE length")
    parser.add_argument("--seq", type=int, default=512, help="packed row length")
    parser.add_argument("--global-rows", type=int, default=2, help="packed rows per optimizer step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--loss-tol", type=float, default=1e-5)
    parser.add_argument("--quick", action="store_true", help="a tiny model (the test's mode)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        worker(*args._worker)
        return 0
    if args.quick:
        args.layers, args.dim, args.heads, args.kv_heads, args.ffn, args.vocab = 2, 64, 4, 2, 128, 261
        args.steps, args.prompts, args.max_seq_len = 2, 24, 1024

    from fastrm.models.random_hf import write_random_llama_checkpoint

    info = common.machine_info(args.threads)
    with tempfile.TemporaryDirectory(prefix="fastrm_fsdp_mem_") as tmp:
        work = Path(tmp)
        ckpt = write_random_llama_checkpoint(work / "base", seed=0, layers_per_file=4,
                                             **{k: v for k, v in model_args(args).items()})
        one = launch(args, ckpt, work, 1)
        two = launch(args, ckpt, work, 2)
    result = summarize(args, one, two)
    info["load_average_after"] = common.load_average()
    md = report_md(result, info, args)
    print(md)
    stem = "fsdp_memory_quick" if args.quick else "fsdp_memory"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out_dir / f"{stem}.json", {"machine": info, "args": {
        k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out_dir"}, **result}, indent=2)
    (args.out_dir / f"{stem}.md").write_text(md)
    plot(result, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
