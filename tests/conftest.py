import os

import pytest
import torch
from transport.zoo.builder import build as build_zoo

#: set by the thread-count runs of the numerics tests (tests/test_procrustes.py): every test runs with N threads
PINNED_THREADS = os.environ.get("TRANSPORT_TEST_THREADS")
torch.set_num_threads(int(PINNED_THREADS) if PINNED_THREADS else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _pinned_threads():
    """Under TRANSPORT_TEST_THREADS=N no module or fixture may change the thread count (checked after each test)."""
    if PINNED_THREADS:
        torch.set_num_threads(int(PINNED_THREADS))
    yield


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()}" + (" (pinned)" if PINNED_THREADS else "")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own alignment cache (nothing written to the user's cache)."""
    monkeypatch.setenv("TRANSPORT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The test variant of the demo zoo, built once per session; TRANSPORT_ZOO_DIR points at it meanwhile."""
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root, variant="test", progress=False, workers=1)
    old = os.environ.get("TRANSPORT_ZOO_DIR")
    os.environ["TRANSPORT_ZOO_DIR"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("TRANSPORT_ZOO_DIR", None)
        else:
            os.environ["TRANSPORT_ZOO_DIR"] = old


@pytest.fixture(scope="session")
def tiny_text_zoo(tmp_path_factory):
    """The test variant of the text zoo, built once per session; TRANSPORT_TEXT_ZOO_DIR points at it meanwhile."""
    from transport.zoo.text_build import build as build_text_zoo

    root = tmp_path_factory.mktemp("text_zoo")
    build_text_zoo(root, variant="test", progress=False, workers=1)
    old = os.environ.get("TRANSPORT_TEXT_ZOO_DIR")
    os.environ["TRANSPORT_TEXT_ZOO_DIR"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("TRANSPORT_TEXT_ZOO_DIR", None)
        else:
            os.environ["TRANSPORT_TEXT_ZOO_DIR"] = old
