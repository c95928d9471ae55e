"""The built-in demo zoo: tiny open_clip ViTs trained offline on scikit-learn digits.

Per seed it holds a source ``A`` pretrained on upright digits (tower + a linear head), ``A``
fine-tuned on each downstream task (the task vectors; head frozen, like CLIP's text head), and
targets of graded difficulty, each with its own oracle fine-tunes:

- ``B_control``: A with its units shuffled by a random permutation (the same function, exactly);
- ``B_next``: forked from A's run after its early steps, trained on with other augmentation and
  seed, then shuffled; ``B_next_unshuffled`` keeps the weights before the shuffle;
- ``B_indep``: pretrained from an unrelated seed;
- ``W_grown``: 2x wider, grown from A by a function-preserving widening, trained on, then shuffled;
- ``W_indep``: 2x wider, pretrained from an unrelated seed.

``python -m transport.zoo build`` (or ``python -m transport zoo build``) trains it deterministically,
measures the phenomenon (naive theta_B + alpha * tau against fine-tuning B) and writes
``manifest.json`` last. Models load with :func:`load` (``zoo:NAME[@SEED]`` references).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from transport.arch import ViTArch, param_axes, tiny_arch
from transport.errors import TransportError
from transport.model import Model
from transport.train import Augment, TrainConfig, TrainResult, finetune, init_head, init_params, train

Tensor = torch.Tensor

ZOO_FORMAT = 3  # 2: one within-head shuffle for Q/K/V/O in the shuffled releases; 3: W_grown shuffled too
MANIFEST = "manifest.json"
PRETRAIN_TASK = "digits"
PRETRAINED = ("A", "B_control", "B_next", "B_next_unshuffled", "B_indep", "W_grown", "W_indep")


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
# configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo build (its JSON is the build's fingerprint)."""

    variant: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    width: int = 64
    layers: int = 3
    heads: int = 4
    output_dim: int = 32
    pretrain: TrainConfig = TrainConfig(steps=400, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    fork_step: int = 40  # B_next shares A's initialisation and its first fork_step steps
    next_train: TrainConfig = TrainConfig(steps=360, batch_size=128, lr=2e-3,
                                          augment=Augment(shift=1, noise=0.1, cutout=3))
    grow_noise: float = 0.1  # std of the symmetry-breaking noise added after widening, relative to each tensor's
    grow_train: TrainConfig = TrainConfig(steps=150, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    wide_pretrain: TrainConfig = TrainConfig(steps=300, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    finetune: TrainConfig = TrainConfig(steps=80, batch_size=64, lr=3e-3, augment=Augment(shift=0))
    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)

    @property
    def arch(self) -> ViTArch:
        return tiny_arch(self.width, self.layers, self.heads, output_dim=self.output_dim)

    @property
    def wide_arch(self) -> ViTArch:
        return tiny_arch(2 * self.width, self.layers, 2 * self.heads, output_dim=self.output_dim)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["format"] = ZOO_FORMAT
        return d


VARIANTS: dict[str, ZooConfig] = {
    "full": ZooConfig(variant="full", seeds=(0, 1, 2), tasks=("rot90", "invert", "hflip")),
    "test": ZooConfig(
        variant="test", seeds=(0,), tasks=("rot90", "invert"), width=32, layers=2, heads=4,
        pretrain=TrainConfig(steps=150, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.05)),
        fork_step=15,
        next_train=TrainConfig(steps=135, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.1, cutout=3)),
        grow_train=TrainConfig(steps=20, batch_size=64, lr=2e-3, augment=Augment(shift=1, noise=0.05)),
        wide_pretrain=TrainConfig(steps=60, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.05)),
        finetune=TrainConfig(steps=40, batch_size=64, lr=3e-3, augment=Augment(shift=0)),
        alpha_grid=(0.0, 0.5, 1.0, 1.5),
    ),
}


