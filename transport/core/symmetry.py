"""Permutation symmetries, read off the axis table of :mod:`transport.core.layout`.

Permutation variables are the axis spaces of :func:`~transport.core.layout.param_axes`:

- ``res:0``, ``res:{l}a``, ``res:{l}m``: the residual segments (size d);
- ``mlp:{l}``: block l's MLP hidden units (size m); a gated MLP's gate and up rows and its down
  columns all live there, so they always move together;
- ``heads:{l}``: block l's attention heads, a structured :class:`HeadPermutation`: the order of the
  key/value groups, the order of the query heads inside each group (a query head never leaves its
  group), one within-head order shared by the group's query heads and its key head (so every q.k
  dot product is kept) and one shared by its value head and the matching columns of o.

Convention: a permutation ``p`` of a space acts on every axis in that space by ``new = old[p]``
(``new[i]`` is old unit ``p[i]``); a heads space gives each role (q, k, v, o) its own index vector
(:meth:`HeadPermutation.index`). A missing variable means the identity. Independent residual
permutations keep the function only when the skip connections become permutation matrices
(:func:`skip_matrices`); one permutation shared by every residual segment keeps it with plain skips.
Under rotary positions the q/k within-head order must stay the identity (it pairs dims with frequencies).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes, res_in, res_out
from transport.errors import TransportError

Tensor = torch.Tensor

KINDS = ("res", "res_shared", "mlp", "heads", "query", "within", "within_qk", "within_vo")
ROLES = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# the structured head permutation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class HeadPermutation:
    """Head symmetry of one attention layer with G key/value groups of r query heads of d_h dims.

    ``kv`` [G]: new group g is old group kv[g]; ``q`` [G, r]: its query slot j is old slot q[g, j] of that
    group; ``qk`` [G, d_h]: new dim i of the group's query and key heads is old dim qk[g, i]; ``vo``
    [G, d_h]: the same for its value head and the columns of o that read it.
    """

    kv: Tensor
    q: Tensor
    qk: Tensor
    vo: Tensor

    @property
    def groups(self) -> int:
        return int(self.kv.numel())

    @property
    def group_size(self) -> int:
        return int(self.q.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.qk.shape[1])

    def query_heads(self) -> Tensor:
        """[G, r]: the old query head behind each new query slot."""
        return self.kv[:, None] * self.group_size + self.q

    def index(self, role: str) -> Tensor:
        """The index vector ``new = old[index]`` of the rows (q, k, v) or columns (o) of ``role``."""
        dh = self.head_dim
        if role == "k":
            return (self.kv[:, None] * dh + self.qk).reshape(-1)
        if role == "v":
            return (self.kv[:, None] * dh + self.vo).reshape(-1)
        if role in ("q", "o"):
            within = self.qk if role == "q" else self.vo
            return (self.query_heads()[:, :, None] * dh + within[:, None, :]).reshape(-1)
        raise TransportError(f"unknown head role '{role}' (known: {', '.join(ROLES)})")

    def inverse(self) -> "HeadPermutation":
        inv_kv = torch.argsort(self.kv)
        return HeadPermutation(inv_kv, torch.argsort(self.q[inv_kv], dim=1), torch.argsort(self.qk[inv_kv], dim=1),
                               torch.argsort(self.vo[inv_kv], dim=1))

    def after(self, inner: "HeadPermutation") -> "HeadPermutation":
        """The permutation that applies ``inner`` first, then this one."""
        k = self.kv
        return HeadPermutation(inner.kv[k], inner.q[k].gather(1, self.q), inner.qk[k].gather(1, self.qk),
                               inner.vo[k].gather(1, self.vo))

    def to(self, device: str | torch.device) -> "HeadPermutation":
        return HeadPermutation(self.kv.to(device), self.q.to(device), self.qk.to(device), self.vo.to(device))

    def clone(self) -> "HeadPermutation":
        return HeadPermutation(self.kv.clone(), self.q.clone(), self.qk.clone(), self.vo.clone())

    def equal(self, other: "HeadPermutation") -> bool:
        return all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.parts(), other.parts()))

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.kv, self.q, self.qk, self.vo

    @classmethod
    def identity(cls, groups: int, group_size: int, head_dim: int) -> "HeadPermutation":
        return cls(torch.arange(groups), torch.arange(group_size).repeat(groups, 1),
                   torch.arange(head_dim).repeat(groups, 1), torch.arange(head_dim).repeat(groups, 1))


Perm = Union[Tensor, HeadPermutation]
Perms = dict[str, Perm]


def head_permutation(arch: Arch, kv: Tensor, qk: Tensor, vo: Tensor | None = None,
                     q: Tensor | None = None) -> HeadPermutation:
    """A :class:`HeadPermutation` of ``arch``'s heads (``vo`` defaults to ``qk``, ``q`` to no query moves)."""
    G, r, dh = arch.kv_heads, arch.group_size, arch.head_dim
    kv, qk = torch.as_tensor(kv, dtype=torch.long), torch.as_tensor(qk, dtype=torch.long)
    vo = qk.clone() if vo is None else torch.as_tensor(vo, dtype=torch.long)
    q = torch.arange(r).repeat(G, 1) if q is None else torch.as_tensor(q, dtype=torch.long)
    want = {"kv": (G,), "q": (G, r), "qk": (G, dh), "vo": (G, dh)}
    for name, t in zip(want, (kv, q, qk, vo)):
        if tuple(t.shape) != want[name]:
            raise TransportError(f"head permutation: {name} must be {list(want[name])}, got {list(t.shape)}")
    return HeadPermutation(kv, q, qk, vo)


