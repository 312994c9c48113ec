"""The resumable training state of a recipe run, sharded with ``torch.distributed.checkpoint``
(DCP), so no rank ever holds the full optimizer state and a run resumes on any number of ranks.

``output_dir/<tag>/training_state/`` is one DCP checkpoint (``.metadata`` + one
``__<rank>_0.distcp`` file per rank that saved):

* ``model.*``: the trainable parameters (the frozen rest comes from the base checkpoint), each
  rank writing its own FSDP2 shards;
* ``optimizer.*``: the optimizer state under the parameters' names
  (``torch.distributed.checkpoint.state_dict.get_state_dict``), sharded like the parameters;
* ``progress``: global step, epochs run, position in the epoch, seed, LR-scheduler state,
  the metric history and the number of ranks that saved (written by rank 0);
* ``rng.rank<r>``: rank ``r``'s torch / CUDA / numpy / python RNG states.

DCP records each tensor's global shape and every shard's offsets, so the state saved by N ranks
loads on M ranks (1 included, no process group): each rank reads the slices its own shards
cover. Rank ``r`` restores the RNG state rank ``r`` saved; a rank that did not exist at save time
keeps torchtune's ``seed + rank`` and a warning says so (fastrm's steps draw no random numbers
unless the model has dropout, so the losses are unaffected).

Writes are atomic: every rank writes into ``<tag>/.training_state.tmp``; once all have finished,
rank 0 renames it to ``training_state``. Several nodes need ``output_dir`` on a filesystem they
all see.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fastrm.training.checkpoint import rng_state, set_rng_state
from fastrm.training.distributed import barrier

STATE_DIR = "training_state"
_TMP_DIR = f".{STATE_DIR}.tmp"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """DCP warns that it "assumes" one process when there is no process group; in a
    one-process run that is the plan, not an accident."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state under parameter names, sharded as they are
    (DTensors under FSDP2, plain tensors in one process); an optimizer that has not stepped
    yet gets its state created (zero gradients, lr 0) so that a load has tensors to fill."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_training_state(out: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                        progress: dict[str, Any], device: torch.device) -> Path:
    """Writes ``out/training_state`` (see the module docstring); every rank must call it.
    ``progress`` is any picklable dict (rank 0's is kept). Returns the folder."""
    import torch.distributed.checkpoint as dcp

    rank, world = _rank_world()
    model_sd, optim_sd = _state_dicts(module, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd,
                             f"rng.rank{rank}": pickle.dumps(rng_state(device))}
    if rank == 0:
        state["progress"] = pickle.dumps({**progress, "world_size": world})
    tmp, final = out / _TMP_DIR, out / STATE_DIR
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with _one_process_is_intended():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    barrier()
    if rank == 0:
        old = out / f".{STATE_DIR}.old{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def saved_keys(path: Path) -> set[str]:
    """The (flattened) names a DCP checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_training_state(ckpt: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> dict[str, Any]:
    """Loads ``ckpt/training_state`` into ``module`` (trainable parameters) and ``optimizer``,
    restores this rank's RNG state, and returns the saved ``progress`` dict. Every rank must
    call it; the number of ranks may differ from the save's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = ckpt / STATE_DIR
    if not (path / ".metadata").exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {path} holds no training state (no .metadata); "
            "run without resuming first, or point output_dir at the run to resume")
    rank, _ = _rank_world()
    saved = saved_keys(path)
    model_sd, optim_sd = _state_dicts(module, optimizer)
    want = {f"model.{k}" for k in model_sd}
    have = {k for k in saved if k.startswith("model.")}
    if want != have:
        raise ValueError(
            f"{path} trained other parameters than this run does: only in the checkpoint "
            f"{sorted(have - want)[:4]}, only in this run {sorted(want - have)[:4]}; resume with "
            "the same model, LoRA and 'trainable' settings")
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "progress": b""}
    rng_key = f"rng.rank{rank}"
    if rng_key in saved:
        state[rng_key] = b""
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    progress = pickle.loads(state["progress"])
    if rng_key in state:
        set_rng_state(pickle.loads(state[rng_key]), device)
    else:
        warnings.warn(f"{path} was saved by {progress['world_size']} ranks; rank {rank} keeps "
                      "its fresh RNG seed (the model's steps draw no random numbers unless it "
                      "has dropout)", stacklevel=2)
    return progress
