"""The text zoo's downstream tasks: label-word classification files drawn from the standard library and from
synthetic strings, deterministic from a seed.

- ``codeprose``: a line of Python code or a line of English reference prose (``pydoc_data/topics.py``):
  label words ``code`` / ``prose``;
- ``brackets``: a string of two to four pairs of ``()[]{}``: balanced or not (a balanced string with ONE
  bracket turned around: made opening or closing, or of another kind), ``yes`` / ``no``;
- ``sorted``: four to seven distinct letters or digits separated by spaces: in character order or not (the
  same characters in a random other order), ``yes`` / ``no``.

Each task is written as a JSON Lines file (``text``, ``label``) and read back with
:func:`transport.text.load_text_file` (the seeded 60 / 15 / 25 % split per label, seed 0, the default
template ``"{text}\\nLabel: {label}"``), exactly as ``transport run --data FILE`` reads it, so the zoo's
fine-tunes, its table and the command line see the same splits. Texts are distinct within a task.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

import numpy as np

from transport.errors import TransportError
from transport.files import write_atomic
from transport.zoo.text_corpus import Stdlib, brackets_balanced

TEXT_TASKS = ("codeprose", "brackets", "sorted")
BRACKET_PAIRS = (2, 4)  # bracket pairs per string, inclusive
SORT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"  # in character order: digits before letters
SORT_LENGTH = (4, 7)  # characters per string, inclusive
LINE_CHARS = (16, 72)


def _docstring_lines(text: str) -> set[int]:
    """1-based line numbers inside string-constant statements (docstrings) of a module's source."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set(range(1, text.count("\n") + 2))
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            out.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return out


def code_lines(lib: Stdlib, rng: np.random.Generator, files: int = 60) -> list[str]:
    """Stripped lines of code (no comments, no docstrings) from ``files`` randomly chosen stdlib modules."""
    pool = [t for p, t in lib.files if not p.startswith("pydoc_data/")]
    out = []
    for i in sorted(rng.choice(len(pool), size=min(files, len(pool)), replace=False).tolist()):
        skip = _docstring_lines(pool[i])
        for n, line in enumerate(pool[i].splitlines(), start=1):
            s = line.strip()
            if n in skip or s.startswith("#") or not LINE_CHARS[0] <= len(s) <= LINE_CHARS[1]:
                continue
            out.append(s)
    return out


def prose_lines(lib: Stdlib) -> list[str]:
    """Stripped lines of English prose from the reference topics (``pydoc_data/topics.py``)."""
    text = dict(lib.files).get("pydoc_data/topics.py")
    if text is None:
        raise TransportError(f"{lib.root}: no pydoc_data/topics.py (the prose of the codeprose task)")
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 200:
            for line in node.value.splitlines():
                s = line.strip()
                letters = sum(c.isalpha() or c in " ,.'" for c in s)
                if LINE_CHARS[0] + 8 <= len(s) <= LINE_CHARS[1] and s.count(" ") >= 4 and letters >= 0.9 * len(s):
                    out.append(s)
    return out


def _distinct(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _draw(items: list[str], n: int, rng: np.random.Generator, what: str) -> list[str]:
    items = _distinct(items)
    if len(items) < n:
        raise TransportError(f"text zoo task {what}: only {len(items)} distinct texts for {n}")
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False).tolist())]


def codeprose_rows(lib: Stdlib, rng: np.random.Generator, per_class: int) -> list[dict]:
    prose = set(prose_lines(lib))
    code = [s for s in code_lines(lib, rng) if s not in prose]
    rows = [{"text": t, "label": "code"} for t in _draw(code, per_class, rng, "codeprose")]
    rows += [{"text": t, "label": "prose"} for t in _draw(sorted(prose), per_class, rng, "codeprose")]
    return rows


def _unbalance(s: str, rng: np.random.Generator) -> str:
    """A near miss of a balanced string: ONE bracket turned around (made opening or closing, or of another kind),
    which always unbalances it."""
    chars = list(s)
    i = int(rng.integers(len(chars)))
    chars[i] = str(rng.choice([c for c in "()[]{}" if c != chars[i]]))
    t = "".join(chars)
    if is_balanced(t):  # pragma: no cover - one changed bracket never balances
        raise TransportError("text zoo task brackets: could not unbalance a string")
    return t


def is_balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in "([{":
            stack.append(")]}"["([{".index(c)])
        elif not stack or stack.pop() != c:
            return False
    return not stack


def brackets_rows(rng: np.random.Generator, per_class: int) -> list[dict]:
    yes: dict[str, None] = {}
    no: dict[str, None] = {}
    while len(yes) < per_class or len(no) < per_class:
        s = brackets_balanced(rng, int(rng.integers(BRACKET_PAIRS[0], BRACKET_PAIRS[1] + 1)))
        if len(yes) < per_class:
            yes[s] = None
        elif len(no) < per_class:
            no[_unbalance(s, rng)] = None
    return [{"text": t, "label": "yes"} for t in yes] + [{"text": t, "label": "no"} for t in no]


def sorted_rows(rng: np.random.Generator, per_class: int) -> list[dict]:
    """Distinct letters or digits separated by spaces (``"2 7 c k"``): in character order or not, ``yes`` /
    ``no``. An unsorted string is a sorted draw put in a random other order."""
    yes: dict[str, None] = {}
    no: dict[str, None] = {}
    while len(yes) < per_class or len(no) < per_class:
        n = int(rng.integers(SORT_LENGTH[0], SORT_LENGTH[1] + 1))
        xs = sorted(rng.choice(list(SORT_ALPHABET), size=n, replace=False).tolist())
        if len(yes) < per_class:
            yes[" ".join(xs)] = None
            continue
        ys = xs
        while ys == xs:
            ys = [str(c) for c in rng.permutation(xs)]
        no[" ".join(ys)] = None
    return [{"text": t, "label": "yes"} for t in yes] + [{"text": t, "label": "no"} for t in no]


def is_sorted(s: str) -> bool:
    xs = s.split()
    return all(a < b for a, b in zip(xs, xs[1:]))


_MAKERS: dict[str, Callable[[Stdlib, np.random.Generator, int], list[dict]]] = {
    "codeprose": codeprose_rows,
    "brackets": lambda lib, rng, n: brackets_rows(rng, n),
    "sorted": lambda lib, rng, n: sorted_rows(rng, n),
}


def task_rows(name: str, lib: Stdlib, seed: int, per_class: int) -> list[dict]:
    """The rows of one task (deterministic from the stdlib and ``seed``)."""
    if name not in _MAKERS:
        raise TransportError(f"unknown text zoo task '{name}' (known: {', '.join(TEXT_TASKS)})")
    import zlib

    rng = np.random.default_rng(zlib.crc32(f"{seed}:task:{name}".encode()))
    return _MAKERS[name](lib, rng, per_class)


def write_task(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    return write_atomic(path, data)


__all__ = ["TEXT_TASKS", "task_rows", "write_task", "is_balanced", "is_sorted", "code_lines", "prose_lines"]
