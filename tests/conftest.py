import os
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tests use tiny models, which gain nothing from a second thread; on a loaded machine every small op
    then waits for a descheduled thread (test_generation ran 25x slower with two)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shakespeare() -> Path:
    """The real corpus beside the checkout; tests that need it skip in a user's clone."""
    path = Path(os.environ.get("LLMZOO_SHAKESPEARE", SHAKESPEARE))
    if not path.exists():
        pytest.skip(f"{path} not found (set LLMZOO_SHAKESPEARE to a copy of tinyshakespeare.txt)")
    return path
