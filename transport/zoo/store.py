"""The demo zoo's store: where a built zoo is, what it holds, and where each model's file is.

The zoo itself (tiny open_clip ViTs trained offline on scikit-learn digits) is built by
:mod:`transport.zoo.builder` (``python -m transport zoo build``); models load through
:func:`transport.sources.load_model` with ``zoo:NAME[@SEED]`` references.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transport.cache import cache_root
from transport.core.arch import Arch
from transport.core.symmetry import Perms
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import read_safetensors
from transport.zoo.shuffle import shuffle_from_tensors, widening_map

ZOO_FORMAT = 3  # 2: one within-head shuffle for Q/K/V/O in the shuffled releases; 3: W_grown shuffled too
MANIFEST = "manifest.json"
DEFAULT_TASKS = ("rot90", "invert", "hflip")


# ----------------------------------------------------------------------------------------------
# public records
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo. ``ref`` (``NAME@SEED``) is what :func:`load` takes."""

    name: str  # e.g. 'A', 'B_next+rot90'
    kind: str  # 'pretrained' | 'finetuned'
    seed: int
    task: Optional[str]
    arch: str  # architecture name, e.g. 'zoo:vit-w64-l3-h4'
    description: str
    base: Optional[str] = None  # the pretrained model a fine-tune started from

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.seed}"


@dataclass(frozen=True)
class ZooPair:
    """A (source, target) pair of graded difficulty with the outcome one should honestly expect."""

    key: str  # 'control' | 'next' | 'indep' | 'wide_grown' | 'wide_indep'
    source: str
    target: str
    title: str
    expected: str


_PAIRS = (
    ZooPair("control", "A", "B_control", "Control: A with its units shuffled",
            "Naive addition stays at zero-shot level (the unshuffled tau is noise to B), while undoing the "
            "shuffle reproduces A's fine-tune exactly."),
    ZooPair("next", "A", "B_next", "Next release: forked from A's run, trained on, shuffled",
            "Naive addition stays at zero-shot level; undoing the hidden shuffle recovers most but not all of "
            "the oracle's gain (B drifted from A after the fork), so that is what a good alignment can reach."),
    ZooPair("indep", "A", "B_indep", "Independent release: unrelated seed",
            "Naive addition stays near zero-shot and no permutation lines up unrelated seeds, so alignment "
            "gains little; the pair for debugging a failed transfer and for methods that use labelled shots."),
    ZooPair("wide_grown", "A", "W_grown", "Wider release grown from A (2x width)",
            "Shapes differ: plain addition is impossible and zero-padding tau means nothing to the shuffled "
            "units; the known widening map carries tau across and recovers most of the gain, which is what a "
            "cross-width method can aim for."),
    ZooPair("wide_indep", "A", "W_indep", "Independent wider model (2x width)",
            "The hard case: shapes differ and nothing is shared, so expect little from a transfer that "
            "does not look at data."),
)


def pairs() -> list[ZooPair]:
    """The graded (source, target) pairs, easiest first."""
    return list(_PAIRS)


# ----------------------------------------------------------------------------------------------
# locations
# ----------------------------------------------------------------------------------------------
def zoo_root() -> Path:
    """``$TRANSPORT_ZOO_DIR``, else the ``zoo`` folder of the cache root (outside the git tree)."""
    env = os.environ.get("TRANSPORT_ZOO_DIR")
    if env:
        return Path(env)
    return cache_root() / "zoo"


def _root(root: Optional[str | os.PathLike]) -> Path:
    return Path(root) if root is not None else zoo_root()


def _file(root: Path, name: str, seed: int) -> Path:
    return root / f"seed{seed}" / f"{name}.safetensors"


def _perm_file(root: Path, name: str, seed: int) -> Path:
    return root / f"seed{seed}" / f"{name}.perm.safetensors"


def read_manifest(root: Path) -> Optional[dict]:
    """The manifest a zoo build wrote last at ``root`` (None when absent or unreadable)."""
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _manifest(root: Optional[str | os.PathLike]) -> tuple[Path, dict]:
    r = _root(root)
    m = read_manifest(r)
    if m is None:
        raise TransportError(f"the demo zoo is not built at {r}; run `python -m transport zoo build`")
    return r, m


def is_built(root: Optional[str | os.PathLike] = None) -> bool:
    """True when a complete zoo (its manifest, written last) is at ``root``."""
    return read_manifest(_root(root)) is not None


