"""What a pickled file would import, read from its opcodes without unpickling anything.

``torch.load(weights_only=True)`` refuses a pickle that imports anything outside its allowlist and
says so in words that change between torch versions; these helpers name the refused globals from the
file itself (``posix.system``, ``collections.UserDict``, ...) so the message does not depend on them.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import torch

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME", "PROTO"}


def _globals_of(stream) -> list[str]:
    """``module.name`` of every global one pickle in ``stream`` imports, read from its opcodes (nothing runs)."""
    import _compat_pickle
    import pickletools

    names: list[str] = []
    pushed: list[Optional[str]] = []  # values pushed so far, None where not a string
    memo: dict[int, Optional[str]] = {}
    proto = 0
    for op, arg, _ in pickletools.genops(stream):
        n = op.name
        if n == "PROTO":
            proto = int(arg)
        if n in ("GLOBAL", "INST"):
            module, name = str(arg).split(" ", 1)
            if proto < 3:  # what pickle's fix_imports does for Python 2 names
                module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            names.append(f"{module}.{name}")
        elif n == "STACK_GLOBAL":
            module, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            names.append(f"{module}.{name}" if module and name else "(unnamed)")
        if n in _STRING_OPS:
            pushed.append(str(arg))
        elif n in _GET_OPS:
            pushed.append(memo.get(int(arg)))
        elif n in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif n == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif n not in _MEMO_OPS:
            pushed.append(None)
    return names


def pickle_globals(path: str | os.PathLike) -> Optional[list[str]]:
    """The globals a pickled file would import (``posix.system``, ``collections.UserDict``, ...), read
    without unpickling: the ``data.pkl`` of a torch zip archive, else the leading pickles of a legacy
    torch file or a raw pickle. None when the bytes are not a pickle."""
    import io

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((m for m in z.namelist() if m == "data.pkl" or m.endswith("/data.pkl")), None)
                return None if member is None else _globals_of(io.BytesIO(z.read(member)))
        names: list[str] = []
        with open(path, "rb") as f:
            for i in range(5):  # legacy torch.save: magic number, protocol, system info, the object, storage keys
                try:
                    names += _globals_of(f)
                except Exception:  # noqa: BLE001 - not (or no longer) a pickle
                    return None if i == 0 else names
                if not f.peek(1):
                    break
        return names
    except (OSError, zipfile.BadZipFile):
        return None


def is_legacy_torch_file(path: Path) -> bool:
    """A non-zip file from ``torch.save`` (``_use_new_zipfile_serialization=False``): it starts with torch's magic number."""
    import pickletools

    try:
        with open(path, "rb") as f:
            values = [arg for op, arg, _ in pickletools.genops(f) if op.name.startswith("LONG") or op.name.startswith("BININT")]
    except Exception:  # noqa: BLE001
        return False
    return values[:1] == [torch.serialization.MAGIC_NUMBER]


def weights_only_allowed() -> set[str]:
    """The globals torch's weights-only unpickler accepts (built in, plus any the user allowlisted)."""
    try:
        from torch import _weights_only_unpickler as wu

        return set(wu._get_allowed_globals()) | set(wu._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - a torch without these helpers: name every global as possibly unsafe
        return set()


__all__ = ["pickle_globals", "is_legacy_torch_file", "weights_only_allowed"]
