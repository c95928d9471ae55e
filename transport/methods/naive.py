"""Naive transport: theta_B + alpha * tau, the baseline every method must beat (same shapes only)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transport.core.arch import Arch
from transport.core.axis_maps import TensorMap, identity_maps
from transport.core.layout import canonical_shapes
from transport.core.task_vector import TaskVector
from transport.methods import MethodInfo, Progress, TransportInputs


@dataclass
class NaiveAlignment:
    """Nothing to align: the identity map."""

    def diagnostics(self) -> dict:
        return {"method": "naive"}

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "alignment.json").write_text(json.dumps(self.diagnostics()))

    @classmethod
    def load(cls, directory) -> "NaiveAlignment":
        return cls()


def prepare(inputs: TransportInputs, options: dict, progress: Progress) -> NaiveAlignment:
    progress(1.0, "naive: nothing to prepare")
    return NaiveAlignment()


def apply(alignment: NaiveAlignment, tau: TaskVector, alpha: float = 1.0, options: dict | None = None) -> TaskVector:
    """alpha * tau, unchanged otherwise."""
    return tau * alpha


def axis_maps(alignment: NaiveAlignment, options: dict | None, arch: Arch) -> dict[str, TensorMap]:
    """Every tensor of ``arch`` (the architecture both sides share) from itself, unchanged."""
    return identity_maps(canonical_shapes(arch))


METHOD = MethodInfo(name="naive", summary="theta_B + alpha * tau (no alignment)", same_arch=True, data="none",
                    prepare=prepare, apply=apply, load_alignment=NaiveAlignment.load, axis_maps=axis_maps)
