"""Per-axis linear maps: what a transport method does to each canonical tensor, one axis at a time.

A method whose ``apply`` is linear and acts on every tensor axis separately (a permutation gather, a
Procrustes contraction) can describe itself as data: target tensor name -> :class:`TensorMap`, the source
tensor it reads and, per axis of the target tensor, one of

- ``None``: the identity (the axis keeps its size);
- an integer index vector ``p`` [n]: ``new = old.index_select(axis, p)`` (``new[i]`` is old unit ``p[i]``);
- a float matrix ``T`` [n_source, n_target]: ``new[.., j, ..] = sum_i old[.., i, ..] T[i, j]``.

Target tensors a method leaves out get a zero update. Because each map acts on one axis, a product of
factors ``L @ R`` (a low-rank update, :mod:`transport.core.lowrank`) transports by mapping ``L``'s rows and
``R``'s columns: ``P_out (L R) P_in^T = (P_out L)(R P_in^T)`` and ``T_out^T (L R) T_in = (T_out^T L)(R T_in)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from transport.errors import TransportError

Tensor = torch.Tensor
AxisMap = Optional[Tensor]


@dataclass(frozen=True, eq=False)
class TensorMap:
    """How one target tensor is made: from ``source``, each axis mapped by ``axes[k]`` (see the module doc)."""

    source: str
    axes: tuple[AxisMap, ...]

    def kinds(self) -> tuple[str, ...]:
        """Per axis 'identity', 'index' or 'matrix'."""
        return tuple("identity" if m is None else "index" if is_index(m) else "matrix" for m in self.axes)


def is_index(m: Tensor) -> bool:
    return m.dim() == 1 and not m.is_floating_point()


def map_axis(t: Tensor, axis: int, m: AxisMap) -> Tensor:
    """``t`` with ``axis`` mapped by ``m`` (None, an index vector or a matrix [n_source, n_target])."""
    if m is None:
        return t
    if is_index(m):
        return t.index_select(axis, m.to(t.device))
    if m.dim() != 2 or m.shape[0] != t.shape[axis]:
        raise TransportError(f"axis map of shape {tuple(m.shape)} does not fit axis {axis} of a tensor "
                             f"{tuple(t.shape)}")
    return (t.movedim(axis, -1) @ m.to(t.device, t.dtype)).movedim(-1, axis)


def apply_map(t: Tensor, tmap: TensorMap) -> Tensor:
    """The dense transport of one tensor: every axis mapped."""
    if len(tmap.axes) != t.dim():
        raise TransportError(f"tensor map for {tmap.source} has {len(tmap.axes)} axes, the tensor {t.dim()}")
    out = t
    for k, m in enumerate(tmap.axes):
        out = map_axis(out, k, m)
    return out.contiguous()


def apply_maps(tensors: Mapping[str, Tensor], maps: Mapping[str, TensorMap]) -> dict[str, Tensor]:
    """Every target tensor whose source ``tensors`` holds, transported (the others are absent: zero)."""
    return {name: apply_map(tensors[m.source], m) for name, m in maps.items() if m.source in tensors}


def identity_maps(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorMap]:
    """Every tensor from itself, unchanged (naive transport)."""
    return {k: TensorMap(k, (None,) * len(s)) for k, s in shapes.items()}


__all__ = ["AxisMap", "TensorMap", "is_index", "map_axis", "apply_map", "apply_maps", "identity_maps"]
