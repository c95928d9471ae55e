"""The Hugging Face hub, offline-first: cache locations, a network probe that cannot hang, and resolving
``hf:ORG/NAME`` or a local directory to a folder on disk (nothing downloads when the files are cached;
an offline machine gets a one-line :class:`TransportError` instead of a hang)."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Optional

from transport.errors import TransportError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def hub_host() -> str:
    """Host name of the Hugging Face endpoint (``$HF_ENDPOINT`` honoured)."""
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def offline_mode() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can a TCP connection to ``host:port`` be opened within ``timeout`` seconds (DNS included)?"""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def local_dir(ref: str) -> Optional[Path]:
    """The local folder ``hf:ORG/NAME`` / ``hf:DIR`` / a directory / its ``config.json`` names, without any
    network: a directory, or a cached snapshot; None when there is none."""
    name = ref[len("hf:"):] if ref.startswith("hf:") else ref
    p = Path(name).expanduser()
    if p.is_file():
        p = p.parent
    if p.is_dir():
        return p
    if name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, cache_dir=hf_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_dir(ref: str) -> Path:
    """A local directory for ``hf:ORG/NAME`` (cached snapshot, or a download when online) or a HF dir path."""
    name = ref[len("hf:"):] if ref.startswith("hf:") else ref
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TransportError(f"{p}: not a Hugging Face model directory (no config.json)")
        return p
    if not ref.startswith("hf:"):
        raise TransportError(f"{ref}: directory not found")
    if name.count("/") != 1 or name.startswith("/") or name.startswith("."):
        raise TransportError(f"{ref}: expected hf:ORG/NAME or a local directory with config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(name, cache_dir=hf_cache_dir(), local_files_only=True))
        if (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES):
            return path
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    host = hub_host()
    if offline_mode() or not network_reachable(host):
        raise TransportError(f"weights for hf:{name} are not in the local cache and the network is unreachable "
                             f"({host}); download them once on a connected machine")
    try:
        return Path(snapshot_download(name, cache_dir=hf_cache_dir(),
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is reported as one line
        raise TransportError(f"could not download hf:{name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None


__all__ = ["hub_host", "offline_mode", "network_reachable", "hf_cache_dir", "resolve_dir", "local_dir", "WEIGHT_FILES"]
