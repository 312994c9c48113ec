"""Fixtures of the training tests."""

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank (FSDP2 and DCP code paths in this process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
