"""An output directory a run may write, written atomically: ``--out`` checks (inputs, the working
directory, ``--force`` only over what this tool wrote, writability before the work) and the
temp-dir-then-rename writer."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from transport.errors import TransportError

#: ``report.json``'s ``format``: how ``--force`` recognises an output directory this tool wrote
RUN_FORMAT = "transport.run"
RUN_FILES = ("report.json", "task_vector.safetensors")


def check_out_dir(out: Path, force: bool, inputs: Optional[dict[str, Path]] = None) -> None:
    """Refuse an ``--out`` that would lose data: one equal to or containing an input or the working
    directory, a non-empty one without ``--force``, and with ``--force`` one this tool did not write
    (its ``report.json`` says ``format: transport.run`` and it holds nothing else the tool writes)."""
    if out.exists() and not out.is_dir():
        raise TransportError(f"{out}: exists and is not a directory")
    target = out.resolve()
    for label, path in {**(inputs or {}), "the working directory": Path.cwd()}.items():
        p = path.resolve()
        if target == p or target in p.parents:
            what = label if label == "the working directory" else (
                f"{label} {path}" if label.startswith("the ") else f"the input {label} {path}")
            raise TransportError(f"--out {out}: {'is' if target == p else 'contains'} {what}; "
                                 "choose another output directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise TransportError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    if not _written_by_us(out):
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        raise TransportError(f"{out}: --force replaces only an output directory this tool wrote (with its "
                             f"report.json); this one is not (it holds {shown})")
    foreign = [n for n in names if n not in RUN_FILES]
    if foreign:
        raise TransportError(f"{out}: --force would delete files this tool did not write: {', '.join(foreign[:4])}"
                             + (f" (+{len(foreign) - 4} more)" if len(foreign) > 4 else "") + "; move them first")


def _written_by_us(out: Path) -> bool:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    legacy = report.get("command", [])[:3] == ["python", "-m", "transport"] and "transport_version" in report
    return report.get("format") == RUN_FORMAT or legacy


def check_writable(out: Path) -> None:
    """Fail now, not after the computation, when ``--out`` cannot be created (read-only, not a directory)."""
    a = out.absolute().parent
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise TransportError(f"--out {out}: {a} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".transport-probe-", dir=a))
    except OSError as e:
        raise TransportError(f"--out {out}: cannot write in {a} ({e.strerror or type(e).__name__})") from None


def write_atomically(out: Path, force: bool, writer: Callable[[Path], None],
                     inputs: Optional[dict[str, Path]] = None) -> None:
    """Fill a temp dir next to ``out`` with ``writer``, then rename it into place (no partial ``out`` ever)."""
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise TransportError(f"--out {out}: cannot write in {out.parent} ({e.strerror or type(e).__name__})") from None
    old: Optional[Path] = None
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the directory private; results are ordinary files
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        check_out_dir(out, force, inputs)  # it may have appeared while we were computing
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the previous results back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["RUN_FORMAT", "RUN_FILES", "check_out_dir", "check_writable", "write_atomically"]
