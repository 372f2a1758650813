import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED_DATA / "mnist-10k"
    if not d.is_dir():
        pytest.skip("../shared/data/mnist-10k not available")
    return d
