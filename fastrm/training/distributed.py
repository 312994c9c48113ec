"""Process group and device mesh of a recipe run: torchrun / ``tune run --nproc_per_node``
start several processes (gloo on CPU, nccl on CUDA); a plain ``tune run`` stays one process."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int]:
    """Initialises the process group when launched with ``WORLD_SIZE > 1`` (gloo on CPU, nccl
    on CUDA) and returns ``(world_size, rank)``; ``(1, 0)`` in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" or (device != "cpu" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def device_mesh(device: torch.device, world_size: int):
    """The 1-D mesh FSDP2 shards over, on the run's device type: ``fully_shard`` without a
    mesh builds one on the default accelerator, so a CPU (gloo) run on a machine with a
    visible GPU would move every parameter to ``cuda:0``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """``value`` summed over ranks (float64)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a plain tensor is returned as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def iter_full_tensors(module: torch.nn.Module,
                      is_rank_zero: bool) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """``(name, tensor)`` for each entry of ``module.state_dict()``, one at a time, for writing
    the final model: a sharded (DTensor) entry is all-gathered (``full_tensor()``) and moved
    to the CPU on rank 0; other ranks get ``None`` and drop their gathered copy at once. Every
    rank must run the generator to its end, in step (each sharded entry is a collective). At
    most one full tensor exists beyond the shards at any moment, so no rank holds an extra
    full copy of the model; in one process it yields the CPU tensors."""
    for name, t in module.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, (full.detach().cpu() if is_rank_zero else None)
        del full