# ----------------------------------------------------------------------------------------------
# reading a built zoo
# ----------------------------------------------------------------------------------------------
def list_models(root: Optional[str | os.PathLike] = None) -> list[ZooEntry]:
    """Every model of a built zoo, seed by seed."""
    _, m = _manifest(root)
    return [ZooEntry(**e["entry"]) for e in m["models"]]


def seeds(root: Optional[str | os.PathLike] = None) -> list[int]:
    """The seeds of a built zoo (the first one is the default)."""
    return list(_manifest(root)[1]["seeds"])


def tasks(root: Optional[str | os.PathLike] = None) -> list[str]:
    """The downstream tasks: those of the built zoo at ``root``, else those of the full zoo."""
    m = read_manifest(_root(root))
    return list(m["tasks"]) if m is not None else list(DEFAULT_TASKS)


def _resolve(name: str, m: dict) -> dict:
    base, _, seed_s = name.partition("@")
    if seed_s:
        try:
            seed = int(seed_s)
        except ValueError:
            raise TransportError(f"zoo model '{name}': seed '{seed_s}' is not an integer") from None
        if seed not in m["seeds"]:
            raise TransportError(f"zoo model '{name}': no seed {seed} (seeds: {', '.join(map(str, m['seeds']))})")
    else:
        seed = m["seeds"][0]
    for e in m["models"]:
        if e["entry"]["name"] == base and e["entry"]["seed"] == seed:
            return e
    names = list(dict.fromkeys(e["entry"]["name"] for e in m["models"]))
    show = [n for n in names if "+" not in n] + [n for n in names if "+" in n][:2]
    raise TransportError(f"zoo has no model '{name}' (known: {', '.join(show)}, ... ; "
                         f"NAME+TASK for fine-tunes, tasks {', '.join(m['tasks'])}; add @SEED for seeds "
                         f"{', '.join(map(str, m['seeds']))})")


def locate(name: str, root: Optional[str | os.PathLike] = None) -> tuple[Path, Arch, str]:
    """Where a zoo model (``A``, ``A+rot90``, ``B_next+invert``, ``W_grown@1``...) is: its file, architecture
    and canonical reference ``zoo:NAME@SEED`` (no weights read)."""
    r, m = _manifest(root)
    e = _resolve(name, m)
    return r / e["file"], Arch.from_json(m["archs"][e["entry"]["arch"]]), f"zoo:{e['entry']['name']}@{e['entry']['seed']}"


def arch_of(name: str, root: Optional[str | os.PathLike] = None) -> Arch:
    """The architecture of a zoo model (no weights read)."""
    _, m = _manifest(root)
    return Arch.from_json(m["archs"][_resolve(name, m)["entry"]["arch"]])


def true_permutation(name: str, root: Optional[str | os.PathLike] = None) -> Perms:
    """The hidden shuffle that made ``B_control`` / ``B_next`` / ``W_grown`` from the unshuffled weights
    (new = old[p] on every space, as :func:`transport.core.symmetry.apply_permutation` takes it)."""
    r, m = _manifest(root)
    e = _resolve(name, m)
    if not e.get("perm_file"):
        raise TransportError(f"zoo model '{name}' was not made by a shuffle (only B_control, B_next and W_grown are)")
    arch = Arch.from_json(m["archs"][e["entry"]["arch"]])
    return shuffle_from_tensors(read_safetensors(r / e["perm_file"])[0], arch)


def phenomenon_table(root: Optional[str | os.PathLike] = None) -> list[dict]:
    """Per pair, task and seed: zero-shot target, naive (alpha on val), source fine-tuned, oracle, and more."""
    return list(_manifest(root)[1]["table"])


def build_info(root: Optional[str | os.PathLike] = None) -> dict:
    """The stored build summary (variant, seeds, seconds, per-model seconds, pretraining accuracies)."""
    _, m = _manifest(root)
    return {k: v for k, v in m.items() if k not in ("models", "table")}


def grown_task_vector(tau: TaskVector, name: str = "W_grown", root: Optional[str | os.PathLike] = None) -> TaskVector:
    """A task vector of A mapped onto ``W_grown[@SEED]`` by the known widening map (a reference for Theseus)."""
    wide = arch_of(name, root)
    return TaskVector(wide, widening_map(tau.tensors, tau.arch, wide, true_permutation(name, root)))


__all__ = ["ZooEntry", "ZooPair", "ZOO_FORMAT", "MANIFEST", "read_manifest", "pairs", "zoo_root", "is_built", "list_models", "seeds",
           "tasks", "locate", "arch_of", "true_permutation", "phenomenon_table", "build_info", "grown_task_vector"]
