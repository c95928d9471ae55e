"""Reading a text data file: JSON Lines (``.jsonl``, one object per line) or CSV (``.csv``, a header row).

Both hold a ``text`` column and optionally a ``label`` column. Labels are strings (JSON integers are read
as their decimal string), stripped of surrounding whitespace; when the column exists every row needs one.
Every problem is one :class:`~transport.errors.TransportError` line naming the file (and the line or row).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transport.errors import TransportError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass
class TextTable:
    """The rows of a data file: texts, labels (None without a label column) and where each row sits."""

    texts: list[str]
    labels: Optional[list[str]]
    rows: list[int]  # line number (JSONL) or data row number (CSV) of each entry, 1-based
    rowname: str  # 'line' or 'row'


def is_text_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TransportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TransportError(f"{path}: is a directory, not a data file") from None
    except OSError as e:
        raise TransportError(f"{path}: cannot read the file ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TransportError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _label(value: Any, path: Path, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TransportError(f"{path}: {where}: the label must be a string, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not text:
        raise TransportError(f"{path}: {where} has an empty label")
    return text


def _text(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise TransportError(f"{path}: {where}: the text must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TransportError(f"{path}: {where} has an empty text")
    return value


def _jsonl(path: Path, content: str) -> TextTable:
    texts, labels, rows = [], [], []
    labelled: Optional[bool] = None
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TransportError(f"{path}: line {n} is not JSON ({str(e).split(':')[0]})") from None
        if not isinstance(obj, dict):
            raise TransportError(f"{path}: line {n} is not a JSON object (expected {{\"text\": ...}})")
        if "text" not in obj:
            raise TransportError(f"{path}: line {n} has no 'text' field (fields: {', '.join(map(str, obj)) or 'none'})")
        has = obj.get("label") is not None
        if labelled is None:
            labelled = has
        elif has != labelled:
            raise TransportError(f"{path}: line {n} {'has' if has else 'has no'} label, unlike line {rows[0]} "
                                 "(label every row, or none)")
        texts.append(_text(obj["text"], path, f"line {n}"))
        if has:
            labels.append(_label(obj["label"], path, f"line {n}"))
        rows.append(n)
    if not texts:
        raise TransportError(f"{path}: no rows (expected one JSON object per line with a 'text' field)")
    return TextTable(texts, labels if labelled else None, rows, "line")


def _csv(path: Path, content: str) -> TextTable:
    try:
        reader = csv.reader(io.StringIO(content, newline=""))
        header = next(reader, None)
        if header is None:
            raise TransportError(f"{path}: empty file (expected a header row with a 'text' column)")
        names = [h.strip() for h in header]
        if "text" not in names:
            raise TransportError(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'})")
        it, il = names.index("text"), names.index("label") if "label" in names else None
        texts, labels, rows = [], [], []
        for n, row in enumerate(reader, start=1):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(names):
                raise TransportError(f"{path}: row {n} has {len(row)} fields, the header {len(names)}")
            texts.append(_text(row[it], path, f"row {n}"))
            if il is not None:
                labels.append(_label(row[il], path, f"row {n}"))
            rows.append(n)
    except csv.Error as e:
        raise TransportError(f"{path}: not a readable CSV file ({e})") from None
    if not texts:
        raise TransportError(f"{path}: no rows below the header")
    return TextTable(texts, labels if il is not None else None, rows, "row")


def read_text_file(path: str | Path) -> TextTable:
    """The rows of a ``.jsonl`` or ``.csv`` data file (see the module docstring)."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TransportError(f"{path}: unknown data file type '{path.suffix}' (texts: .jsonl or .csv with a "
                             "'text' column; images: a folder)")
    content = _read(path)
    return _jsonl(path, content) if kind == "jsonl" else _csv(path, content)


__all__ = ["TextTable", "read_text_file", "is_text_file", "SUFFIXES"]