def _seed(seed: int, label: str) -> int:
    """A stable sub-seed for one random draw of one zoo seed (same on every machine and run)."""
    return zlib.crc32(f"{seed}:{label}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# unit permutations (function-preserving shuffles)
# ----------------------------------------------------------------------------------------------
@dataclass
class UnitPermutation:
    """A relabelling of a ViT's units that leaves its function unchanged.

    Convention: new unit ``i`` is old unit ``perm[i]`` (``t.index_select(axis, perm)``).
    ``res``: ONE permutation shared by every residual space (skip connections add them unchanged);
    per layer: ``qk`` [d] for the rows of Q and K (heads moved by ``heads``, dims within a head
    shuffled alike in Q and K so q.k is kept), ``vo`` [d] for the rows of V and columns of O (same
    head move, its own within-head shuffle), ``mlp`` [m] for fc1 rows and fc2 columns.
    """

    res: Tensor
    heads: list[Tensor]
    qk: list[Tensor]
    vo: list[Tensor]
    mlp: list[Tensor]

    def for_axis(self, space: str, block: str) -> Optional[Tensor]:
        """The permutation acting on an axis living in ``space`` of a tensor of ``block``."""
        if space.startswith("res:"):
            return self.res
        kind, layer = space.split(":")
        l = int(layer)
        if kind == "heads":
            return self.qk[l] if block in ("Q", "K") else self.vo[l]
        if kind == "mlp":
            return self.mlp[l]
        return None

    def tensors(self) -> dict[str, Tensor]:
        out = {"res": self.res}
        for l in range(len(self.heads)):
            out.update({f"blocks.{l}.heads": self.heads[l], f"blocks.{l}.qk": self.qk[l],
                        f"blocks.{l}.vo": self.vo[l], f"blocks.{l}.mlp": self.mlp[l]})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> "UnitPermutation":
        n = len([k for k in t if k.endswith(".heads")])
        return cls(t["res"], [t[f"blocks.{l}.heads"] for l in range(n)], [t[f"blocks.{l}.qk"] for l in range(n)],
                   [t[f"blocks.{l}.vo"] for l in range(n)], [t[f"blocks.{l}.mlp"] for l in range(n)])


def random_unit_permutation(arch: ViTArch, seed: int) -> UnitPermutation:
    """A uniformly random function-preserving shuffle of ``arch``'s units (seeded)."""
    g = torch.Generator().manual_seed(seed)
    H, dh = arch.heads, arch.head_dim

    def heads_perm(head_perm: Tensor) -> Tensor:
        # head h' of the new layout is old head head_perm[h'], its dims shuffled within the head
        return torch.cat([head_perm[h] * dh + torch.randperm(dh, generator=g) for h in range(H)])

    res = torch.randperm(arch.width, generator=g)
    heads, qk, vo, mlp = [], [], [], []
    for _ in range(arch.layers):
        hp = torch.randperm(H, generator=g)
        heads.append(hp)
        # one within-head shuffle shared by Q, K, V and O: the symmetry group TransFusion searches, so the
        # control pair has an exact answer (separate Q/K and V/O shuffles would also keep the function)
        qk.append(heads_perm(hp))
        vo.append(qk[-1].clone())
        mlp.append(torch.randperm(arch.mlp_width, generator=g))
    return UnitPermutation(res, heads, qk, vo, mlp)


def identity_permutation(arch: ViTArch) -> UnitPermutation:
    L = arch.layers
    return UnitPermutation(torch.arange(arch.width), [torch.arange(arch.heads)] * L, [torch.arange(arch.width)] * L,
                           [torch.arange(arch.width)] * L, [torch.arange(arch.mlp_width)] * L)


def permute_params(params: dict[str, Tensor], arch: ViTArch, perm: UnitPermutation) -> dict[str, Tensor]:
    """Apply ``perm`` to canonical parameters (or to a task vector's tensors: the map is linear)."""
    info = param_axes(arch)
    out: dict[str, Tensor] = {}
    for k, t in params.items():
        if k not in info:
            raise TransportError(f"permute: unknown tensor {k} for {arch.name}")
        for axis, space in enumerate(info[k].axes):
            if space is not None:
                p = perm.for_axis(space, info[k].block)
                if p is not None:
                    t = t.index_select(axis, p.to(t.device))
        out[k] = t.contiguous()
    return out


def invert_permutation(perm: UnitPermutation) -> UnitPermutation:
    inv = lambda p: torch.argsort(p)  # noqa: E731
    return UnitPermutation(inv(perm.res), [inv(p) for p in perm.heads], [inv(p) for p in perm.qk],
                           [inv(p) for p in perm.vo], [inv(p) for p in perm.mlp])


# ----------------------------------------------------------------------------------------------
# function-preserving widening (Net2Net-style duplication)
# ----------------------------------------------------------------------------------------------
_LINEAR_BLOCKS = ("Q", "K", "V", "O", "fc1", "fc2")


def check_growable(arch: ViTArch, wide: ViTArch) -> None:
    ok = (wide.width == 2 * arch.width and wide.heads == 2 * arch.heads and wide.mlp_width == 2 * arch.mlp_width
          and wide.layers == arch.layers and wide.output_dim == arch.output_dim
          and wide.image_size == arch.image_size and wide.patch_size == arch.patch_size
          and wide.in_chans == arch.in_chans and wide.act == arch.act and wide.patch_bias == arch.patch_bias
          and wide.ln_pre == arch.ln_pre)
    if not ok:
        raise TransportError(f"cannot grow {arch.name} into {wide.name}: need 2x width, 2x heads of the same head "
                             "dim, 2x MLP width and everything else equal")


def grow_params(params: dict[str, Tensor], arch: ViTArch, wide: ViTArch) -> dict[str, Tensor]:
    """Widen 2x keeping the function: every unit (residual dim, head, MLP unit) is duplicated.

    The residual stream becomes [x, x], so LayerNorm means and variances are unchanged; each linear
    map reads both copies with its input columns halved, so it computes what it did before. The map
    is linear in the parameters, so it also carries a task vector across (``grow(theta + tau) =
    grow(theta) + grow(tau)``).
    """
    check_growable(arch, wide)
    info, winfo = param_axes(arch), param_axes(wide)
    out: dict[str, Tensor] = {}
    for k, t in params.items():
        if k not in info:
            raise TransportError(f"grow: unknown tensor {k} for {arch.name}")
        pi = info[k]
        for axis, space in enumerate(pi.axes):
            if space is None:
                continue
            reads = (pi.block in _LINEAR_BLOCKS and not pi.is_bias and axis == 1) or (pi.block == "proj" and axis == 0)
            t = torch.cat([t, t], dim=axis)
            if reads:
                t = t * 0.5
        if tuple(t.shape) != winfo[k].shape:  # pragma: no cover - guarded by check_growable
            raise TransportError(f"grow: {k} became {tuple(t.shape)}, expected {winfo[k].shape}")
        out[k] = t.contiguous()
    return out


def widening_map(tensors: dict[str, Tensor], arch: ViTArch, wide: ViTArch, shuffle: UnitPermutation) -> dict[str, Tensor]:
    """The known cross-width map of W_grown: widen (as W_grown was grown from A), then its hidden shuffle.

    Linear, so it carries a task vector of A to W_grown's basis (before W_grown's own further training)."""
    return permute_params(grow_params(tensors, arch, wide), wide, shuffle)


def grown_task_vector(tau, name: str = "W_grown", root: Optional[str | os.PathLike] = None):
    """A task vector of A mapped onto ``W_grown[@SEED]`` by the known widening map (a reference for Theseus)."""
    from transport.task_vector import TaskVector

    wide = arch_of(name, root)
    return TaskVector(wide, widening_map(tau.tensors, tau.arch, wide, true_permutation(name, root)))


# ----------------------------------------------------------------------------------------------
# locations
# ----------------------------------------------------------------------------------------------
def zoo_root() -> Path:
    """``$TRANSPORT_ZOO_DIR``, else the ``zoo`` folder of the cache root (outside the git tree)."""
    env = os.environ.get("TRANSPORT_ZOO_DIR")
    if env:
        return Path(env)
    from transport.cache import cache_root

    return cache_root() / "zoo"


def _root(root: Optional[str | os.PathLike]) -> Path:
    return Path(root) if root is not None else zoo_root()


def _file(root: Path, name: str, seed: int) -> Path:
    return root / f"seed{seed}" / f"{name}.safetensors"


def _perm_file(root: Path, name: str, seed: int) -> Path:
    return root / f"seed{seed}" / f"{name}.perm.safetensors"


def _read_manifest(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _manifest(root: Optional[str | os.PathLike]) -> tuple[Path, dict]:
    r = _root(root)
    m = _read_manifest(r)
    if m is None:
        raise TransportError(f"the demo zoo is not built at {r}; run `python -m transport zoo build`")
    return r, m


def is_built(root: Optional[str | os.PathLike] = None) -> bool:
    """True when a complete zoo (its manifest, written last) is at ``root``."""
    return _read_manifest(_root(root)) is not None


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
    m = _read_manifest(_root(root))
    return list(m["tasks"]) if m is not None else list(VARIANTS["full"].tasks)


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


def load(name: str, root: Optional[str | os.PathLike] = None) -> Model:
    """A zoo model by name (``A``, ``A+rot90``, ``B_next+invert``, ``W_grown@1``...)."""
    from transport.io import load_file_model

    r, m = _manifest(root)
    e = _resolve(name, m)
    model = load_file_model(str(r / e["file"]), ViTArch.from_json(m["archs"][e["entry"]["arch"]]))
    return model.with_params(model.params, ref=f"zoo:{e['entry']['name']}@{e['entry']['seed']}")


def arch_of(name: str, root: Optional[str | os.PathLike] = None) -> ViTArch:
    """The architecture of a zoo model (no weights read)."""
    _, m = _manifest(root)
    return ViTArch.from_json(m["archs"][_resolve(name, m)["entry"]["arch"]])


def true_permutation(name: str, root: Optional[str | os.PathLike] = None) -> UnitPermutation:
    """The hidden shuffle that made ``B_control`` / ``B_next`` / ``W_grown`` from the unshuffled weights."""
    from transport.io import read_safetensors

    r, m = _manifest(root)
    e = _resolve(name, m)
    if not e.get("perm_file"):
        raise TransportError(f"zoo model '{name}' was not made by a shuffle (only B_control, B_next and W_grown are)")
    return UnitPermutation.from_tensors(read_safetensors(r / e["perm_file"])[0])


def phenomenon_table(root: Optional[str | os.PathLike] = None) -> list[dict]:
    """Per pair, task and seed: zero-shot target, naive (alpha on val), source fine-tuned, oracle, and more."""
    return list(_manifest(root)[1]["table"])


def build_info(root: Optional[str | os.PathLike] = None) -> dict:
    """The stored build summary (variant, seeds, seconds, per-model seconds, pretraining accuracies)."""
    _, m = _manifest(root)
    return {k: v for k, v in m.items() if k not in ("models", "table")}


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    "A": "source: pretrained on upright digits",
    "B_control": "A with its units shuffled (identical function)",
    "B_next": "forked from A's run after its early steps, trained on with other augmentation and seed, then shuffled",
    "B_next_unshuffled": "B_next before its hidden shuffle (what naive addition could hope for)",
    "B_indep": "pretrained from an unrelated seed",
    "W_grown": "2x wider, grown from A by a function-preserving widening, trained on, then shuffled",
    "W_indep": "2x wider, pretrained from an unrelated seed",
}

_progress_queue = None  # set in worker processes


def _report(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


class _Ticker:
    """Batches progress reports (one queue message per ``every`` steps)."""

    def __init__(self, report: Callable[[int], None], every: int = 10):
        self.report, self.every, self.n = report, every, 0

    def __call__(self, n: int) -> None:
        self.n += n
        if self.n >= self.every:
            self.report(self.n)
            self.n = 0

    def flush(self) -> None:
        self.report(self.n)
        self.n = 0


@functools.lru_cache(maxsize=None)
def _task(name: str):
    """A built-in digits task, loaded once per process."""
    from transport.data import digits_task

    return digits_task(name)


def _digits_train(name: str) -> tuple[Tensor, Tensor]:
    return _task(name).split("train")


def _head_classes(head, classnames: list[str]):
    head.classnames = list(classnames)
    return head


class _Writer:
    """Saves models of one seed and remembers their manifest records and training seconds."""

    def __init__(self, root: Path, seed: int, cfg: ZooConfig):
        self.root, self.seed, self.cfg = root, seed, cfg
        self.records: list[dict] = []

    def save(self, name: str, model: Model, kind: str, task: Optional[str] = None, base: Optional[str] = None,
             run: Optional[TrainResult] = None, perm: Optional[UnitPermutation] = None) -> None:
        from transport.io import save_model, write_safetensors

        pre = name.split("+")[0]
        desc = _DESCRIPTIONS[pre] if task is None else f"{pre} fine-tuned on {task} (head frozen)"
        entry = ZooEntry(name, kind, self.seed, task, model.arch.name, desc, base)
        path = _file(self.root, name, self.seed)
        save_model(model.with_params(model.params, ref=f"zoo:{name}@{self.seed}"), path, zoo_name=name,
                   zoo_seed=str(self.seed), zoo_kind=kind, zoo_task=task or "", description=desc)
        rec = {"entry": asdict(entry), "file": str(path.relative_to(self.root)),
               "seconds": round(run.seconds, 3) if run else 0.0,
               "cpu_seconds": round(run.cpu_seconds, 3) if run else 0.0}
        if perm is not None:
            pf = _perm_file(self.root, name, self.seed)
            write_safetensors(pf, {k: v.contiguous() for k, v in perm.tensors().items()})
            rec["perm_file"] = str(pf.relative_to(self.root))
        self.records.append(rec)


def _finetune_all(w: _Writer, name: str, model: Model, tick: _Ticker) -> dict[str, dict[str, Tensor]]:
    """Fine-tune ``model`` on every downstream task (same recipe and data order for every model)."""
    out = {}
    for task in w.cfg.tasks:
        x, y = _digits_train(task)
        cfg = w.cfg.finetune.with_seed(_seed(w.seed, f"finetune:{task}"))
        run = finetune(model, x, y, cfg, on_step=tick)
        w.save(f"{name}+{task}", model.with_params(run.params), "finetuned", task, name, run)
        out[task] = run.params
    return out


def pretrain_source(cfg: ZooConfig, seed: int, on_step: Optional[Callable[[int], None]] = None):
    """Train A of one zoo seed; returns the :class:`~transport.train.TrainResult` (with the fork snapshot)."""
    from transport.data import DIGIT_NAMES

    arch = cfg.arch
    x, y = _digits_train(PRETRAIN_TASK)
    res = train(init_params(arch, _seed(seed, "A:init")), init_head(arch, 10, _seed(seed, "A:head"), DIGIT_NAMES),
                arch, x, y, cfg.pretrain.with_seed(_seed(seed, "A:data")), snapshot_at=(cfg.fork_step,),
                on_step=on_step)
    return res


def _job_source_chain(root: str, cfg: ZooConfig, seed: int) -> dict:
    """A and everything made from its run: fine-tunes, B_control, B_next, W_grown."""
    from transport.data import DIGIT_NAMES

    torch.set_num_threads(1)
    w, tick = _Writer(Path(root), seed, cfg), _Ticker(_report)
    arch, wide = cfg.arch, cfg.wide_arch
    x, y = _digits_train(PRETRAIN_TASK)

    res = pretrain_source(cfg, seed, tick)
    A = Model(arch, res.params, f"zoo:A@{seed}", _head_classes(res.head, DIGIT_NAMES))
    w.save("A", A, "pretrained", run=res)
    a_ft = _finetune_all(w, "A", A, tick)

    perm_c = random_unit_permutation(arch, _seed(seed, "B_control:perm"))
    w.save("B_control", A.with_params(permute_params(A.params, arch, perm_c)), "pretrained", perm=perm_c)
    for task in cfg.tasks:  # the oracle of a shuffled A is A's fine-tune shuffled alike (exact)
        w.save(f"B_control+{task}", A.with_params(permute_params(a_ft[task], arch, perm_c)), "finetuned", task,
               "B_control")

    snap_params, snap_head = res.snapshots[cfg.fork_step]
    nxt = train(snap_params, snap_head, arch, x, y, cfg.next_train.with_seed(_seed(seed, "B_next:data")),
                on_step=tick)
    Bu = Model(arch, nxt.params, f"zoo:B_next_unshuffled@{seed}", _head_classes(nxt.head, DIGIT_NAMES))
    w.save("B_next_unshuffled", Bu, "pretrained", run=nxt)
    perm_n = random_unit_permutation(arch, _seed(seed, "B_next:perm"))
    Bn = Bu.with_params(permute_params(Bu.params, arch, perm_n))
    w.save("B_next", Bn, "pretrained", perm=perm_n)
    _finetune_all(w, "B_next", Bn, tick)

    g = torch.Generator().manual_seed(_seed(seed, "W_grown:noise"))
    grown = grow_params(A.params, arch, wide)
    grown = {k: v + cfg.grow_noise * float(v.std() if v.numel() > 1 else 0.0) * torch.randn(v.shape, generator=g)
             for k, v in grown.items()}
    wg = train(grown, A.head, wide, x, y, cfg.grow_train.with_seed(_seed(seed, "W_grown:data")), on_step=tick)
    # shuffled like B_next: otherwise its first d units ARE A's units and zero-padding tau is a hidden alignment
    perm_w = random_unit_permutation(wide, _seed(seed, "W_grown:perm"))
    W = Model(wide, permute_params(wg.params, wide, perm_w), f"zoo:W_grown@{seed}", _head_classes(wg.head, DIGIT_NAMES))
    w.save("W_grown", W, "pretrained", run=wg, perm=perm_w)
    _finetune_all(w, "W_grown", W, tick)
    tick.flush()
    return {"records": w.records}


def _job_independent(root: str, cfg: ZooConfig, seed: int) -> dict:
    """B_indep and W_indep (unrelated seeds) with their fine-tunes."""
    from transport.data import DIGIT_NAMES

    torch.set_num_threads(1)
    w, tick = _Writer(Path(root), seed, cfg), _Ticker(_report)
    x, y = _digits_train(PRETRAIN_TASK)
    for name, arch, tcfg in (("B_indep", cfg.arch, cfg.pretrain), ("W_indep", cfg.wide_arch, cfg.wide_pretrain)):
        res = train(init_params(arch, _seed(seed, f"{name}:init")),
                    init_head(arch, 10, _seed(seed, f"{name}:head"), DIGIT_NAMES), arch, x, y,
                    tcfg.with_seed(_seed(seed, f"{name}:data")), on_step=tick)
        M = Model(arch, res.params, f"zoo:{name}@{seed}", _head_classes(res.head, DIGIT_NAMES))
        w.save(name, M, "pretrained", run=res)
        _finetune_all(w, name, M, tick)
    tick.flush()
    return {"records": w.records}


def _evaluate_seed(root: Path, cfg: ZooConfig, seed: int, models: dict[str, dict]) -> dict:
    """The phenomenon rows of one seed plus every pretrained model's accuracy on the pretraining task."""
    from transport.evaluate import accuracy, sweep_alpha
    from transport.io import load_file_model, read_safetensors
    from transport.task_vector import TaskVector

    torch.set_num_threads(1)
    grid = list(cfg.alpha_grid)

    def get(name: str) -> Model:
        rec = models[name]
        return load_file_model(str(root / rec["file"]), None)

    def tuned(target: Model, tau: TaskVector, task) -> tuple[float, float]:
        sw = sweep_alpha(target, tau, task, grid)
        return accuracy(target, task, "test", tau.apply_to(target.params, sw.best_alpha)), sw.best_alpha

    pre = {n: get(n) for n in PRETRAINED}
    digits = _task(PRETRAIN_TASK)
    pretrain_acc = {n: round(accuracy(m, digits), 4) for n, m in pre.items()}
    perm_c, perm_w = (UnitPermutation.from_tensors(read_safetensors(root / models[n]["perm_file"])[0])
                      for n in ("B_control", "W_grown"))
    A = pre["A"]
    rows: list[dict] = []
    for tname in cfg.tasks:
        task = _task(tname)
        A_ft = get(f"A+{tname}")
        tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
        src_ft, src_zs = accuracy(A_ft, task), accuracy(A, task)
        for pair in _PAIRS:
            T = pre[pair.target]
            row = {"pair": pair.key, "target": pair.target, "task": tname, "seed": seed,
                   "zero_shot_target": accuracy(T, task), "naive": None, "naive_alpha": None,
                   "source_zero_shot": src_zs, "source_finetuned": src_ft,
                   "oracle": accuracy(get(f"{pair.target}+{tname}"), task),
                   "true_map": None, "true_map_alpha": None, "naive_unshuffled": None, "naive_unshuffled_alpha": None}
            if A.arch.same_shapes(T.arch):
                row["naive"], row["naive_alpha"] = tuned(T, tau, task)
            if pair.key == "control":  # the true shuffle of tau at alpha = 1 gives A's fine-tune exactly
                ptau = TaskVector(T.arch, permute_params(tau.tensors, A.arch, perm_c))
                row["true_map"], row["true_map_alpha"] = accuracy(T, task, "test", ptau.apply_to(T.params, 1.0)), 1.0
            elif pair.key == "next":
                # B_next + perm(tau) is B_next_unshuffled + tau relabelled: the true shuffle gives exactly this
                row["naive_unshuffled"], row["naive_unshuffled_alpha"] = tuned(pre["B_next_unshuffled"], tau, task)
                row["true_map"], row["true_map_alpha"] = row["naive_unshuffled"], row["naive_unshuffled_alpha"]
            elif pair.key == "wide_grown":
                gtau = TaskVector(T.arch, widening_map(tau.tensors, A.arch, T.arch, perm_w))
                row["true_map"], row["true_map_alpha"] = tuned(T, gtau, task)
            rows.append(row)
        _report(1)
    return {"rows": rows, "pretrain_accuracy": pretrain_acc}


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue
    torch.set_num_threads(1)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: a build worker gets SIGTERM when the building process dies (an interrupted build leaves no
    orphans writing into the zoo directory). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        pass


def summarize(table: list[dict]) -> list[dict]:
    """Mean and spread (population std) over seeds, per pair and task."""
    keys = ("zero_shot_target", "naive", "true_map", "source_finetuned", "oracle")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["pair"], r["task"]), []).append(r)
    out = []
    for (pair, task), rs in groups.items():
        s = {"pair": pair, "target": rs[0]["target"], "task": task, "seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = None if not vals else statistics.fmean(vals)
            s[k + "_std"] = None if not vals else statistics.pstdev(vals)
        out.append(s)
    return out


def format_table(table: list[dict]) -> str:
    """A plain-text table of :func:`summarize` (accuracies in %, mean +- spread over seeds)."""
    def cell(m, s):
        return "-" if m is None else f"{100 * m:.1f}" + (f" +- {100 * s:.1f}" if s else "")

    head = f"{'pair':<11} {'task':<7} {'zero-shot B':>13} {'naive':>13} {'true map':>13} {'A ft':>13} {'oracle':>13}"
    lines = [head, "-" * len(head)]
    for s in summarize(table):
        lines.append(f"{s['pair']:<11} {s['task']:<7} " + " ".join(
            f"{cell(s[k], s[k + '_std']):>13}" for k in ("zero_shot_target", "naive", "true_map", "source_finetuned",
                                                       "oracle")))
    return "\n".join(lines)


def _total_units(cfg: ZooConfig) -> int:
    nt = len(cfg.tasks)
    per_seed = (cfg.pretrain.steps + cfg.next_train.steps + cfg.grow_train.steps + cfg.pretrain.steps
                + cfg.wide_pretrain.steps + 5 * nt * cfg.finetune.steps + nt)
    return per_seed * len(cfg.seeds)


def build(root: Optional[str | os.PathLike] = None, variant: str = "full", seeds: Optional[list[int]] = None,
          force: bool = False, progress: bool = True, workers: Optional[int] = None,
          on_progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """Train the zoo (deterministically), measure the phenomenon and write ``manifest.json`` last.

    Skips the work when a zoo of the same configuration is already built (unless ``force``).
    ``progress``: a tqdm bar on stderr and the table printed at the end; ``on_progress(fraction, message)``
    is called as training steps complete (for an app's own progress bar).
    ``workers``: processes (default: up to 2, one thread each; results do not depend on it).
    Returns the build summary (seconds, per-model seconds, pretraining accuracies, the phenomenon table).
    """
    if variant not in VARIANTS:
        raise TransportError(f"unknown zoo variant '{variant}' (known: {', '.join(VARIANTS)})")
    cfg = VARIANTS[variant]
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or any(int(s) < 0 for s in seeds):
            raise TransportError(f"zoo seeds must be distinct non-negative integers, got {list(seeds)}")
        cfg = replace(cfg, seeds=tuple(int(s) for s in seeds))
    r = _root(root)
    fingerprint = cfg.fingerprint()
    old = _read_manifest(r)
    if old is not None and not force and old.get("format", 0) < ZOO_FORMAT:
        if progress:  # our own cache from an older release of this package: rebuild it, nothing else is touched
            print(f"the zoo at {r} has format {old.get('format')}, this version needs {ZOO_FORMAT}: rebuilding",
                  file=sys.stderr)
        force = True
    if old is not None and not force:
        if old.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            info = {k: v for k, v in old.items() if k not in ("models",)}
            info["skipped"], info["summary"] = True, summarize(info["table"])
            return info
        raise TransportError(f"{r}: holds a zoo built with another configuration (variant "
                             f"'{old.get('variant')}', seeds {old.get('seeds')}); rebuild with --force")
    if r.exists() and any(r.iterdir()) and old is None and not (r / ".zoo-building").exists() and not force:
        raise TransportError(f"{r}: exists and is not a zoo directory; choose another TRANSPORT_ZOO_DIR or use --force")
    r.mkdir(parents=True, exist_ok=True)
    (r / MANIFEST).unlink(missing_ok=True)
    for sub in r.glob("seed*"):
        shutil.rmtree(sub, ignore_errors=True)
    (r / ".zoo-building").write_text("incomplete build; run `python -m transport zoo build --force`\n")

    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    n_workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1, 2 * len(cfg.seeds)))
    bar = _progress_bar(_total_units(cfg), variant, progress)
    if on_progress is not None:
        bar = _CallbackBar(bar, _total_units(cfg), variant, on_progress)
    records: dict[int, dict[str, dict]] = {s: {} for s in cfg.seeds}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    rows: list[dict] = []
    pre_acc: dict[str, float] = {}
    jobs = [(_job_source_chain, s) for s in cfg.seeds] + [(_job_independent, s) for s in cfg.seeds]
    jobs = [j for pair in zip(jobs[: len(cfg.seeds)], jobs[len(cfg.seeds):]) for j in pair]

    def take_models(seed: int, out: dict) -> None:
        for rec in out["records"]:
            records[seed][rec["entry"]["name"]] = rec
            seconds[f"{rec['entry']['name']}@{seed}"] = rec["seconds"]
            cpu_seconds[f"{rec['entry']['name']}@{seed}"] = rec["cpu_seconds"]

    def take_eval(seed: int, out: dict) -> None:
        rows.extend(out["rows"])
        pre_acc.update({f"{k}@{seed}": v for k, v in out["pretrain_accuracy"].items()})

    global _progress_queue
    old_threads = torch.get_num_threads()
    try:
        if n_workers <= 1:
            _progress_queue = _InlineQueue(bar)
            torch.set_num_threads(1)
            for fn, s in jobs:
                take_models(s, fn(str(r), cfg, s))
            for s in cfg.seeds:
                take_eval(s, _evaluate_seed(r, cfg, s, records[s]))
        else:
            _run_pool(r, cfg, jobs, n_workers, bar, records, take_models, take_eval)
    finally:
        _progress_queue = None
        torch.set_num_threads(old_threads)
        bar.close()

    rows.sort(key=lambda x: ([p.key for p in _PAIRS].index(x["pair"]), list(cfg.tasks).index(x["task"]), x["seed"]))
    archs = {cfg.arch.name: cfg.arch.to_json(), cfg.wide_arch.name: cfg.wide_arch.to_json()}
    order = {n: i for i, n in enumerate(PRETRAINED)}
    models = [rec for s in cfg.seeds for rec in sorted(
        records[s].values(), key=lambda rc: (order[rc["entry"]["name"].split("+")[0]], rc["entry"]["task"] or ""))]
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": ZOO_FORMAT, "variant": variant, "seeds": list(cfg.seeds), "tasks": list(cfg.tasks),
        "pretrain_task": PRETRAIN_TASK, "archs": archs, "fingerprint": fingerprint,
        "build_seconds": round(elapsed, 1), "workers": n_workers, "model_seconds": seconds,
        "model_cpu_seconds": cpu_seconds, "cpu_seconds": round(time.process_time() - c0 + _children_cpu() - k0, 1),
        "pretrain_accuracy": pre_acc, "pairs": [asdict(p) for p in _PAIRS], "models": models, "table": rows,
    }
    tmp = r / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, r / MANIFEST)
    (r / ".zoo-building").unlink(missing_ok=True)
    if progress:
        print(f"zoo ({variant}, seeds {', '.join(map(str, cfg.seeds))}) built in {elapsed:.0f} s "
              f"({manifest['cpu_seconds']:.0f} CPU s, {n_workers} worker(s)) at {r}")
        print(format_table(rows))
    info = {k: v for k, v in manifest.items() if k != "models"}
    info["skipped"], info["summary"] = False, summarize(rows)
    return info


