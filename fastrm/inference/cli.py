"""``fastrm score`` / ``fastrm eval`` / ``fastrm serve``: argument parsing and the checkpoint glue.

    fastrm score --checkpoint DIR --input rows.jsonl --output out.jsonl [--normalize]
    fastrm eval  --checkpoint DIR --data FILE_OR_BUILDER [--data-arg k=v ...] [--output-dir D]
    fastrm serve --checkpoint DIR [--host H] --port P [--max-wait-ms MS] [--batch-tokens N]

``--checkpoint`` is an HF reward-model directory (what training exports:
``*ForSequenceClassification`` weights, tokenizer files, reward statistics), loaded by
:func:`fastrm.hf.load_reward_model`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["main_score", "main_eval", "main_serve", "load_scorer"]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="HF reward-model directory")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per packed forward (default 8192)")
    p.add_argument("--normalize", action="store_true",
                   help="(r - mean) / std with the checkpoint's stored reward statistics")
    p.add_argument("--dtype", default="float32",
                   choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
                   help="model dtype (default float32: exact rewards; auto: bf16 on GPUs and "
                   "CPUs with fast bf16, else fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--attention-backend", default=None,
                   help="packed attention backend (default: auto; see fastrm.attention)")


def load_scorer(args: argparse.Namespace):
    """The :class:`RewardScorer` of ``--checkpoint`` and the model options."""
    import torch

    from fastrm.inference.scorer import RewardScorer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(args.checkpoint).is_dir():
        raise SystemExit(f"fastrm: --checkpoint {args.checkpoint} is not a directory (give the "
                         "HF reward-model directory training exported)")
    try:
        return RewardScorer.from_checkpoint(
            args.checkpoint, dtype=args.dtype, device=device,
            attention_backend=args.attention_backend, batch_tokens=args.batch_tokens,
            normalize=args.normalize)
    except ValueError as err:
        raise SystemExit(f"fastrm: {err}") from err


def _run(fn, *a, **kw):
    """Runs a job, turning a ValueError (bad data, naming row and column) into a clean exit."""
    try:
        return fn(*a, **kw)
    except ValueError as err:
        raise SystemExit(f"fastrm: {err}") from err


# ------------------------------------------------------------------------------------- score

def main_score(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="fastrm score", description="Score rows with a reward model: {prompt, response}, "
        "{messages} (last assistant turn) or {prompt, responses: [...]} (best-of-N) -> every "
        "column kept + reward / rewards. Resumable: rerun the same command after a crash.")
    _model_args(p)
    p.add_argument("--input", required=True, help="rows: .jsonl or .parquet")
    p.add_argument("--output", required=True, help="scored rows: .jsonl (or .parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from fastrm.inference.store import score_file
    from fastrm.judge.store import journal_path

    if not Path(args.input).is_file():  # before the model loads
        raise SystemExit(f"fastrm score: --input {args.input} does not exist (rows: .jsonl or "
                         ".parquet)")
    _run(journal_path, args.output)  # the output's type: .jsonl or .parquet
    scorer = load_scorer(args)
    s = _run(score_file, scorer, args.input, args.output, progress=not args.no_progress,
             checkpoint=str(Path(args.checkpoint).resolve()))
    print(f"scored {s['scored']} rows ({s['resumed']} already done) in {s['seconds']:.1f}s "
          f"({s['rows_per_s']:.1f} rows/s; {scorer.stats['prompt_tokens_saved']} prompt tokens "
          f"not recomputed) -> {s['output']}")
    return 0


# -------------------------------------------------------------------------------------- eval

def _parse_data_args(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"fastrm eval: --data-arg {it!r} must be key=value")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def load_eval_data(spec: str, tokenizer: Any, data_args: dict[str, Any]):
    """Rows of a file (``.jsonl`` / ``.json`` / ``.parquet``), or the dataset a builder returns:
    ``fastrm.datasets.<name>`` (``name``, ``name_dataset`` or ``name_preference_dataset``, e.g.
    ``synthetic``) or a dotted ``module.function`` taking the tokenizer first."""
    path = Path(spec)
    if path.exists():
        if data_args:
            raise SystemExit("fastrm eval: --data-arg applies to builders, not files")
        from fastrm.judge.store import read_rows

        return read_rows(path)
    if "/" in spec or spec.endswith((".jsonl", ".json", ".parquet")):
        raise SystemExit(f"fastrm eval: --data {spec} does not exist")
    if "." in spec:
        module, names = spec.rsplit(".", 1)[0], [spec.rsplit(".", 1)[1]]
    else:
        module, names = "fastrm.datasets", [spec, f"{spec}_dataset", f"{spec}_preference_dataset"]
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"fastrm eval: cannot import {module} for --data {spec} ({err})") from err
    for n in names:
        if hasattr(mod, n):
            return _run(getattr(mod, n), tokenizer, **data_args)
    known = ", ".join(n for n in dir(importlib.import_module("fastrm.datasets"))
                      if n.endswith("_dataset"))
    raise SystemExit(f"fastrm eval: --data {spec} is neither a file nor a builder; builders: "
                     f"{known} (or module.function)")


def main_eval(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="fastrm eval", description="Pairwise accuracy (overall, per category), reward "
        "margins and RewardBench section scores of a reward model.")
    _model_args(p)
    p.add_argument("--data", required=True, help="preference rows (.jsonl / .parquet: prompt, "
                   "chosen, rejected, optional category or subset) or a dataset builder")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="builder argument (repeatable), e.g. split=test num_prompts=500")
    p.add_argument("--output-dir", default=None,
                   help="write metrics.json, scores.jsonl, table.md and eval.png here")
    args = p.parse_args(argv)
    from fastrm.inference.evaluate import evaluate_pairs, format_table, write_report

    scorer = load_scorer(args)
    data = load_eval_data(args.data, scorer.tokenizer, _parse_data_args(args.data_arg))
    metrics = _run(evaluate_pairs, scorer, data, return_scores=True, progress=True)
    scores = metrics.pop("scores")
    print(format_table(metrics))
    if args.output_dir:
        paths = write_report(metrics, scores, args.output_dir,
                             title=f"{Path(args.checkpoint).name} on {Path(args.data).name}")
        print("wrote " + ", ".join(paths.values()))
    else:
        print(json.dumps({k: metrics[k] for k in ("pairs", "accuracy")}))
    return 0


# ------------------------------------------------------------------------------------- serve

def main_serve(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="fastrm serve", description="HTTP reward server: POST /get_reward (OpenRLHF), POST "
        "/score (rows), GET /health; concurrent requests batched into packed rows.")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (0: any free port; default 5000)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default 5)")
    args = p.parse_args(argv)
    if args.max_wait_ms < 0:
        p.error(f"--max-wait-ms must be >= 0, got {args.max_wait_ms:g}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must lie in [0, 65535], got {args.port}")
    from fastrm.inference.server import serve

    scorer = load_scorer(args)
    try:
        serve(scorer, host=args.host, port=args.port, max_wait_ms=args.max_wait_ms)
    except OSError as err:  # the address: in use, not one of this machine's, a privileged port
        raise SystemExit(f"fastrm serve: cannot serve on {args.host}:{args.port} ({err})") from err
    return 0

