"""Moving a tower alone: source and target towers that differ only in their output projection.

Two CLIP image towers can be the same transformer with a different final projection (``output_dim`` 512 vs
768, or a projection on one side only). The same-architecture methods then see different tensors and refuse;
with ``tower_only`` the source is viewed in the target's architecture: every tensor both towers share in
shape and role is kept, and the projection is replaced by zeros (or dropped when the target has none). Its
update is then exactly zero for every method (a permutation of zeros, a mask of zeros), the target keeps its
own projection, and weight matching gets no pull from it (zeros score 0 under every permutation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from transport.core.layout import canonical_shapes, same_shapes
from transport.core.model import Model
from transport.errors import TransportError
from transport.methods import COSMETIC, only_projection_differs


@dataclass(frozen=True)
class TowerView:
    """The source models in the target's architecture and the tensors left out of the transport."""

    source_pre: Model
    source_ft: Model
    left_out: dict[str, str]  # tensor name -> why its update is zero or dropped


def tower_view(source_pre: Model, source_ft: Model, target: Model) -> TowerView:
    """The source models viewed in the target's architecture (see the module docstring); one-line errors when the
    towers differ in more than the projection."""
    a, b = source_pre.arch, target.arch
    if same_shapes(a, b):
        return TowerView(source_pre, source_ft, {})
    if not only_projection_differs(a, b):
        diff = ", ".join(a.differences(b, ignore=COSMETIC)) or "tensor shapes"
        raise TransportError(f"--tower-only: {source_pre.ref} and {target.ref} differ in more than the output "
                             f"projection ({diff}); the towers themselves must match")
    arch = dataclasses.replace(a, output_dim=b.output_dim)
    shapes = canonical_shapes(arch)
    mine = canonical_shapes(a)
    left_out: dict[str, str] = {}
    for k in sorted(set(mine) | set(shapes)):
        if k in shapes and mine.get(k) == shapes[k]:
            continue
        if k not in shapes:
            left_out[k] = f"the target has no output projection (source {tuple(mine[k])}): dropped"
        elif k not in mine:
            left_out[k] = f"the source has no output projection (target {tuple(shapes[k])}): update left at zero"
        else:
            left_out[k] = (f"output projection {tuple(mine[k])} in the source, {tuple(shapes[k])} in the target: "
                           "update left at zero")

    def view(m: Model) -> Model:
        dtype = next(iter(m.params.values())).dtype
        params = {k: m.params[k] if mine.get(k) == shape else torch.zeros(shape, dtype=dtype)
                  for k, shape in shapes.items()}
        return Model(arch, params, m.ref, None, None, dict(m.meta), m.tokenizer)

    return TowerView(view(source_pre), view(source_ft), left_out)


def left_out_line(left_out: dict[str, str]) -> str:
    """The console / report line naming each tensor left out of a tower-only transport and why."""
    return "tower only: left out of the transport: " + "; ".join(f"{k} ({why})" for k, why in left_out.items())


__all__ = ["TowerView", "tower_view", "left_out_line"]
