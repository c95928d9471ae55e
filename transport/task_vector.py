"""Task vectors tau = theta_ft - theta_pre over the canonical tensors of one architecture.

They behave like tensors: ``tau1 + tau2``, ``tau1 - tau2``, ``-tau``, ``0.5 * tau``, ``sum([...])``.
Saved as safetensors in the architecture's OWN family names (open_clip in_proj re-fused), with
string metadata, so a saved file loads with plain ``safetensors`` and adds onto a standard model.
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from transport import __version__
from transport.arch import ViTArch, check_params, from_canonical, param_axes, to_canonical
from transport.errors import TransportError

Tensor = torch.Tensor


class TaskVector:
    """A dict of canonical tensors (all of the architecture's, or a subset) bound to one :class:`ViTArch`."""

    def __init__(self, arch: ViTArch, tensors: Mapping[str, Tensor], meta: Mapping[str, str] | None = None):
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
        self.absent: list[str] = []  # family tensors a loaded file lacked (read as zero), see load

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_models(cls, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], arch: ViTArch,
                    meta: Mapping[str, str] | None = None) -> "TaskVector":
        """tau = finetuned - pretrained over every canonical tensor of ``arch`` (both checked first)."""
        check_params(dict(pretrained), arch, "pretrained model")
        check_params(dict(finetuned), arch, "fine-tuned model")
        return cls(arch, {k: finetuned[k].float() - pretrained[k].float() for k in param_axes(arch)}, meta)

    @classmethod
    def zeros_like(cls, arch: ViTArch) -> "TaskVector":
        return cls(arch, {k: torch.zeros(v.shape) for k, v in param_axes(arch).items()})

    # -- algebra ------------------------------------------------------------------------------
    def _check(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine a TaskVector with {type(other).__name__}")
        if not self.arch.same_shapes(other.arch) or set(self.tensors) != set(other.tensors):
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

    # -- files --------------------------------------------------------------------------------
    def family_state_dict(self) -> dict[str, Tensor]:
        """Tensors in the architecture's own family names and shapes (open_clip q/k/v re-fused)."""
        present = _family_keys_for(self.arch, set(self.tensors))
        full = {k: self.tensors.get(k, torch.zeros(v.shape)) for k, v in param_axes(self.arch).items()}
        return {k: v for k, v in from_canonical(full, self.arch).items() if k in present}

    def save(self, path: str | os.PathLike, **meta: str) -> Path:
        """Write atomically (temp file + rename), byte-identical for identical content; metadata: arch,
        version and any string fields given."""
        from transport.io import write_safetensors

        md = {**self.meta, **{k: str(v) for k, v in meta.items()}, "arch": self.arch.to_json(),
              "format": "transport.task_vector", "transport_version": __version__}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.family_state_dict().items()}
        return write_safetensors(path, tensors, md)

    @classmethod
    def load(cls, path: str | os.PathLike, arch: ViTArch | None = None, trust_pickle: bool = False) -> "TaskVector":
        """Read a task vector: one :meth:`save` wrote, or family-named tensors in any form a checkpoint
        may take (safetensors or a ``weights_only`` .pt, wrapped, prefixed, a full CLIP dict's visual
        tower, an ImageClassifier's image encoder) plus an explicit ``arch``.

        Tensors the file lacks (e.g. only the transformer blocks were fine-tuned) are zero; their
        family names are in ``absent``.
        """
        from transport.arch import family
        from transport.io import check_family_tensors, family_shapes, read_checkpoint, resolve_arch, tower_state_dict

        sd, md = read_checkpoint(path, trust_pickle)
        if arch is None and "arch" not in md:
            raise TransportError(f"{path}: no architecture in the file's metadata; pass --arch")
        arch = resolve_arch(path, md, arch)
        fam = family(arch)
        alias = fam.alias or (lambda k: k)
        tower = {alias(k): v for k, v in tower_state_dict(sd, arch).items()}
        shapes = family_shapes(arch)
        unknown = [k for k in tower if k not in shapes and not k.startswith(fam.ignorable)]
        if unknown:
            raise TransportError(f"{path}: unexpected keys for {arch.name}: {', '.join(unknown[:4])}"
                                 + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else ""))
        tower = {k: v for k, v in tower.items() if k in shapes}
        if not tower:
            raise TransportError(f"{path}: holds none of the tensors of {arch.name}")
        check_family_tensors(tower, arch, str(path))
        absent = [k for k in shapes if k not in tower]
        full = {k: tower[k].float() if k in tower else torch.zeros(shape) for k, shape in shapes.items()}
        canon = to_canonical(full, arch, what=str(path))
        tv = cls(arch, canon, {k: v for k, v in md.items() if k not in ("arch",)})
        tv.absent = absent
        return tv


def _family_keys_for(arch: ViTArch, canon: set[str]) -> set[str]:
    """Family keys whose every canonical part is in ``canon``."""
    from transport.arch import family

    parts: dict[str, set[str]] = {}
    for e in family(arch).table(arch):
        parts.setdefault(e.key, set()).add(e.canon)
    return {k for k, cs in parts.items() if cs <= canon}
