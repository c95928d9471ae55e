"""Content-hashed cache of ``prepare`` results, so a second run on the same pair (or an app slider) only re-applies.

Each entry is a directory ``alignments/KEY`` written atomically; its ``COMPLETE`` file records the
sha256 of every file the alignment saved, checked on every load: an entry whose files changed is
recomputed (with a warning), never used. A cache directory that cannot be written is skipped (with a
warning): the run goes on without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from transport.errors import warn

Tensor = torch.Tensor

#: the ``format`` field of an entry's COMPLETE record (older entries, without hashes, are recomputed)
ENTRY_FORMAT = "transport.cache_entry/1"


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


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=None)
def code_version(root: Path = Path(__file__).resolve().parent) -> str:
    """sha256 over the package's Python sources (relative paths and bytes): any change to the code that
    computes an alignment changes every key, so an upgrade never serves an alignment of the old code."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root).as_posix()).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def alignment_key(method: str, options: Mapping[str, Any], source_hash: str, target_hash: str,
                  data_hash: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    return hash_obj({"method": method, "options": dict(options), "source": source_hash, "target": target_hash,
                     "data": data_hash, "extra": dict(extra or {}), "code": code_version()})[:32]


def _entry_files(d: Path) -> dict[str, str]:
    """sha256 of every file of an entry directory except COMPLETE, by path relative to it."""
    return {str(f.relative_to(d)): hash_file(f) for f in sorted(d.rglob("*"))
            if f.is_file() and f.relative_to(d) != Path("COMPLETE")}


def _verify(d: Path) -> Optional[str]:
    """None when the entry's files are exactly the recorded ones, else what differs (one phrase)."""
    try:
        record = json.loads((d / "COMPLETE").read_text())
    except ValueError:
        return "old entry"
    if not isinstance(record, dict) or record.get("format") != ENTRY_FORMAT or not isinstance(record.get("sha256"), dict):
        return "old entry"
    want: dict = record["sha256"]
    have = _entry_files(d)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"{name} is missing"
        if name not in want:
            return f"{name} was not written by the cache"
        if have[name] != want[name]:
            return f"{name} does not match its recorded sha256"
    return None


def load_cached(key: str, loader, root: Path | None = None):
    """The cached alignment for ``key`` when its files are intact, else None (the caller recomputes)."""
    d = (root or cache_root()) / "alignments" / key
    try:
        if not (d / "COMPLETE").is_file():
            return None
        problem = _verify(d)
    except OSError:  # an unreadable cache is a miss
        return None
    if problem == "old entry":  # written before entries carried hashes: recompute quietly
        return None
    if problem is not None:
        warn(f"cache entry {d} is corrupted ({problem}); recomputing it")
        return None
    try:
        return loader(d)
    except Exception:  # noqa: BLE001 - an intact entry of an older format is recomputed, never fatal
        return None


def writable(root: Path | None = None) -> Optional[str]:
    """None when the cache directory can take new entries, else why not (e.g. 'Read-only file system')."""
    base = (root or cache_root()) / "alignments"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".probe-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def store(key: str, alignment, root: Path | None = None) -> Optional[Path]:
    """Save atomically: write into a temp dir, record every file's sha256 in COMPLETE, rename into place.

    A cache directory that cannot be written gives a warning and None (the run goes on without it).
    """
    base = (root or cache_root()) / "alignments"
    tmp: Optional[Path] = None
    try:
        base.mkdir(parents=True, exist_ok=True)
        final = base / key
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
        alignment.save(tmp)
        record = {"format": ENTRY_FORMAT, "sha256": _entry_files(tmp)}
        (tmp / "COMPLETE").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:
        warn(f"cache directory {base} is not writable ({e.strerror or type(e).__name__}); running without the cache")
        return None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
