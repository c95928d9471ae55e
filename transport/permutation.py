"""Permutation symmetries of a pre-LN vision transformer, read off the axis table of :mod:`transport.arch`.

Permutation variables (their names are the axis spaces of :func:`transport.arch.param_axes`):

- ``res:0``, ``res:{l}a``, ``res:{l}m``: the 2L+1 residual segments (size d);
- ``mlp:{l}``: block l's MLP hidden units (size m);
- ``heads:{l}``: block l's concatenated heads (size d) with head structure: the index
  ``a[h*d_h + k] = sigma[h]*d_h + rho[h][k]`` moves whole heads (``sigma``) and reorders the dimensions
  inside each head (``rho``), never mixing two heads.

Convention: a permutation ``p`` of a space acts on every axis in that space by ``new = old[p]``
(``new[i]`` is old unit ``p[i]``). A missing variable means the identity. Independent residual
permutations keep the function only when the skip connections become permutation matrices
(:func:`skip_matrices`); one permutation shared by all residual segments keeps it with plain skips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from transport.arch import ViTArch, param_axes, res_in
from transport.errors import TransportError

Tensor = torch.Tensor
Perms = dict[str, Tensor]

KINDS = ("res", "res_shared", "mlp", "heads", "within")


@dataclass(frozen=True)
class PermVar:
    """One permutation variable: its space name, kind ('res' | 'mlp' | 'heads'), size and block."""

    name: str
    kind: str
    size: int
    layer: int  # -1 for res:0
    uses: tuple[tuple[str, int], ...]  # (canonical tensor, axis) pairs living in this space


def permutation_spec(arch: ViTArch) -> dict[str, PermVar]:
    """Every permutation variable of ``arch`` in chain order (res:0, heads:0, res:0a, mlp:0, res:0m, heads:1, ...)."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for name, info in param_axes(arch).items():
        for ax, space in enumerate(info.axes):
            if space is not None:
                uses.setdefault(space, []).append((name, ax))
    order = ["res:0"]
    for l in range(arch.layers):
        order += [f"heads:{l}", f"res:{l}a", f"mlp:{l}", f"res:{l}m"]
    missing = [s for s in uses if s not in order]
    if missing:  # a space the spec does not know: refuse rather than silently ignore it
        raise TransportError(f"{arch.name}: axis spaces without a permutation rule: {', '.join(missing)}")
    out: dict[str, PermVar] = {}
    for s in order:
        kind = s.split(":")[0]
        layer = -1 if s == "res:0" else int(s.split(":")[1].rstrip("am"))
        size = arch.mlp_width if kind == "mlp" else arch.width
        out[s] = PermVar(s, kind, size, layer, tuple(uses.get(s, ())))
    return out


def residual_names(arch: ViTArch) -> list[str]:
    return ["res:0"] + [f"res:{l}{x}" for l in range(arch.layers) for x in "am"]


# ----------------------------------------------------------------------------------------------
# head structure
# ----------------------------------------------------------------------------------------------
def head_axis_permutation(sigma: Tensor, rho: Tensor, arch: ViTArch) -> Tensor:
    """The d-long index of a heads space from the head permutation sigma [H] and within-head perms rho [H, d_h]."""
    H, dh = arch.heads, arch.head_dim
    sigma, rho = torch.as_tensor(sigma, dtype=torch.long), torch.as_tensor(rho, dtype=torch.long)
    if tuple(sigma.shape) != (H,) or tuple(rho.shape) != (H, dh):
        raise TransportError(f"head permutation must be sigma [{H}] and rho [{H}, {dh}], "
                             f"got {tuple(sigma.shape)} and {tuple(rho.shape)}")
    return (sigma[:, None] * dh + rho).reshape(-1)


