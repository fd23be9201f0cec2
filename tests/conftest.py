import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY_TABLE = DATA / "tiny_mp.csv"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads (scikit-learn's gradient boosting, torch) sleep instead of spinning while they wait: on a
# 2-core machine that other work shares, spinning threads made the estimate's small boosting fits 5-10x slower
# (at load 5, three boosting tests took 42, 33 and 25 s spinning and 7, 5 and 2 s sleeping). Set here, before
# torch or scikit-learn load OpenMP, and inherited by the subprocesses the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
