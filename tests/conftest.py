import os
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shakespeare() -> Path:
    """The real corpus beside the checkout; tests that need it skip in a user's clone."""
    path = Path(os.environ.get("LLMZOO_SHAKESPEARE", SHAKESPEARE))
    if not path.exists():
        pytest.skip(f"{path} not found (set LLMZOO_SHAKESPEARE to a copy of tinyshakespeare.txt)")
    return path
