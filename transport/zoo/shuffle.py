"""The zoo's function-preserving edits of a model: hidden shuffles (its symmetries) and a 2x widening.

A shuffle is a :data:`~transport.core.symmetry.Perms` with ONE permutation shared by every residual
space (skip connections add them unchanged), whole heads moved with one within-head order shared by q, k,
v and o (the symmetry group TransFusion searches, so the control pair has an exact answer) and MLP units
moved. It is stored in the zoo's files as ``res`` plus per block ``heads``, ``qk``, ``vo`` and ``mlp``
index vectors (the format of earlier releases).
"""
from __future__ import annotations

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.symmetry import (
    HeadPermutation,
    Perms,
    apply_permutation,
    random_permutation,
    split_head_permutation,
)
from transport.errors import TransportError

Tensor = torch.Tensor


def random_shuffle(arch: Arch, seed: int) -> Perms:
    """A uniformly random function-preserving shuffle of ``arch``'s units (seeded)."""
    return random_permutation(arch, seed, kinds=("res_shared", "mlp", "heads", "within"))


def shuffle_tensors(perms: Perms, arch: Arch) -> dict[str, Tensor]:
    """The zoo's file format of a shuffle (one shared residual permutation)."""
    res = perms["res:0"]
    out = {"res": res}
    for l in range(arch.layers):
        hp: HeadPermutation = perms[f"heads:{l}"]  # type: ignore[assignment]
        out.update({f"blocks.{l}.heads": hp.kv, f"blocks.{l}.qk": hp.index("k"), f"blocks.{l}.vo": hp.index("v"),
                    f"blocks.{l}.mlp": perms[f"mlp:{l}"]})
    return out


def shuffle_from_tensors(t: dict[str, Tensor], arch: Arch) -> Perms:
    """The :data:`Perms` of a stored shuffle (every residual space gets the shared ``res``)."""
    from transport.core.symmetry import permutation_spec

    perms: Perms = {}
    for s, v in permutation_spec(arch).items():
        if v.kind == "res":
            perms[s] = t["res"].long()
        elif v.kind == "mlp":
            perms[s] = t[f"blocks.{v.layer}.mlp"].long()
        else:
            kv, qk = split_head_permutation(t[f"blocks.{v.layer}.qk"], arch)
            _, vo = split_head_permutation(t[f"blocks.{v.layer}.vo"], arch)
            perms[s] = HeadPermutation(kv, torch.zeros(arch.kv_heads, 1, dtype=torch.long), qk, vo)
    return perms


# ----------------------------------------------------------------------------------------------
# function-preserving widening (Net2Net-style duplication)
# ----------------------------------------------------------------------------------------------
_READS = ("read", "down", "o")  # input axes of linear maps (and the projection's rows)


def check_growable(arch: Arch, wide: Arch) -> None:
    ok = (wide.width == 2 * arch.width and wide.heads == 2 * arch.heads and wide.mlp_width == 2 * arch.mlp_width
          and wide.head_dim == arch.head_dim and wide.kv_heads == 2 * arch.kv_heads
          and not wide.differences(arch, ignore=("name", "width", "heads", "kv_heads", "mlp_width")))
    if not ok:
        raise TransportError(f"cannot grow {arch.name} into {wide.name}: need 2x width, 2x heads of the same head "
                             "dim, 2x MLP width and everything else equal")


def grow_params(params: dict[str, Tensor], arch: Arch, wide: Arch) -> dict[str, Tensor]:
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
        for axis, a in enumerate(info[k].axes):
            if a is None or a.space is None:
                continue
            t = torch.cat([t, t], dim=axis)
            if a.role in _READS:
                t = t * 0.5
        if tuple(t.shape) != winfo[k].shape:  # pragma: no cover - guarded by check_growable
            raise TransportError(f"grow: {k} became {tuple(t.shape)}, expected {winfo[k].shape}")
        out[k] = t.contiguous()
    return out


def widening_map(tensors: dict[str, Tensor], arch: Arch, wide: Arch, shuffle: Perms) -> dict[str, Tensor]:
    """The known cross-width map of W_grown: widen (as W_grown was grown from A), then its hidden shuffle.

    Linear, so it carries a task vector of A to W_grown's basis (before W_grown's own further training)."""
    return apply_permutation(grow_params(tensors, arch, wide), shuffle, wide)


__all__ = ["random_shuffle", "shuffle_tensors", "shuffle_from_tensors", "check_growable", "grow_params",
           "widening_map"]
