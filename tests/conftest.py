"""Test-wide settings: offline hub, one deliberate thread count, deterministic torch."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Artifacts (testbed weights, head scores, low-rank bases) go to a per-session directory, never the user's cache.
os.environ.setdefault("KVCOMPRESS_CACHE", tempfile.mkdtemp(prefix="kvcompress-tests-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the CI machine has two shared cores, and two threads on a busy machine are slower, not faster.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A module's own ``$KVCOMPRESS_CACHE`` (empty artifact folder), restored afterwards."""
    root = tmp_path_factory.mktemp("kvc_cache")
    old = os.environ.get("KVCOMPRESS_CACHE")
    os.environ["KVCOMPRESS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("KVCOMPRESS_CACHE", None)
    else:
        os.environ["KVCOMPRESS_CACHE"] = old
