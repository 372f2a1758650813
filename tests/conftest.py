import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Services started by tests keep their jobs (SQLite) out of the working tree; each test gets a
# directory of its own below (_data_dir), apps that outlive a test share this one.
os.environ.setdefault("DIFFUSION_DATA_DIR", tempfile.mkdtemp(prefix="diffusion-test-data-"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED_DATA / "mnist-10k"
    if not d.is_dir():
        pytest.skip("../shared/data/mnist-10k not available")
    return d


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory, monkeypatch):
    """Each test's services keep their jobs (SQLite) in a directory of their own: one process may hold a
    data directory at a time, and nothing is written into the working tree."""
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(tmp_path_factory.mktemp("data")))
