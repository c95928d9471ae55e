import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own alignment cache (nothing written to the user's cache)."""
    monkeypatch.setenv("TRANSPORT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
