from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The corpus/tokenizer cache shared by the tests (fetched once, never committed)."""
    return Path(os.environ.get("RAGTOP_DATA_DIR") or REPO / "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
