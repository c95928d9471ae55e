"""Registry of transport methods. Each method is one module ``transport/methods/<name>.py`` exposing

``METHOD: MethodInfo`` with

- ``prepare(inputs, options, progress) -> alignment``: the expensive part (permutations, sign masks,
  Procrustes maps). It never reads the task vector. The alignment object has ``diagnostics() -> dict``
  (JSON-able, what the report and the figures need), ``save(dir)`` and a classmethod ``load(dir)``.
- ``apply(alignment, tau, alpha, options) -> TaskVector``: cheap; returns alpha * (transported tau) in
  the TARGET architecture's canonical names (so ``target.params + result`` is a standard model).
- ``axis_maps(alignment, options, arch) -> {target tensor: TensorMap}`` (optional; ``arch``: the task vector's
  architecture): the same transport at alpha
  = 1 as per-axis linear maps (:mod:`transport.core.axis_maps`), for methods whose ``apply`` is one; low-rank
  updates (LoRA adapters) then move as factors, exactly. None for a method that is not (GradFix's mask).

Options are data (:class:`Option`: default, choices, bounds, whether changing it only re-applies, whether
it has its own command-line flag); the CLI flags, ``python -m transport methods`` and the app's widgets
are generated from them. Methods read the core only (never a family's names). The CLI and the app only
go through :func:`get_method` / :func:`available_methods`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from transport.core.arch import Arch
from transport.core.layout import same_shapes
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.data import Task
from transport.errors import NotImplementedYet, TransportError

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], phase message)


def no_progress(fraction: float, message: str) -> None:
    return None


class Alignment(Protocol):
    def diagnostics(self) -> dict: ...
    def save(self, directory) -> None: ...


@dataclass
class TransportInputs:
    """Everything a method's ``prepare`` may use. ``task`` supplies labelled shots (GradFix) or
    unlabelled calibration images (Theseus), always from its TRAIN split."""

    source: Model  # source pretrained theta_A
    target: Model  # target pretrained theta_B
    task: Optional[Task] = None
    shots: int = 2
    seed: int = 0
    device: str = "cpu"
    source_finetuned: Optional[Model] = None  # only for oracle-style diagnostics; prepare must not need it
    left_out: tuple[str, ...] = ()  # target tensors outside the transport (tower only): their update stays zero


@dataclass(frozen=True)
class Option:
    """One option a method declares.

    ``apply_only``: the method reads it in ``apply`` only, so changing it re-applies a prepared alignment
    (and it is not part of the alignment's cache key). ``flag``: it has its own command-line flag
    ``--NAME`` (every option is also reachable as ``--option NAME=VALUE``). ``hidden``: not a user-facing
    widget (e.g. an object passed by the program). ``minimum`` / ``maximum`` bound numeric values.
    """

    name: str
    default: Any
    help: str
    choices: Optional[tuple] = None
    apply_only: bool = False
    flag: bool = False
    hidden: bool = False
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    @property
    def kind(self) -> type:
        return type(self.default)

    def check(self, value: Any, method: str) -> Any:
        """``value`` if it is allowed (ints widen to floats), else a one-line TransportError naming the option."""
        where = f"{method}: option {self.name}"
        if self.hidden or self.default is None:
            return value
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise TransportError(f"{where} must be true or false, got {value!r}")
        elif isinstance(self.default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TransportError(f"{where} must be an integer, got {value!r}")
        elif isinstance(self.default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TransportError(f"{where} must be a finite number, got {value!r}")
            value = float(value)
        elif isinstance(self.default, str) and not isinstance(value, str):
            raise TransportError(f"{where} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise TransportError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise TransportError(f"{where} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise TransportError(f"{where} must be <= {self.maximum:g}, got {value!r}")
        return value


@dataclass
class MethodInfo:
    name: str
    summary: str
    same_arch: bool  # requires source and target of identical shapes
    data: str  # 'none' | 'labelled' | 'unlabelled'
    prepare: Callable[[TransportInputs, dict, Progress], Any]
    apply: Callable[[Any, TaskVector, float, dict], TaskVector]
    load_alignment: Callable[[Any], Any]
    spec: tuple[Option, ...] = ()
    same_depth: bool = True  # requires source and target of equal depth
    axis_maps: Optional[Callable[[Any, dict, Any], dict]] = None  # apply as per-axis linear maps (see the module doc)

    @property
    def options(self) -> dict[str, Any]:
        """Option name -> default."""
        return {o.name: o.default for o in self.spec}

    def option(self, name: str) -> Option:
        for o in self.spec:
            if o.name == name:
                return o
        raise TransportError(f"{self.name}: unknown option {name} (known: {', '.join(self.options) or 'none'})")

    @property
    def apply_only(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.spec if o.apply_only)

    def resolve(self, options: Optional[dict] = None) -> dict:
        """Defaults filled in, unknown names refused, every value checked against its declaration."""
        given = dict(options or {})
        unknown = [k for k in given if k not in self.options]
        if unknown:
            raise TransportError(f"{self.name}: unknown option(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(self.options) or 'none'})")
        return {o.name: o.check(given[o.name], self.name) if o.name in given else o.default for o in self.spec}


METHOD_NAMES = ("naive", "transfusion", "gradfix", "theseus")


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; a planned one that is not built yet raises NotImplementedYet."""
    if name not in METHOD_NAMES:
        raise TransportError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    try:
        mod = importlib.import_module(f"transport.methods.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"transport.methods.{name}":
            raise NotImplementedYet(f"method '{name}' is not implemented yet") from None
        raise
    info = getattr(mod, "METHOD", None)
    if info is None:
        raise NotImplementedYet(f"method '{name}' is not implemented yet")
    return info


def available_methods() -> list[str]:
    out = []
    for n in METHOD_NAMES:
        try:
            get_method(n)
            out.append(n)
        except NotImplementedYet:
            pass
    return out


#: fields that do not change a tensor's shape or the function (names, input normalisation)
COSMETIC = ("name", "family", "mean", "std")


def only_projection_differs(a: Arch, b: Arch) -> bool:
    """The two towers are one architecture up to their output projection."""
    diff = a.differences(b, ignore=COSMETIC)
    return bool(diff) and all(d.startswith("output_dim ") for d in diff)


def arch_difference(a: Arch, b: Arch) -> str:
    """The fields two architectures differ in, source value first (e.g. ``output_dim 512 vs 0``); when only the
    output projection differs, the ways to move the rest."""
    diff = a.differences(b, ignore=COSMETIC) or a.differences(b, ignore=("name",))
    out = ", ".join(diff) or "tensor shapes"
    if only_projection_differs(a, b):
        out += (" only: the towers match but their output projections differ (theseus maps the shared tower; "
                "pass --tower-only to move the tower alone: the projection's update is dropped or left at zero)")
    return out


def check_compatible(info: MethodInfo, inputs: TransportInputs) -> None:
    """One-line errors for requests a method cannot serve (architecture, data)."""
    a, b = inputs.source.arch, inputs.target.arch
    if info.same_arch and not same_shapes(a, b):
        raise TransportError(f"{info.name} needs source and target of the same architecture: {inputs.source.ref} "
                             f"({a.name}) and {inputs.target.ref} ({b.name}) differ in {arch_difference(a, b)}")
    if info.same_depth and a.layers != b.layers:
        raise TransportError(f"{info.name}: source and target depths differ ({a.layers} vs {b.layers} layers)")
    if info.data != "none" and inputs.task is None:
        raise TransportError(f"{info.name} needs {info.data} data: give --task or --data")
    # a plain text corpus serves as labelled data: a text is its own next-token target
    if info.data == "labelled" and not inputs.task.labelled and getattr(inputs.task, "kind", "image") != "text":
        raise TransportError(f"{info.name} needs labelled data: {inputs.task.name} holds images without classes "
                             "(give an ImageFolder with one sub-folder per class)")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TransportError(f"device '{device}' requested but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise TransportError(f"unknown device '{device}' (use cpu or cuda)")
    return device
