import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY_TABLE = DATA / "tiny_mp.csv"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_table() -> Path:
    return TINY_TABLE


@pytest.fixture
def write_csv(tmp_path):
    """Write a CSV file from text and return its path."""

    def _write(text: str, name: str = "table.csv") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write