def head_axis_permutation(sigma: Tensor, rho: Tensor, arch: Arch) -> Tensor:
    """The index of a heads axis from the head order sigma [H] and within-head orders rho [H, d_h] (no GQA)."""
    H, dh = arch.heads, arch.head_dim
    sigma, rho = torch.as_tensor(sigma, dtype=torch.long), torch.as_tensor(rho, dtype=torch.long)
    if tuple(sigma.shape) != (H,) or tuple(rho.shape) != (H, dh):
        raise TransportError(f"head permutation must be sigma [{H}] and rho [{H}, {dh}], "
                             f"got {tuple(sigma.shape)} and {tuple(rho.shape)}")
    return (sigma[:, None] * dh + rho).reshape(-1)


def split_head_permutation(a: Union[Tensor, "HeadPermutation"], arch: Arch, name: str = "heads") -> tuple[Tensor, Tensor]:
    """(sigma [H], rho [H, d_h]) of a head-structured index (or of a :class:`HeadPermutation` whose q/k and v/o
    orders agree, without grouped-query attention); raises if it mixes dimensions of two heads."""
    if isinstance(a, HeadPermutation):
        if arch.group_size != 1 or not torch.equal(a.qk, a.vo):
            raise TransportError(f"permutation {name}: no single (sigma, rho) describes it (grouped-query "
                                 "attention or separate q/k and v/o orders)")
        return a.kv.clone(), a.qk.clone()
    H, dh = arch.heads, arch.head_dim
    a = torch.as_tensor(a, dtype=torch.long).reshape(H, dh)
    sigma = a[:, 0] // dh
    rho = a - sigma[:, None] * dh
    if not bool(((a // dh) == sigma[:, None]).all()):
        raise TransportError(f"permutation {name} mixes dimensions of different heads")
    return sigma, rho


def from_head_index(a: Tensor, arch: Arch, name: str = "heads") -> HeadPermutation:
    """The :class:`HeadPermutation` of a single head-structured index shared by q, k, v and o (no GQA)."""
    if arch.group_size != 1:
        raise TransportError(f"{name}: a single head index cannot describe grouped-query attention "
                             f"({arch.heads} query heads in {arch.kv_heads} groups)")
    sigma, rho = split_head_permutation(a, arch, name)
    return head_permutation(arch, sigma, rho)


# ----------------------------------------------------------------------------------------------
# the variables
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PermVar:
    """One permutation variable: its space name, kind ('res' | 'mlp' | 'heads'), size and block.

    ``uses``: the (canonical tensor, axis, role) triples living in this space. ``size`` is the number of
    units (for a heads space: the width of the query heads, H d_h)."""

    name: str
    kind: str
    size: int
    layer: int  # -1 for res:0
    uses: tuple[tuple[str, int, str], ...]


def permutation_spec(arch: Arch) -> dict[str, PermVar]:
    """Every permutation variable of ``arch`` in chain order (res:0, heads:0, res:0a, mlp:0, res:0m, heads:1, ...)."""
    uses: dict[str, list[tuple[str, int, str]]] = {}
    for name, info in param_axes(arch).items():
        for ax, axis in enumerate(info.axes):
            if axis is not None and axis.space is not None:
                uses.setdefault(axis.space, []).append((name, ax, axis.role))
    order = ["res:0"]
    for l in range(arch.layers):
        order += [f"heads:{l}", f"res:{l}a", f"mlp:{l}"] + ([f"res:{l}m"] if f"res:{l}m" in uses else [])
    missing = [s for s in uses if s not in order]
    if missing:  # a space the spec does not know: refuse rather than silently ignore it
        raise TransportError(f"{arch.name}: axis spaces without a permutation rule: {', '.join(missing)}")
    out: dict[str, PermVar] = {}
    for s in order:
        kind = s.split(":")[0]
        layer = -1 if s == "res:0" else int(s.split(":")[1].rstrip("am"))
        size = arch.mlp_width if kind == "mlp" else arch.q_width if kind == "heads" else arch.width
        out[s] = PermVar(s, kind, size, layer, tuple(uses.get(s, ())))
    return out


def residual_names(arch: Arch) -> list[str]:
    return [s for s, v in permutation_spec(arch).items() if v.kind == "res"]


# ----------------------------------------------------------------------------------------------
# validity, inverse, composition, application
# ----------------------------------------------------------------------------------------------
def is_permutation(p: Tensor, n: int) -> bool:
    p = torch.as_tensor(p)
    if p.dim() != 1 or p.numel() != n or p.is_floating_point() or p.dtype == torch.bool:
        return False
    return bool((torch.sort(p.cpu().long()).values == torch.arange(n)).all())


def _rows_are_permutations(t: Tensor, n: int) -> bool:
    return all(is_permutation(row, n) for row in t)


def check_permutations(perms: Mapping[str, Perm], arch: Arch, what: str = "alignment") -> None:
    """One-line TransportError unless every entry is a valid permutation of a known variable.

    Heads entries must be :class:`HeadPermutation` (or, without grouped-query attention, a head-structured
    index); under rotary positions their q/k within-head order must be the identity.
    """
    spec = permutation_spec(arch)
    for name, p in perms.items():
        if name not in spec:
            raise TransportError(f"{what}: unknown permutation variable '{name}' for {arch.name}")
        if spec[name].kind != "heads":
            if isinstance(p, HeadPermutation) or not is_permutation(p, spec[name].size):
                raise TransportError(f"{what}: '{name}' is not a permutation of {spec[name].size} elements")
            continue
        hp = p if isinstance(p, HeadPermutation) else from_head_index(p, arch, f"{what}: '{name}'")
        G, r, dh = arch.kv_heads, arch.group_size, arch.head_dim
        ok = (is_permutation(hp.kv, G) and tuple(hp.q.shape) == (G, r) and _rows_are_permutations(hp.q, r)
              and tuple(hp.qk.shape) == (G, dh) and _rows_are_permutations(hp.qk, dh)
              and tuple(hp.vo.shape) == (G, dh) and _rows_are_permutations(hp.vo, dh))
        if not ok:
            raise TransportError(f"{what}: '{name}' is not a head permutation of {G} groups x {r} query heads "
                                 f"x {dh} dims")
        if arch.position == "rope" and not torch.equal(hp.qk.cpu(), torch.arange(dh).repeat(G, 1)):
            raise TransportError(f"{what}: '{name}' reorders query/key dims inside a head, which rotary positions "
                                 "do not allow (it pairs dims with frequencies)")


def as_structured(perms: Mapping[str, Perm], arch: Arch) -> Perms:
    """The same permutations with every heads entry as a :class:`HeadPermutation`."""
    spec = permutation_spec(arch)
    return {k: (from_head_index(v, arch, k) if spec[k].kind == "heads" and not isinstance(v, HeadPermutation)
                else v) for k, v in perms.items()}


def invert_permutation(p: Tensor) -> Tensor:
    p = torch.as_tensor(p, dtype=torch.long)
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


def invert(perms: Mapping[str, Perm]) -> Perms:
    return {k: v.inverse() if isinstance(v, HeadPermutation) else invert_permutation(v) for k, v in perms.items()}


def compose(outer: Mapping[str, Perm], inner: Mapping[str, Perm]) -> Perms:
    """The permutation that applies ``inner`` first, then ``outer`` (missing entries are identities)."""
    out: Perms = {}
    for k in list(dict.fromkeys([*outer, *inner])):
        if k in outer and k in inner:
            a, b = outer[k], inner[k]
            if isinstance(a, HeadPermutation) or isinstance(b, HeadPermutation):
                if not (isinstance(a, HeadPermutation) and isinstance(b, HeadPermutation)):
                    raise TransportError(f"compose: '{k}' mixes a head permutation and an index")
                out[k] = a.after(b)
            else:
                out[k] = b[a]
        else:
            out[k] = (outer[k] if k in outer else inner[k]).clone()
    return out


def identity_permutation(arch: Arch) -> Perms:
    return {s: (HeadPermutation.identity(arch.kv_heads, arch.group_size, arch.head_dim) if v.kind == "heads"
                else torch.arange(v.size)) for s, v in permutation_spec(arch).items()}


def axis_index(p: Perm, role: str) -> Tensor:
    """The index vector a permutation applies to an axis of ``role``."""
    return p.index(role) if isinstance(p, HeadPermutation) else p


def apply_permutation(params: Mapping[str, Tensor], perms: Mapping[str, Perm], arch: Arch,
                      inverse: bool = False) -> dict[str, Tensor]:
    """``params`` (all canonical tensors of ``arch`` or a subset) with every axis permuted by its space's perm.

    The one implementation every method, the zoo and the tests use (a task vector permutes the same way:
    the map is linear).
    """
    info = param_axes(arch)
    p = invert(perms) if inverse else perms
    out: dict[str, Tensor] = {}
    for name, t in params.items():
        if name not in info:
            raise TransportError(f"cannot permute '{name}': not a canonical tensor of {arch.name}")
        for ax, axis in enumerate(info[name].axes):
            if axis is not None and axis.space in p:
                t = t.index_select(ax, axis_index(p[axis.space], axis.role).to(t.device))
        out[name] = t
    return out


def skip_matrices(perms: Mapping[str, Perm], arch: Arch) -> dict[str, Tensor]:
    """Skip connections as permutation matrices P_out P_in^T (keys as :func:`transport.core.forward.encode` takes)."""
    eye = torch.eye(arch.width)

    def P(space: str) -> Tensor:
        return eye[perms[space]] if space in perms else eye

    out = {}
    for l in range(arch.layers):
        after = res_out(arch) if l == arch.layers - 1 else f"res:{l}m"
        out[f"blocks.{l}.attn"] = P(f"res:{l}a") @ P(res_in(l)).t()
        out[f"blocks.{l}.mlp"] = P(after) @ P(f"res:{l}a").t()
    return out


def random_permutation(arch: Arch, seed: int = 0, kinds: Iterable[str] = ("res", "mlp", "heads", "within")) -> Perms:
    """Random permutations of the chosen kinds (others identity), seeded.

    kinds: 'res' (independent residual perms), 'res_shared' (one perm for every residual segment), 'mlp',
    'heads' (order of the key/value groups, each with its query heads), 'query' (query heads inside their
    group), 'within' (one within-head order shared by q, k, v and o: the paper's group), 'within_qk' and
    'within_vo' (the two orders drawn independently). Under rotary positions the q/k order stays the
    identity and 'within' reorders v/o only.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise TransportError(f"unknown permutation kind(s) {', '.join(bad)} (known: {', '.join(KINDS)})")
    if "res" in kinds and "res_shared" in kinds:
        raise TransportError("choose 'res' (independent) or 'res_shared', not both")
    if arch.position == "rope" and "within_qk" in kinds:
        raise TransportError(f"{arch.name}: rotary positions do not allow reordering query/key dims in a head")
    g = torch.Generator().manual_seed(int(seed))
    G, r, dh, d = arch.kv_heads, arch.group_size, arch.head_dim, arch.width

    def draw(n: int, on: bool) -> Tensor:
        return torch.randperm(n, generator=g) if on else torch.arange(n)

    def rows(n: int, count: int, on: bool) -> Tensor:
        return torch.stack([torch.randperm(n, generator=g) for _ in range(count)]) if on \
            else torch.arange(n).repeat(count, 1)

    shared = torch.randperm(d, generator=g) if "res_shared" in kinds else None
    out: Perms = {}
    for s, v in permutation_spec(arch).items():
        if v.kind == "res":
            out[s] = draw(d, "res" in kinds) if shared is None else shared.clone()
        elif v.kind == "mlp":
            out[s] = draw(v.size, "mlp" in kinds)
        else:
            kv = draw(G, "heads" in kinds)
            q = rows(r, G, "query" in kinds and r > 1)
            rope = arch.position == "rope"
            qk = rows(dh, G, ("within" in kinds or "within_qk" in kinds) and not rope)
            if "within_vo" in kinds or ("within" in kinds and rope):
                vo = rows(dh, G, True)
            else:
                vo = qk.clone() if "within" in kinds else torch.arange(dh).repeat(G, 1)
            out[s] = HeadPermutation(kv, q, qk, vo)
    return out


def perm_equal(a: Perm, b: Perm) -> bool:
    """Two permutations of one space are the same (index vectors or head permutations)."""
    if isinstance(a, HeadPermutation) or isinstance(b, HeadPermutation):
        return isinstance(a, HeadPermutation) and isinstance(b, HeadPermutation) and a.equal(b)
    return torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())


def is_identity(p: Perm) -> bool:
    if isinstance(p, HeadPermutation):
        return all(is_identity(row) for t in p.parts() for row in (t if t.dim() == 2 else [t]))
    return torch.equal(torch.as_tensor(p).cpu(), torch.arange(torch.as_tensor(p).numel()))


def fixed_points(p: Perm) -> int:
    """How many units a permutation leaves in place (n = identity; heads: query rows, q/k order)."""
    t = p.index("q") if isinstance(p, HeadPermutation) else torch.as_tensor(p)
    return int((t.cpu() == torch.arange(t.numel())).sum())


def flatten(perms: Mapping[str, Perm]) -> dict[str, Tensor]:
    """Plain tensors for saving: a heads entry becomes ``NAME/kv``, ``NAME/q``, ``NAME/qk``, ``NAME/vo``."""
    out: dict[str, Tensor] = {}
    for k, v in perms.items():
        if isinstance(v, HeadPermutation):
            out.update({f"{k}/{part}": t for part, t in zip(("kv", "q", "qk", "vo"), v.parts())})
        else:
            out[k] = v
    return out


def unflatten(tensors: Mapping[str, Tensor], arch: Arch, what: str = "permutations") -> Perms:
    """The inverse of :func:`flatten`; a single ``heads:l`` index of older files becomes a HeadPermutation."""
    out: Perms = {}
    for k, v in tensors.items():
        base, sep, part = k.partition("/")
        if sep:
            continue
        out[k] = from_head_index(v, arch, f"{what}: '{k}'") if k.startswith("heads:") else v.long()
    heads = sorted({k.partition("/")[0] for k in tensors if "/" in k})
    for h in heads:
        try:
            out[h] = HeadPermutation(*(tensors[f"{h}/{p}"].long() for p in ("kv", "q", "qk", "vo")))
        except KeyError as e:
            raise TransportError(f"{what}: head permutation '{h}' lacks its part {e}") from None
    return out


__all__ = [
    "HeadPermutation", "Perm", "Perms", "PermVar", "head_permutation", "head_axis_permutation",
    "split_head_permutation", "from_head_index", "permutation_spec", "residual_names", "is_permutation",
    "check_permutations", "as_structured", "invert_permutation", "invert", "compose", "identity_permutation",
    "axis_index", "apply_permutation", "skip_matrices", "random_permutation", "fixed_points", "flatten",
    "perm_equal", "is_identity",
    "unflatten",
]
