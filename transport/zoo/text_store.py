"""The text zoo's store: where a built text zoo is, what it holds, and where each model's directory is.

The text zoo (tiny Llama-style decoders pretrained on the interpreter's standard library, see
:mod:`transport.zoo.text_build`) keeps every model as a Hugging Face ``save_pretrained`` directory with its
tokenizer; ``zoo:text/NAME[@SEED]`` references load them through :func:`transport.sources.load_model`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transport.cache import cache_root
from transport.core.arch import Arch
from transport.core.symmetry import Perms, unflatten
from transport.errors import TransportError
from transport.zoo.store import read_manifest
from transport.files import read_safetensors

TEXT_ZOO_FORMAT = 2
PREFIX = "zoo:text/"
DEFAULT_TEXT_TASKS = ("codeprose", "brackets", "sorted")


@dataclass(frozen=True)
class TextPair:
    """A (source, target) pair of graded difficulty with the outcome one should honestly expect."""

    key: str
    source: str
    target: str
    title: str
    expected: str


TEXT_PAIRS = (
    TextPair("control", "A", "B_control", "Control: A with its units and heads shuffled (GQA groups intact)",
             "Naive addition stays near zero-shot; undoing the shuffle reproduces A's fine-tune exactly."),
    TextPair("next", "A", "B_next", "Next release: forked from A's run, trained on, shuffled",
             "Naive addition stays near zero-shot; undoing the hidden shuffle recovers most of the gain."),
    TextPair("indep", "A", "B_indep", "Independent release: unrelated seed",
             "Nothing lines up; expect little from any transfer."),
    TextPair("wide_grown", "A", "W_grown", "Wider release grown from A (2x width, 2x heads)",
             "Shapes differ; the known widening map carries tau across."),
    TextPair("wide_indep", "A", "W_indep", "Independent wider model (2x width)",
             "The hard case: shapes differ and nothing is shared."),
    TextPair("deep_grown", "A", "D_grown", "Deeper release grown from A (identity blocks inserted)",
             "Depths differ; the known depth map (A's blocks where they went) carries tau across."),
    TextPair("vocab", "A", "V_vocab", "Release with an extended vocabulary, trained on from A, shuffled",
             "Vocabularies differ: rows move by token identity, then the units must still be aligned."),
)


def pairs() -> list[TextPair]:
    return list(TEXT_PAIRS)


def text_zoo_root() -> Path:
    """``$TRANSPORT_TEXT_ZOO_DIR``, else the ``text_zoo`` folder of the cache root (outside the git tree)."""
    env = os.environ.get("TRANSPORT_TEXT_ZOO_DIR")
    return Path(env) if env else cache_root() / "text_zoo"


def _root(root: Optional[str | os.PathLike]) -> Path:
    return Path(root) if root is not None else text_zoo_root()


def _manifest(root: Optional[str | os.PathLike]) -> tuple[Path, dict]:
    r = _root(root)
    m = read_manifest(r)
    if m is None:
        raise TransportError(f"the text zoo is not built at {r}; run `python -m transport.zoo.text_build`")
    return r, m


def is_built(root: Optional[str | os.PathLike] = None) -> bool:
    m = read_manifest(_root(root))
    return m is not None and m.get("format") == TEXT_ZOO_FORMAT


def _resolve(name: str, m: dict) -> dict:
    base, _, seed_s = name.partition("@")
    seed = m["seeds"][0]
    if seed_s:
        try:
            seed = int(seed_s)
        except ValueError:
            raise TransportError(f"text zoo model '{name}': seed '{seed_s}' is not an integer") from None
        if seed not in m["seeds"]:
            raise TransportError(f"text zoo model '{name}': no seed {seed} (seeds: {', '.join(map(str, m['seeds']))})")
    for e in m["models"]:
        if e["name"] == base and e["seed"] == seed:
            return e
    names = [e["name"] for e in m["models"] if e["seed"] == seed and "+" not in e["name"]]
    raise TransportError(f"text zoo has no model '{name}' (known: {', '.join(names)}; NAME+TASK for fine-tunes, "
                         f"tasks {', '.join(m['tasks'])}; add @SEED for seeds {', '.join(map(str, m['seeds']))})")


def locate(name: str, root: Optional[str | os.PathLike] = None) -> tuple[Path, str]:
    """A text zoo model's directory and its canonical reference ``zoo:text/NAME@SEED`` (no weights read)."""
    r, m = _manifest(root)
    e = _resolve(name, m)
    return r / e["dir"], f"{PREFIX}{e['name']}@{e['seed']}"


def arch_of(name: str, root: Optional[str | os.PathLike] = None) -> Arch:
    _, m = _manifest(root)
    return Arch.from_json(m["archs"][_resolve(name, m)["arch"]])


def list_models(root: Optional[str | os.PathLike] = None) -> list[dict]:
    return list(_manifest(root)[1]["models"])


def seeds(root: Optional[str | os.PathLike] = None) -> list[int]:
    return list(_manifest(root)[1]["seeds"])


def tasks(root: Optional[str | os.PathLike] = None) -> list[str]:
    m = read_manifest(_root(root))
    return list(m["tasks"]) if m is not None else list(DEFAULT_TEXT_TASKS)


def task_file(task: str, root: Optional[str | os.PathLike] = None) -> Path:
    """The JSON Lines file of a downstream task (``transport run --data FILE``)."""
    r, m = _manifest(root)
    if task not in m["task_files"]:
        raise TransportError(f"text zoo has no task '{task}' (tasks: {', '.join(m['tasks'])})")
    return r / m["task_files"][task]["file"]


def true_permutation(name: str, root: Optional[str | os.PathLike] = None) -> Perms:
    """The hidden shuffle of a shuffled release (new = old[p] on every space)."""
    r, m = _manifest(root)
    e = _resolve(name, m)
    if not e.get("perm_file"):
        raise TransportError(f"text zoo model '{name}' was not made by a shuffle")
    arch = Arch.from_json(m["archs"][e["arch"]])
    return unflatten(read_safetensors(r / e["perm_file"])[0], arch)


def phenomenon_table(root: Optional[str | os.PathLike] = None) -> list[dict]:
    return list(_manifest(root)[1]["table"])


def build_info(root: Optional[str | os.PathLike] = None) -> dict:
    _, m = _manifest(root)
    return {k: v for k, v in m.items() if k not in ("models", "table")}


__all__ = ["TextPair", "TEXT_PAIRS", "TEXT_ZOO_FORMAT", "PREFIX", "pairs", "text_zoo_root", "is_built", "locate",
           "arch_of", "list_models", "seeds", "tasks", "task_file", "true_permutation", "phenomenon_table",
           "build_info"]
