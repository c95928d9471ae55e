"""Low-rank task vectors: tau_W = scale * L @ R per canonical weight, kept factored through transport.

A LoRA adapter is a low-rank task vector. Its updates are stored here as factors of canonical tensors
(``L`` [n0, r] on axis 0, ``R`` [r, n1] on axis 1, whatever the family stores as rows), next to the full-rank
updates it may also carry (biases, whole modules). Methods that transport each axis by its own linear map
(:mod:`transport.core.axis_maps`) move the factors, so the rank and the exactness are kept:
``map(scale * L @ R) = scale * map0(L) @ map1(R)``. A method that is not such a map (a sign mask) turns an
update dense; :func:`truncated` re-factorises a dense update to a chosen rank by truncated SVD and says
how much it lost.

Nothing here knows a family's names: adapters are read and written in :mod:`transport.lora`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from transport.core.arch import Arch
from transport.core.axis_maps import TensorMap, apply_map, map_axis
from transport.core.layout import param_axes
from transport.core.task_vector import TaskVector
from transport.errors import TransportError

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class LowRank:
    """``scale * left @ right``: left [n0, r], right [r, n1]."""

    left: Tensor
    right: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise TransportError(f"low-rank factors {tuple(self.left.shape)} and {tuple(self.right.shape)} "
                                 "do not multiply")

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    def dense(self) -> Tensor:
        return (self.left @ self.right) * self.scale

    def mapped(self, tmap: TensorMap) -> "LowRank":
        """The factors of the transported product: axis 0's map on ``left``'s rows, axis 1's on ``right``'s columns."""
        if len(tmap.axes) != 2:
            raise TransportError(f"a low-rank update needs a map of 2 axes, {tmap.source} has {len(tmap.axes)}")
        return LowRank(map_axis(self.left, 0, tmap.axes[0]).contiguous(),
                       map_axis(self.right, 1, tmap.axes[1]).contiguous(), self.scale)


@dataclass
class LowRankTaskVector:
    """A task vector over canonical tensors of ``arch`` in three parts.

    ``factors``: exact low-rank updates; ``dense``: full-rank updates that were never low rank (biases,
    whole modules); ``densified``: updates that were low rank until a step that is not an axis map made
    them dense (to be re-factorised when written as an adapter). ``origin``: per tensor the source
    tensor it was transported from (itself before any transport).
    """

    arch: Arch
    factors: dict[str, LowRank]
    dense: dict[str, Tensor] = field(default_factory=dict)
    densified: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = param_axes(self.arch)
        seen: set[str] = set()
        for part in (self.factors, self.dense, self.densified):
            for k, v in part.items():
                if k not in info:
                    raise TransportError(f"low-rank task vector: {k} is not a canonical tensor of {self.arch.name}")
                if k in seen:
                    raise TransportError(f"low-rank task vector: {k} is given twice")
                seen.add(k)
                shape = v.shape if isinstance(v, LowRank) else tuple(v.shape)
                if tuple(shape) != info[k].shape:
                    raise TransportError(f"low-rank task vector: {k} is {tuple(shape)}, {self.arch.name} needs "
                                         f"{info[k].shape}")
        self.origin = {k: self.origin.get(k, k) for k in seen}

    def names(self) -> list[str]:
        """Every tensor with an update, in canonical order."""
        have = set(self.factors) | set(self.dense) | set(self.densified)
        return [k for k in param_axes(self.arch) if k in have]

    def tensors(self) -> dict[str, Tensor]:
        """Every update as a dense tensor."""
        out = {k: v.dense() for k, v in self.factors.items()}
        out.update(self.dense)
        out.update(self.densified)
        return {k: out[k] for k in self.names()}

    def to_task_vector(self) -> TaskVector:
        """The dense task vector (only the tensors with an update; the others read as zero)."""
        return TaskVector(self.arch, self.tensors(), self.meta)

    def transport(self, maps: Mapping[str, TensorMap], target: Arch) -> "LowRankTaskVector":
        """Every part moved by per-axis maps onto ``target``: factors stay factors (exact), dense stays dense.

        A target tensor whose source has no update is left out (zero)."""
        factors, dense, densified, origin = {}, {}, {}, {}
        for name, m in maps.items():
            src = m.source
            if src in self.factors:
                factors[name] = self.factors[src].mapped(m)
            elif src in self.dense:
                dense[name] = apply_map(self.dense[src], m)
            elif src in self.densified:
                densified[name] = apply_map(self.densified[src], m)
            else:
                continue
            origin[name] = self.origin.get(src, src)
        return LowRankTaskVector(target, factors, dense, densified, origin, dict(self.meta))

    def with_dense_update(self, moved: TaskVector) -> "LowRankTaskVector":
        """The result of a step that is not an axis map (``moved``: the step's output on this vector's dense
        tensors, same names): factors become ``densified``."""
        lost = [k for k in self.names() if k not in moved.tensors]
        if lost:
            raise TransportError(f"a transport step dropped tensors it was given: {', '.join(lost[:4])}")
        extra = [k for k, t in moved.tensors.items() if k not in self.origin and bool(t.abs().max() > 0)]
        if extra:  # an adapter can only carry updates of the tensors it had
            raise TransportError(f"a transport step made updates the adapter does not have: {', '.join(extra[:4])}")
        densified = {k: moved.tensors[k] for k in self.names() if k in self.factors or k in self.densified}
        dense = {k: moved.tensors[k] for k in self.dense}
        return LowRankTaskVector(moved.arch, {}, dense, densified, dict(self.origin), dict(self.meta))


@dataclass(frozen=True)
class Truncation:
    """A dense update re-factorised to ``rank``: the factors and what was lost.

    ``rel_error`` = ||D - scale L R||_F / ||D||_F of the float32 factors (0 for D = 0);
    ``tail`` = sqrt(sum_{i > rank} s_i^2) / sqrt(sum_i s_i^2) from D's float64 singular values (the
    Eckart-Young optimum, which ``rel_error`` equals up to float32 rounding)."""

    factors: LowRank
    rel_error: float
    tail: float
    singular_values: tuple[float, ...]


def truncated(D: Tensor, rank: int, scale: float = 1.0) -> Truncation:
    """The best rank-``rank`` approximation ``scale * L @ R`` of ``D`` [n0, n1] (float64 SVD; balanced factors
    ``L = U sqrt(S / scale)``, ``R = sqrt(S / scale) V^T``; each singular pair's sign fixed so that the
    largest entry of its left vector is positive, for outputs that do not depend on the LAPACK route)."""
    if D.dim() != 2:
        raise TransportError(f"truncated SVD needs a matrix, got a tensor of shape {tuple(D.shape)}")
    if rank < 1:
        raise TransportError(f"truncated SVD: rank must be >= 1, got {rank}")
    if not (scale > 0 and math.isfinite(scale)):
        raise TransportError(f"truncated SVD: scale must be a positive number, got {scale}")
    D64 = D.detach().to("cpu", torch.float64)
    U, all_s, Vh = torch.linalg.svd(D64, full_matrices=False)
    k = min(rank, all_s.numel())
    U, S, Vh = U[:, :k], all_s[:k], Vh[:k]
    flip = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))[0]
    flip[flip == 0] = 1.0
    U, Vh = U * flip, Vh * flip[:, None]
    root = (S / scale).sqrt()
    L, R = U * root, root[:, None] * Vh
    if k < rank:  # a rank above min(n0, n1): pad with zero directions so the adapter keeps the asked rank
        L = torch.cat([L, torch.zeros(L.shape[0], rank - k, dtype=L.dtype)], 1)
        R = torch.cat([R, torch.zeros(rank - k, R.shape[1], dtype=R.dtype)], 0)
    out = LowRank(L.float().contiguous(), R.float().contiguous(), float(scale))
    total = float(all_s.square().sum())
    norm = math.sqrt(total)
    err = float((D64 - out.left.double() @ out.right.double() * scale).norm())
    tail = math.sqrt(max(0.0, float(all_s[k:].square().sum()))) / norm if norm > 0 else 0.0
    return Truncation(out, err / norm if norm > 0 else 0.0, tail, tuple(float(s) for s in all_s))


def scale_of(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


__all__ = ["LowRank", "LowRankTaskVector", "Truncation", "truncated", "scale_of"]
