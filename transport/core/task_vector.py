"""Task vectors tau = theta_ft - theta_pre over the canonical tensors of one architecture.

They behave like tensors: ``tau1 + tau2``, ``tau1 - tau2``, ``-tau``, ``0.5 * tau``, ``sum([...])``.
Files in a family's own names are read and written by :mod:`transport.sources`
(``save_task_vector`` / ``load_task_vector``).
"""
from __future__ import annotations

import numbers
from typing import Iterator, Mapping

import torch

from transport.core.arch import Arch
from transport.core.layout import check_params, param_axes, same_shapes
from transport.errors import TransportError

Tensor = torch.Tensor


class TaskVector:
    """A dict of canonical tensors (all of the architecture's, or a subset) bound to one :class:`Arch`."""

    def __init__(self, arch: Arch, tensors: Mapping[str, Tensor], meta: Mapping[str, str] | None = None):
        known = param_axes(arch)
        bad = [k for k in tensors if k not in known]
        if bad:
            raise TransportError(f"task vector: unknown tensor names for {arch.name}: {', '.join(bad[:4])}")
        for k, t in tensors.items():
            if tuple(t.shape) != known[k].shape:
                raise TransportError(f"task vector: shape mismatch for {k}: got {tuple(t.shape)}, "
                                     f"{arch.name} needs {known[k].shape}")
        self.arch = arch
        self.tensors: dict[str, Tensor] = {k: tensors[k] for k in known if k in tensors}
        self.meta: dict[str, str] = dict(meta or {})
        self.absent: list[str] = []  # family tensors a loaded file lacked (read as zero): sources.load_task_vector

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_models(cls, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], arch: Arch,
                    meta: Mapping[str, str] | None = None) -> "TaskVector":
        """tau = finetuned - pretrained over every canonical tensor of ``arch`` (both checked first)."""
        check_params(dict(pretrained), arch, "pretrained model")
        check_params(dict(finetuned), arch, "fine-tuned model")
        return cls(arch, {k: finetuned[k].float() - pretrained[k].float() for k in param_axes(arch)}, meta)

    @classmethod
    def zeros_like(cls, arch: Arch) -> "TaskVector":
        return cls(arch, {k: torch.zeros(v.shape) for k, v in param_axes(arch).items()})

    # -- algebra ------------------------------------------------------------------------------
    def _check(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine a TaskVector with {type(other).__name__}")
        if not same_shapes(self.arch, other.arch) or set(self.tensors) != set(other.tensors):
            raise TransportError(f"task vectors do not match: {self.arch.name} vs {other.arch.name}")

    def _map(self, fn) -> "TaskVector":
        return TaskVector(self.arch, {k: fn(k, v) for k, v in self.tensors.items()}, self.meta)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._check(other)
        return self._map(lambda k, v: v + other.tensors[k])

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum() starts from 0
            return self
        return self.__add__(other)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check(other)
        return self._map(lambda k, v: v - other.tensors[k])

    def __neg__(self) -> "TaskVector":
        return self._map(lambda k, v: -v)

    def __mul__(self, c: float) -> "TaskVector":
        if not isinstance(c, numbers.Real):
            return NotImplemented
        return self._map(lambda k, v: v * float(c))

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "TaskVector":
        return self * (1.0 / float(c))

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, k: str) -> Tensor:
        return self.tensors[k]

    def items(self):
        return self.tensors.items()

    def keys(self):
        return self.tensors.keys()

    def norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.tensors.values())))

    def dot(self, other: "TaskVector") -> float:
        self._check(other)
        return float(sum((v.double() * other.tensors[k].double()).sum() for k, v in self.tensors.items()))

    def to(self, device: str | torch.device) -> "TaskVector":
        return TaskVector(self.arch, {k: v.to(device) for k, v in self.tensors.items()}, self.meta)

    def allclose(self, other: "TaskVector", atol: float = 0.0, rtol: float = 0.0) -> bool:
        self._check(other)
        return all(torch.allclose(v, other.tensors[k], atol=atol, rtol=rtol) for k, v in self.tensors.items())

    def restrict(self, layers: set[int] | None = None, keep_global: bool = True) -> "TaskVector":
        """A copy with tensors outside ``layers`` set to zero (embeddings / final LN / proj count as global).

        Used to ask which layers carry (or destroy) a transfer: transport only layers [i..j], or all but one.
        """
        info = param_axes(self.arch)

        def keep(k: str) -> bool:
            layer = info[k].layer
            return keep_global if layer < 0 else (layers is None or layer in layers)

        return self._map(lambda k, v: v if keep(k) else torch.zeros_like(v))

    def per_layer_norms(self) -> dict[int, float]:
        """Frobenius norm of the update per layer (-1: embeddings, final LayerNorm, projection)."""
        info = param_axes(self.arch)
        acc: dict[int, float] = {}
        for k, v in self.tensors.items():
            acc[info[k].layer] = acc.get(info[k].layer, 0.0) + float((v.double() ** 2).sum())
        return {l: a ** 0.5 for l, a in sorted(acc.items())}

    # -- use ----------------------------------------------------------------------------------
    def apply_to(self, params: Mapping[str, Tensor], alpha: float = 1.0) -> dict[str, Tensor]:
        """theta + alpha * tau as a new canonical dict (``params`` untouched)."""
        missing = [k for k in self.tensors if k not in params]
        if missing:
            raise TransportError(f"task vector does not fit the model: missing {', '.join(missing[:4])}")
        out = dict(params)
        for k, v in self.tensors.items():
            if tuple(params[k].shape) != tuple(v.shape):
                raise TransportError(f"task vector does not fit the model: {k} is {tuple(params[k].shape)}, "
                                     f"tau has {tuple(v.shape)}")
            out[k] = params[k] + alpha * v.to(params[k].device, params[k].dtype)
        return out


__all__ = ["TaskVector"]
