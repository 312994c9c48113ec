"""The recipe's DataLoader settings (``dataloader`` section): defaults per device, and a worker
process that yields exactly the batches of the main process, across epochs and a resume."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.training.step_data import build_step_data, dataloader_settings

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml"


def test_dataloader_defaults_per_device_and_overrides():
    assert dataloader_settings(None, "cpu") == {"num_workers": 0, "pin_memory": False,
                                                "persistent_workers": False}
    assert dataloader_settings({}, "cuda") == {"num_workers": 1, "pin_memory": True,
                                               "persistent_workers": True}
    assert dataloader_settings({"num_workers": None, "pin_memory": None}, "cuda")["num_workers"] == 1
    assert dataloader_settings({"num_workers": 2, "persistent_workers": False}, "cpu") == {
        "num_workers": 2, "pin_memory": False, "persistent_workers": False}
    assert dataloader_settings({"num_workers": 0}, "cuda") == {
        "num_workers": 0, "pin_memory": True, "persistent_workers": False}
    with pytest.raises(ValueError, match="num_workers"):
        dataloader_settings({"num_workers": -1}, "cpu")
    with pytest.raises(ValueError, match="unknown dataloader keys"):
        dataloader_settings({"workers": 1}, "cpu")


def test_unknown_dataloader_key_fails_the_config_check():
    from fastrm.training.config import ConfigError, validate_config

    cfg = OmegaConf.load(TINY)
    cfg.dataloader = {"num_worker": 1}
    with pytest.raises(ConfigError, match="did you mean 'num_workers'"):
        validate_config(cfg)
    cfg.dataloader = {"num_workers": -2}
    with pytest.raises(ConfigError, match="num_workers"):
        validate_config(cfg)
    cfg.dataloader = {"num_workers": 1, "pin_memory": True, "persistent_workers": True}
    validate_config(cfg)


def _split(tmp_path, train: bool, world_size=2, rank=1, **dataloader):
    from fastrm.data.tokenizer import ByteChatTokenizer

    cfg = OmegaConf.load(TINY)
    cfg.dataset.num_prompts = 120
    cfg.dataset.length_scale = 0.15
    cfg.dataset.max_seq_len = 192
    cfg.packing.max_seq_len = 384
    cfg.data_cache_dir = str(tmp_path / "cache")
    cfg.epochs = 2
    if dataloader:
        cfg.dataloader = dataloader
    return build_step_data(cfg, "dataset", ByteChatTokenizer(), world_size, rank, seed=5, train=train)


def _same(a, b):
    for name, va in vars(a).items():
        vb = getattr(b, name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, name


def test_a_worker_process_yields_the_main_process_batches(tmp_path):
    main = _split(tmp_path, True)
    worker = _split(tmp_path, True, num_workers=1, persistent_workers=True)
    assert worker.loader_kwargs == {"num_workers": 1, "pin_memory": False, "persistent_workers": True}
    # epoch 0 stopped early (max_steps_per_epoch), epoch 1 whole, then epoch 1 again resumed at
    # step 2: the persistent worker follows the epoch and the start the main process sets
    plan = [(0, 0, 3), (1, 0, None), (1, 2, None)]
    for epoch, skip, stop in plan:
        want = list(main.epoch_steps(epoch, skip))[:stop]
        it = worker.epoch_steps(epoch, skip)
        got = [b for _, b in zip(range(stop or 10**9), it)]
        assert len(got) == len(want) > 1
        for a, b in zip(got, want):
            _same(a, b)
    assert worker._train_loader._iterator is not None  # one loader, workers kept
    ev_main, ev_worker = _split(tmp_path, False), _split(tmp_path, False, num_workers=1)
    for (a, ra), (b, rb) in zip(list(ev_worker.eval_steps()), list(ev_main.eval_steps()), strict=True):
        assert ra == rb
        _same(a, b)


def test_pin_memory_pins_every_tensor_of_a_batch(tmp_path, monkeypatch):
    """What the DataLoader's pinning thread calls on a batch (CPU-only torch cannot pin, so
    the pin itself is recorded)."""
    batch = next(iter(_split(tmp_path, True, world_size=1, rank=0).epoch_steps(0)))
    pinned = []

    def fake_pin(t):
        pinned.append(t.data_ptr())
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 6 and sorted(pinned) == sorted(t.data_ptr() for t in tensors)
    _same(out, batch)
    assert type(out) is type(batch)
