"""Test-wide settings: offline, seeded; one torch thread per pytest-xdist worker."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests build tiny teachers, teacher caches and prompt caches: they go to a cache of the tests'
# own (kept between local runs, so a second run is fast; gitignored), never into the user's
# $KDBENCH_CACHE or ~/.cache/kdbench, where `kdbench cache list` would show them as clutter.
# KDBENCH_TEST_CACHE chooses another place; tests that need an empty cache make their own.
os.environ["KDBENCH_CACHE"] = os.environ.get("KDBENCH_TEST_CACHE", str(ROOT / ".kdbench-cache" / "tests"))


# The test command runs one pytest-xdist worker per core: each worker (and every process it
# starts, through the environment) gets one thread, or two workers on two cores would each
# spread over both and slow each other down far more than 2x (thread oversubscription).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (and jitter on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float32_cpu(monkeypatch):
    """Run as on a CPU without native bf16, whatever this machine has: for tests that compare two
    computation paths at float32 tolerance (bf16 autocast's 3 significant digits would hide a
    real mismatch, and make the test depend on the machine kind)."""
    import kdbench.device

    monkeypatch.setattr(kdbench.device, "native_bf16", lambda device: False)
