"""Content-hashed cache of ``prepare`` results, so a second run on the same pair (or an app slider) only re-applies."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

Tensor = torch.Tensor


def cache_root() -> Path:
    """``$TRANSPORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/task-transport`` (``~/.cache/task-transport``)."""
    env = os.environ.get("TRANSPORT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "task-transport"


def hash_tensors(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes: equal content <=> equal hash."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def alignment_key(method: str, options: Mapping[str, Any], source_hash: str, target_hash: str,
                  data_hash: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    return hash_obj({"method": method, "options": dict(options), "source": source_hash, "target": target_hash,
                     "data": data_hash, "extra": dict(extra or {})})[:32]


def load_cached(key: str, loader, root: Path | None = None):
    d = (root or cache_root()) / "alignments" / key
    if not (d / "COMPLETE").exists():
        return None
    try:
        return loader(d)
    except Exception:  # noqa: BLE001 - a stale or broken cache entry is recomputed, never fatal
        return None


def store(key: str, alignment, root: Path | None = None) -> Path:
    """Save atomically: write into a temp dir, mark COMPLETE, rename into place."""
    base = (root or cache_root()) / "alignments"
    base.mkdir(parents=True, exist_ok=True)
    final = base / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
    try:
        alignment.save(tmp)
        (tmp / "COMPLETE").write_text("ok")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
