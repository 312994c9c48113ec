"""Fixtures of the inference tests: tiny reward models with the byte tokenizer or an HF (ChatML)
tokenizer."""

from __future__ import annotations

import pytest

from fastrm.data.tokenizer import ByteChatTokenizer
from scoring_ref import tiny_model


@pytest.fixture(scope="session")
def byte_tok():
    return ByteChatTokenizer()


@pytest.fixture(scope="session")
def byte_model():
    return tiny_model(ByteChatTokenizer.vocab_size)


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory):
    from fixtures.hf_tokenizers import build_tokenizer_dir
    return build_tokenizer_dir("smollm2", tmp_path_factory.mktemp("tok") / "smollm2")


@pytest.fixture(scope="session")
def chatml_tok(chatml_dir):
    from fastrm.models.tokenizer import HFChatTokenizer
    return HFChatTokenizer(chatml_dir)


@pytest.fixture(scope="session")
def chatml_model(chatml_tok):
    return tiny_model(chatml_tok.vocab_size, seed=1)
