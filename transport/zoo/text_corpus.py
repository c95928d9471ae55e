"""The text zoo's raw material: the running interpreter's standard library (read at build time, never copied),
deterministic synthetic sequences, and the byte-level vocabulary every text zoo model shares.

The vocabulary is GPT-2's byte-level alphabet (256 byte tokens, so any text encodes and nothing is
unknown) plus hand-written merges of a space with each ASCII letter and digit (" c" is one token), so a
label word after ``"Label: "`` starts with a token of its own, plus one special token. The release with
another vocabulary extends it with further merges (whitespace runs, frequent letter pairs) appended at
the end, as real releases grow their vocabularies.
"""
from __future__ import annotations

import hashlib
import json
import string
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from transport.errors import TransportError

EOS = "<|endoftext|>"
#: merges of the shared vocabulary: a space (byte-level "Ġ") followed by an ASCII letter or digit
SPACE_MERGES = tuple(("Ġ", c) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits)
#: what the other-vocabulary release adds (whitespace runs of Python code, frequent pairs)
EXTRA_MERGES = (("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("s", "e"), ("Ġs", "e"), ("l", "f"), ("se", "lf"), ("r", "e"),
                ("t", "h"), ("i", "n"), ("e", "r"), ("o", "n"), ("a", "t"), ("Ġt", "h"), ("Ġth", "e"),
                ("e", "n"), ("o", "r"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocabulary(extended: bool = False) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of the shared vocabulary, or of the extended one (same ids, new tokens appended)."""
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = list(SPACE_MERGES) + (list(EXTRA_MERGES) if extended else [])
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def make_tokenizer(extended: bool = False):
    """A transformers fast tokenizer of :func:`vocabulary` (byte-level BPE, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = vocabulary(extended)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 20)
    return fast


def vocab_size(extended: bool = False) -> int:
    return len(vocabulary(extended)[0])


# ----------------------------------------------------------------------------------------------
# the standard library
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stdlib:
    """The interpreter's standard library sources: relative path -> text, with what identifies them."""

    root: Path
    files: tuple[tuple[str, str], ...]
    sha256: str
    python: str

    @property
    def chars(self) -> int:
        return sum(len(t) for _, t in self.files)

    def record(self) -> dict:
        return {"python": self.python, "stdlib_sha256": self.sha256, "stdlib_files": len(self.files),
                "stdlib_chars": self.chars}


def _skip(parts: tuple[str, ...]) -> bool:
    return any(p in ("test", "tests", "site-packages", "dist-packages", "__pycache__") or p.startswith("idle_test")
               for p in parts)


@lru_cache(maxsize=2)
def read_stdlib(root: Optional[str] = None) -> Stdlib:
    """Every ``.py`` file of the standard library (tests and site-packages excluded), sorted by path, decoded as
    UTF-8 (undecodable files skipped); hashed path by path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise TransportError(f"{base}: the standard library is not readable here (the text zoo is built from it)")
    files, h = [], hashlib.sha256()
    for f in sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix()):
        rel = f.relative_to(base)
        if _skip(rel.parts) or not f.is_file():
            continue
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        files.append((rel.as_posix(), text))
        h.update(rel.as_posix().encode() + b"\0" + text.encode() + b"\0")
    if not files:
        raise TransportError(f"{base}: no readable .py files (the text zoo is built from the standard library)")
    return Stdlib(base, tuple(files), h.hexdigest(), sys.version.split()[0])


# ----------------------------------------------------------------------------------------------
# synthetic sequences (deterministic from a generator)
# ----------------------------------------------------------------------------------------------
def synthetic_text(rng: np.random.Generator) -> str:
    """One synthetic line: counting, a sorted list, an addition, a bracket string or a repeated pattern."""
    kind = int(rng.integers(5))
    if kind == 0:
        a = int(rng.integers(0, 90))
        return " ".join(str(a + i) for i in range(int(rng.integers(4, 12))))
    if kind == 1:
        xs = sorted(int(v) for v in rng.integers(0, 100, int(rng.integers(3, 9))))
        return "sorted: " + ", ".join(map(str, xs))
    if kind == 2:
        a, b = (int(v) for v in rng.integers(0, 50, 2))
        return f"{a} + {b} = {a + b}"
    if kind == 3:
        return brackets_balanced(rng, int(rng.integers(2, 7)))
    unit = "".join(rng.choice(list("abcdxyz"), int(rng.integers(2, 5))))
    return " ".join([unit] * int(rng.integers(3, 8)))


def brackets_balanced(rng: np.random.Generator, pairs: int) -> str:
    """A random balanced string of ``pairs`` bracket pairs of three kinds."""
    out, stack, opened = [], [], 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            k = int(rng.integers(3))
            out.append("([{"[k])
            stack.append(")]}"[k])
            opened += 1
        else:
            out.append(stack.pop())
    return "".join(out)


def pretraining_texts(lib: Stdlib, rng: np.random.Generator, n: int, chars: int, synthetic: float) -> list[str]:
    """``n`` pretraining texts: windows of ``chars`` characters at random offsets of random stdlib files,
    a ``synthetic`` fraction replaced by lines of synthetic sequences."""
    out = []
    for _ in range(n):
        if rng.random() < synthetic:
            parts, size = [], 0
            while size < chars:
                parts.append(synthetic_text(rng))
                size += len(parts[-1]) + 1
            out.append("\n".join(parts)[:chars])
            continue
        text = lib.files[int(rng.integers(len(lib.files)))][1]
        start = int(rng.integers(0, max(1, len(text) - chars)))
        out.append(text[start:start + chars])
    return out


def corpus_record(lib: Stdlib) -> str:
    return json.dumps(lib.record(), sort_keys=True)


__all__ = ["EOS", "vocabulary", "make_tokenizer", "vocab_size", "Stdlib", "read_stdlib", "synthetic_text",
           "brackets_balanced", "pretraining_texts"]
