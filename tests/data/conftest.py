"""Fixtures of the data-layer tests: the byte tokenizer and the hand-written fixture files."""

from pathlib import Path

import pytest

from fastrm.data.tokenizer import ByteChatTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def tok() -> ByteChatTokenizer:
    return ByteChatTokenizer()


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
