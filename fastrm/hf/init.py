"""``fastrm init --from HF_DIR [--data FILE] > rm.yaml``: a training config for any supported HF
model directory, read from its ``config.json`` (family, dimensions, tied embeddings; weights in
one ``model.safetensors`` or shards named by ``model.safetensors.index.json``). A
``*ForSequenceClassification`` directory continues training that reward model (its
``score.weight`` becomes the head). The config uses:

* ``model``: :func:`fastrm.models.reward_model` around the family's torchtune decoder builder
  (:mod:`fastrm.hf.families`) with the dimensions of ``config.json``;
* ``checkpointer``: :class:`fastrm.hf.HFCheckpointer` over the directory;
* ``tokenizer``: :func:`fastrm.models.tokenizer.hf_tokenizer` (the directory's chat template);
* ``dataset``: :func:`fastrm.datasets.preference_dataset` over ``--data`` (JSON/JSONL, CSV or
  Parquet file, or a dataset name), else the synthetic preference set to try the run.

Every checkpoint the run saves is an HF reward model of the same family.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastrm.hf.families import decoder_kwargs, family_for, read_config
from fastrm.hf.load import weight_files

__all__ = ["init_config", "main"]

_SOURCES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def _dataset(data: Optional[str], split: str, max_seq_len: int) -> list[str]:
    if data is None:
        return ["  _component_: fastrm.datasets.synthetic_preference_dataset",
                f"  split: {split}", "  num_prompts: 2000", "  seed: 0", "  length_scale: 0.3",
                f"  max_seq_len: {max_seq_len}", "  progress: false"]
    path = Path(data).expanduser()
    lines = ["  _component_: fastrm.datasets.preference_dataset"]
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in _SOURCES:
        lines += [f"  source: {_SOURCES[suffix]}", f"  data_files: {_yaml_value(str(path.resolve()))}",
                  "  split: train"]
    else:  # a dataset name or a directory load_dataset understands
        lines += [f"  source: {_yaml_value(data)}", f"  split: {split}"]
    return lines + [f"  max_seq_len: {max_seq_len}"]


def init_config(hf_dir: str, data: Optional[str] = None, validation_data: Optional[str] = None,
                output_dir: Optional[str] = None, max_seq_len: int = 2048,
                device: Optional[str] = None) -> str:
    """The YAML text of a training config for ``hf_dir`` (see the module docstring).

    Args:
        hf_dir: the HF model directory.
        data: preference data for ``dataset`` (None: the synthetic set).
        validation_data: preference data for ``validation_dataset`` (None: the synthetic
            validation split when ``data`` is None, else no validation section).
        output_dir: where the run writes (default ``outputs/<directory name>_rm``).
        max_seq_len: tokens per sequence (longer prompts are cut from the left); packed rows
            hold ``2 * max_seq_len``.
        device: ``cpu`` / ``cuda`` (default: cuda when available).
    """
    import torch

    d = Path(hf_dir).expanduser().resolve()
    config = read_config(d)
    fam = family_for(config)
    weight_files(d)  # fail now when the weights are missing
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d} has no tokenizer.json: the config's tokenizer reads the "
                                "directory's tokenizer files (save them with the model)")
    kw = decoder_kwargs(config)
    seq = min(int(max_seq_len), kw["max_seq_len"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bf16" if device == "cuda" else "fp32"
    # bf16 weights lose every AdamW update under half a unit in the last place (most of them at
    # lr 1e-5): in bf16 the update is computed in fp32 and rounded stochastically (fastrm.optim)
    optimizer = "fastrm.optim.AdamW" if dtype == "bf16" else "torch.optim.AdamW"
    is_rm = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    out = output_dir or f"outputs/{d.name}_rm"
    what = "reward model (its score.weight is the head)" if is_rm else "causal LM (a fresh head)"
    lines = [
        f"# fastrm reward-model config written by `fastrm init --from {d}`",
        f"# base: {config.get('model_type')} {what}: {kw['num_layers']} layers, D={kw['embed_dim']}, "
        f"{kw['num_heads']}/{kw['num_kv_heads']} heads, tied embeddings: {kw['tie_word_embeddings']}",
        f"# (torchtune's FullModelHFCheckpointer model_type for this family: {fam.torchtune_model_type})",
        "# run: fastrm train --config THIS_FILE [key=value ...]",
        "#  (or: tune run fastrm/recipes/reward_model.py --config THIS_FILE [key=value ...])",
        "",
        f"output_dir: {_yaml_value(out)}",
        "seed: 0",
        f"device: {device}",
        f"dtype: {dtype}",
        "",
        "checkpointer:",
        "  _component_: fastrm.hf.HFCheckpointer",
        f"  checkpoint_dir: {_yaml_value(str(d))}",
        "  output_dir: ${output_dir}",
        "",
        "tokenizer:",
        "  _component_: fastrm.models.tokenizer.hf_tokenizer",
        f"  path: {_yaml_value(str(d))}",
        "",
        "model:",
        "  _component_: fastrm.models.reward_model",
        f"  decoder: {fam.builder}",
    ]
    lines += [f"  {k}: {_yaml_value(v)}" for k, v in kw.items()]
    lines += ["", "dataset:"] + _dataset(data, "train", seq)
    if validation_data is not None or data is None:
        lines += ["validation_dataset:"] + _dataset(validation_data, "validation", seq)
    lines += [
        "",
        "packing:",
        f"  max_seq_len: {2 * seq}    # tokens per packed row; pairs never straddle rows",
        "  rows_per_step: 1",
        "  prefix_sharing: true",
        "",
        "loss:",
        "  _component_: fastrm.RewardLoss",
        "  use_margin: false",
        "",
        "optimizer:",
        f"  _component_: {optimizer}",
        "  lr: 1e-5",
        "  weight_decay: 0.0",
        "lr_scheduler:",
        "  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "  num_warmup_steps: 10",
        "",
        "epochs: 1",
        "max_steps_per_epoch: null",
        "gradient_accumulation_steps: 1",
        "clip_grad_norm: 1.0",
        f"enable_activation_checkpointing: {_yaml_value(device == 'cuda')}",
        "compile: false",
        "save_every_n_steps: null",
        "resume_from_checkpoint: false",
        "log_every_n_steps: 1",
        "",
        "metric_logger:",
        "  _component_: torchtune.training.metric_logging.DiskLogger",
        "  log_dir: ${output_dir}/logs",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrm init --from HF_DIR [--data FILE] [--validation-data FILE] [--output-dir DIR]
    [--max-seq-len N] [--device cpu|cuda]``: prints the YAML on stdout."""
    p = argparse.ArgumentParser(prog="fastrm init", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="hf_dir", required=True, help="HF model directory")
    p.add_argument("--data", default=None, help="preference data (JSON/JSONL/CSV/Parquet or a dataset name)")
    p.add_argument("--validation-data", default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = p.parse_args(argv)
    try:
        text = init_config(args.hf_dir, args.data, args.validation_data, args.output_dir,
                           args.max_seq_len, args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastrm init: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
