"""Registry of transport methods. Each method is one module ``transport/methods/<name>.py`` exposing

``METHOD: MethodInfo`` with

- ``prepare(inputs, options, progress) -> alignment``: the expensive part (permutations, sign masks,
  Procrustes maps). It never reads the task vector. The alignment object has ``diagnostics() -> dict``
  (JSON-able, what the report and the figures need), ``save(dir)`` and a classmethod ``load(dir)``.
- ``apply(alignment, tau, alpha, options) -> TaskVector``: cheap; returns alpha * (transported tau) in
  the TARGET architecture's canonical names (so ``target.params + result`` is a standard model).

The CLI and the app only go through :func:`get_method` / :func:`available_methods`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from transport.data import Task
from transport.errors import NotImplementedYet, TransportError
from transport.model import Model
from transport.task_vector import TaskVector

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


@dataclass
class MethodInfo:
    name: str
    summary: str
    same_arch: bool  # requires source and target of identical shapes
    data: str  # 'none' | 'labelled' | 'unlabelled'
    prepare: Callable[[TransportInputs, dict, Progress], Any]
    apply: Callable[[Any, TaskVector, float, dict], TaskVector]
    load_alignment: Callable[[Any], Any]
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default


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


def check_compatible(info: MethodInfo, inputs: TransportInputs) -> None:
    """One-line errors for requests a method cannot serve (architecture, data)."""
    a, b = inputs.source.arch, inputs.target.arch
    if info.same_arch and not a.same_shapes(b):
        raise TransportError(f"{info.name} needs source and target of the same architecture: "
                             f"{inputs.source.ref} is {a.name} (width {a.width}, {a.layers} layers), "
                             f"{inputs.target.ref} is {b.name} (width {b.width}, {b.layers} layers)")
    if a.layers != b.layers:
        raise TransportError(f"{info.name}: source and target depths differ ({a.layers} vs {b.layers} layers)")
    if info.data != "none" and inputs.task is None:
        raise TransportError(f"{info.name} needs {info.data} data: give --task or --data")
    if info.data == "labelled" and not inputs.task.labelled:
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