def _children_cpu() -> float:
    """CPU seconds used by finished child processes (the build's workers), where the OS tells."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    except (ImportError, OSError):  # pragma: no cover - not on POSIX
        return 0.0


class _CallbackBar:
    """A progress bar that also reports (fraction, message) to a callback."""

    def __init__(self, bar, total: int, variant: str, callback: Callable[[float, str], None]):
        self.bar, self.total, self.n, self.variant, self.callback = bar, max(1, total), 0, variant, callback

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        self.callback(min(1.0, self.n / self.total), f"building the {self.variant} zoo: {self.n}/{self.total} steps")

    def close(self) -> None:
        self.bar.close()
        self.callback(1.0, "zoo built")


class _InlineQueue:
    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _progress_bar(total: int, variant: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"building the {variant} zoo", unit="step", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def _run_pool(r: Path, cfg: ZooConfig, jobs, n_workers: int, bar, records, take_models, take_eval) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    done_jobs: dict[int, int] = {s: 0 for s in cfg.seeds}
    with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(queue,)) as pool:
        pending = {pool.submit(fn, str(r), cfg, s): ("train", s) for fn, s in jobs}
        while pending:
            done, _ = cf.wait(list(pending), timeout=0.2, return_when=cf.FIRST_COMPLETED)
            _drain(queue, bar)
            for f in done:
                what, s = pending.pop(f)
                out = f.result()
                if what == "train":
                    take_models(s, out)
                    done_jobs[s] += 1
                    if done_jobs[s] == 2:
                        pending[pool.submit(_evaluate_seed, r, cfg, s, records[s])] = ("eval", s)
                else:
                    take_eval(s, out)
        _drain(queue, bar)


def _drain(queue, bar) -> None:
    import queue as _q

    while True:
        try:
            bar.update(queue.get_nowait())
        except _q.Empty:
            return


def _main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m transport.zoo", description="Build or list the demo zoo.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the zoo (deterministic) and print the phenomenon table")
    b.add_argument("--variant", default="full", choices=sorted(VARIANTS))
    b.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 0,1,2")
    b.add_argument("--force", action="store_true", help="rebuild even if a zoo is already built there")
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    ls = sub.add_parser("list", help="list the models of the built zoo")
    ls.add_argument("--root", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            info = build(args.root, args.variant, args.seeds, args.force, True, args.workers)
            if info["skipped"]:
                print(f"zoo already built at {_root(args.root)} ({info['build_seconds']} s); --force rebuilds")
                print(format_table(info["table"]))
        else:
            for e in list_models(args.root):
                print(f"{e.ref:<24} {e.kind:<10} {e.arch:<20} {e.description}")
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "ZooEntry", "ZooPair", "ZooConfig", "VARIANTS", "UnitPermutation", "zoo_root", "build", "is_built",
    "list_models", "load", "arch_of", "tasks", "seeds", "pairs", "phenomenon_table", "build_info", "summarize",
    "format_table", "random_unit_permutation", "identity_permutation", "permute_params", "invert_permutation",
    "grow_params", "check_growable", "true_permutation", "pretrain_source",
]

if __name__ == "__main__":
    sys.exit(_main())
