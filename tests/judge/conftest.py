"""Fixtures for the judge tests: the tiny model and byte tokenizer, and a LocalBackend over the real
SmolLM2 checkpoint (slow tests; ``smollm2_dir`` is in tests/conftest.py)."""

from __future__ import annotations

import pytest
from tiny_backend import tiny_llama

from fastrm.data.tokenizer import ByteChatTokenizer


@pytest.fixture
def tokenizer():
    return ByteChatTokenizer()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_backend(tiny_model, tokenizer):
    from fastrm.judge.local import LocalBackend

    return LocalBackend(tiny_model, tokenizer, name="tiny", max_batch_size=4)


@pytest.fixture(scope="session")
def smollm2_backend(smollm2_dir, tmp_path_factory):
    from fastrm.judge.local import LocalBackend
    from fastrm.models.smollm2 import smollm2_135m, smollm2_checkpointer
    from fastrm.models.tokenizer import smollm2_tokenizer

    return LocalBackend(
        smollm2_135m(max_seq_len=2048),
        smollm2_tokenizer(str(smollm2_dir)),
        checkpointer=smollm2_checkpointer(output_dir=str(tmp_path_factory.mktemp("ckout")), checkpoint_dir=str(smollm2_dir)),
        name="smollm2-135m",
        max_batch_size=8,
    )