def split_head_permutation(a: Tensor, arch: ViTArch, name: str = "heads") -> tuple[Tensor, Tensor]:
    """(sigma [H], rho [H, d_h]) of a head-structured index; raises if it mixes dimensions of two heads."""
    H, dh = arch.heads, arch.head_dim
    a = torch.as_tensor(a, dtype=torch.long).reshape(H, dh)
    sigma = a[:, 0] // dh
    rho = a - sigma[:, None] * dh
    if not bool(((a // dh) == sigma[:, None]).all()):
        raise TransportError(f"permutation {name} mixes dimensions of different heads")
    return sigma, rho


# ----------------------------------------------------------------------------------------------
# validity, inverse, application
# ----------------------------------------------------------------------------------------------
def is_permutation(p: Tensor, n: int) -> bool:
    p = torch.as_tensor(p)
    if p.dim() != 1 or p.numel() != n or p.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        return False
    return bool((torch.sort(p.cpu().long()).values == torch.arange(n)).all())


def check_permutations(perms: Mapping[str, Tensor], arch: ViTArch, what: str = "alignment") -> None:
    """One-line TransportError unless every entry is a valid permutation of a known variable (heads: head-structured)."""
    spec = permutation_spec(arch)
    for name, p in perms.items():
        if name not in spec:
            raise TransportError(f"{what}: unknown permutation variable '{name}' for {arch.name}")
        if not is_permutation(p, spec[name].size):
            raise TransportError(f"{what}: '{name}' is not a permutation of {spec[name].size} elements")
        if spec[name].kind == "heads":
            split_head_permutation(p, arch, f"{what}: '{name}'")


def invert_permutation(p: Tensor) -> Tensor:
    p = torch.as_tensor(p, dtype=torch.long)
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


def invert(perms: Mapping[str, Tensor]) -> Perms:
    return {k: invert_permutation(v) for k, v in perms.items()}


def compose(outer: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> Perms:
    """The permutation that applies ``inner`` first, then ``outer`` (missing entries are identities)."""
    out: Perms = {}
    for k in set(outer) | set(inner):
        if k in outer and k in inner:
            out[k] = inner[k][outer[k]]
        else:
            out[k] = (outer.get(k) if k in outer else inner[k]).clone()
    return out


def identity_permutation(arch: ViTArch) -> Perms:
    return {s: torch.arange(v.size) for s, v in permutation_spec(arch).items()}


def apply_permutation(params: Mapping[str, Tensor], perms: Mapping[str, Tensor], arch: ViTArch,
                      inverse: bool = False) -> dict[str, Tensor]:
    """``params`` (all canonical tensors of ``arch`` or a subset) with every axis permuted by its space's perm."""
    info = param_axes(arch)
    p = invert(perms) if inverse else perms
    out: dict[str, Tensor] = {}
    for name, t in params.items():
        if name not in info:
            raise TransportError(f"cannot permute '{name}': not a canonical tensor of {arch.name}")
        for ax, space in enumerate(info[name].axes):
            if space is not None and space in p:
                t = t.index_select(ax, p[space].to(t.device))
        out[name] = t
    return out


def skip_matrices(perms: Mapping[str, Tensor], arch: ViTArch) -> dict[str, Tensor]:
    """Skip connections as permutation matrices P_out P_in^T (keys as :func:`transport.functional.encode` takes)."""
    d = arch.width
    eye = torch.eye(d)

    def P(space: str) -> Tensor:
        return eye[perms[space]] if space in perms else eye

    out = {}
    for l in range(arch.layers):
        out[f"blocks.{l}.attn"] = P(f"res:{l}a") @ P(res_in(l)).t()
        out[f"blocks.{l}.mlp"] = P(f"res:{l}m") @ P(f"res:{l}a").t()
    return out


def random_permutation(arch: ViTArch, seed: int = 0, kinds: Iterable[str] = ("res", "mlp", "heads", "within")) -> Perms:
    """Random permutations of the chosen kinds (others identity), seeded.

    kinds: 'res' (2L+1 independent residual perms), 'res_shared' (one perm for every residual segment),
    'mlp', 'heads' (order of whole heads) and 'within' (dimensions inside each head).
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise TransportError(f"unknown permutation kind(s) {', '.join(bad)} (known: {', '.join(KINDS)})")
    if "res" in kinds and "res_shared" in kinds:
        raise TransportError("choose 'res' (independent) or 'res_shared', not both")
    g = torch.Generator().manual_seed(int(seed))
    H, dh, d = arch.heads, arch.head_dim, arch.width
    shared = torch.randperm(d, generator=g) if "res_shared" in kinds else None
    out: Perms = {}
    for s, v in permutation_spec(arch).items():
        if v.kind == "res":
            out[s] = (torch.randperm(d, generator=g) if "res" in kinds
                      else shared.clone() if shared is not None else torch.arange(d))
        elif v.kind == "mlp":
            out[s] = torch.randperm(v.size, generator=g) if "mlp" in kinds else torch.arange(v.size)
        else:
            sigma = torch.randperm(H, generator=g) if "heads" in kinds else torch.arange(H)
            rho = (torch.stack([torch.randperm(dh, generator=g) for _ in range(H)]) if "within" in kinds
                   else torch.arange(dh).repeat(H, 1))
            out[s] = head_axis_permutation(sigma, rho, arch)
    return out


def fixed_points(p: Tensor) -> int:
    """How many units a permutation leaves in place (n = identity)."""
    p = torch.as_tensor(p)
    return int((p.cpu() == torch.arange(p.numel())).sum())


__all__ = [
    "PermVar", "Perms", "permutation_spec", "residual_names", "head_axis_permutation", "split_head_permutation",
    "is_permutation", "check_permutations", "invert_permutation", "invert", "compose", "identity_permutation",
    "apply_permutation", "skip_matrices", "random_permutation", "fixed_points",
]
