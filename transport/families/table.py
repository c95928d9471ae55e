"""Name tables: a family's own parameter names <-> the canonical layout, as data (JSON files in ``tables/``).

A table lists entries ``[canonical name, family key, how]`` with ``{l}`` standing for the block index.
An entry whose canonical tensor the architecture does not have (a bias it lacks, a projection it does
not make) is simply not used, so one table serves every configuration of a family. ``how``:

- ``same``: the tensor as it is;
- ``transpose``: stored transposed (``x @ W`` conventions: Conv1D, projections);
- ``unsqueeze0`` / ``unsqueeze1``: stored with leading singleton axes ([1, T, d] / [1, 1, d]);
- ``fused:i``: part i of a concatenation along axis 0 of the canonical tensors that share the key (their
  sizes come from the canonical shapes, so q, k and v of grouped-query attention split correctly);
- ``fused_t:i``: the same concatenation stored transposed (concatenated along axis 1);
- ``tied``: a second name of the same tensor (an unembedding tied to the token embedding): written as a
  copy, optional on reading, and refused when present with other values.

Translation is bit-exact in both directions (tested per family).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.layout import canonical_shapes, check_params, param_axes
from transport.core.streamed import StreamedParams
from transport.errors import TransportError
from transport.files import LazyWeights

Tensor = torch.Tensor
TABLES = Path(__file__).parent / "tables"
HOWS = ("same", "transpose", "unsqueeze0", "unsqueeze1", "fused", "fused_t", "tied")


@dataclass(frozen=True)
class Entry:
    canon: str
    key: str
    how: str = "same"

    @property
    def kind(self) -> str:
        return self.how.split(":")[0]

    @property
    def part(self) -> int:
        return int(self.how.split(":")[1]) if ":" in self.how else 0


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


@dataclass(frozen=True)
class NameTable:
    """One family's names (see the module docstring); ``ignore``: regular expressions (full match) of keys
    that are legitimately present but not part of the transported tower (buffers, poolers); ``aliases``:
    (regex, replacement) for older spellings of keys."""

    family: str
    entries: tuple[Entry, ...]
    ignore: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, path: str | Path) -> "NameTable":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            entries = tuple(Entry(*e) for e in d["entries"])
            table = cls(d["family"], entries, tuple(d.get("ignore", ())), tuple(tuple(a) for a in d.get("aliases", ())))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TransportError(f"{path}: malformed name table ({type(e).__name__}: {e})") from None
        bad = [e.how for e in entries if e.kind not in HOWS]
        if bad:
            raise TransportError(f"{path}: unknown 'how' {', '.join(sorted(set(bad)))} (known: {', '.join(HOWS)})")
        return table

    def expand(self, arch: Arch) -> list[Entry]:
        """The entries for ``arch``: ``{l}`` instantiated per block, only canonical tensors the arch has."""
        info = param_axes(arch)
        out: list[Entry] = []
        for e in self.entries:
            layers = range(arch.layers) if "{l}" in e.canon else (None,)
            for l in layers:
                canon = e.canon if l is None else e.canon.replace("{l}", str(l))
                if canon in info and (e.kind != "tied" or arch.tied_embeddings):
                    out.append(Entry(canon, e.key if l is None else e.key.replace("{l}", str(l)), e.how))
        order = {k: i for i, k in enumerate(info)}
        return sorted(out, key=lambda e: order[e.canon])  # the canonical order, block by block

    def keys(self, arch: Arch) -> list[str]:
        return list(dict.fromkeys(e.key for e in self.expand(arch)))

    def alias(self, key: str) -> str:
        for pat, rep in self.aliases:
            new, n = re.subn(pat, rep, key)
            if n:
                return new
        return key

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)

    def _fused_sizes(self, entries: list[Entry], arch: Arch) -> dict[str, list[tuple[int, str]]]:
        """Key -> [(size, canonical name)] of the parts of each fused key, in part order."""
        shapes = {k: v.shape for k, v in param_axes(arch).items()}
        groups: dict[str, list[Entry]] = {}
        for e in entries:
            if e.kind in ("fused", "fused_t"):
                groups.setdefault(e.key, []).append(e)
        return {k: [(shapes[e.canon][0], e.canon) for e in sorted(es, key=lambda x: x.part)] for k, es in groups.items()}

    def aliased(self, sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """``sd`` under current key spellings (a :class:`~transport.files.LazyWeights` stays unread)."""
        if not self.aliases:
            return sd
        if isinstance(sd, LazyWeights):
            return sd.renamed(self.alias)
        return {self.alias(k): v for k, v in sd.items()}

    def _entries(self, sd: Mapping[str, Tensor], arch: Arch, what: str) -> tuple[Mapping[str, Tensor], list[Entry]]:
        """``sd`` under current spellings and the arch's entries, after the missing / unexpected keys check."""
        sd = self.aliased(sd)
        entries = self.expand(arch)
        wanted = {e.key for e in entries}
        missing = [k for k in dict.fromkeys(e.key for e in entries if e.kind != "tied") if k not in sd]
        if missing:
            raise TransportError(f"{what}: missing keys for {arch.name}: {_names(missing)}")
        extra = [k for k in sd if k not in wanted and not self.ignored(k)]
        if extra:
            raise TransportError(f"{what}: unexpected keys for {arch.name}: {_names(extra)}")
        return sd, entries

    @staticmethod
    def _canonical(e: Entry, t: Tensor, fused: dict[str, list[tuple[int, str]]], arch: Arch, what: str,
                   own: bool = False) -> Tensor:
        """The canonical tensor of entry ``e`` from its stored tensor ``t`` (bit-exact). ``own``: ``t`` was read
        for this call only, so a part of a fused tensor is copied out rather than keeping the whole fused storage
        alive (q, k and v each read from one in_proj would hold three of them)."""
        if e.kind in ("fused", "fused_t"):
            sizes = fused[e.key]
            axis = 0 if e.kind == "fused" else 1
            total = sum(s for s, _ in sizes)
            if t.dim() < axis + 1 or t.shape[axis] != total:
                raise TransportError(f"{what}: shape mismatch for {e.key}: got {tuple(t.shape)}, {arch.name} "
                                     f"needs {total} along axis {axis}")
            start = sum(s for s, c in sizes[:e.part])
            t = t.narrow(axis, start, sizes[e.part][0])
            if e.kind == "fused_t":
                t = t.t() if t.dim() == 2 else t
        elif e.kind == "unsqueeze1":
            t = t.reshape(t.shape[-1]) if t.dim() == 3 and t.shape[:2] == (1, 1) else t
        elif e.kind == "unsqueeze0":
            t = t[0] if t.dim() == 3 and t.shape[0] == 1 else t
        elif e.kind == "transpose":
            t = t.t()
        t = t.contiguous()
        if own and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()
        return t

    def to_canonical(self, sd: Mapping[str, Tensor], arch: Arch, what: str = "checkpoint") -> dict[str, Tensor]:
        """Family-named tower state dict -> canonical tensors (validated: keys, shapes, dtypes, NaN/Inf).

        ``sd`` may be a :class:`~transport.files.LazyWeights`: each tensor is then read when its entry needs it."""
        sd, entries = self._entries(sd, arch, what)
        fused = self._fused_sizes(entries, arch)
        own = isinstance(sd, LazyWeights)
        out: dict[str, Tensor] = {}
        for e in entries:
            if e.kind != "tied":
                out[e.canon] = self._canonical(e, sd[e.key], fused, arch, what, own)
        self._check_tied(sd, entries, out, what)
        check_params(out, arch, what)
        return out

    @staticmethod
    def _check_tied(sd: Mapping[str, Tensor], entries: list[Entry], out: Mapping[str, Tensor], what: str) -> None:
        for e in entries:
            if e.kind == "tied" and e.key in sd and not torch.equal(sd[e.key], out[e.canon].to(sd[e.key].dtype)):
                raise TransportError(f"{what}: {e.key} should be tied to the token embedding but holds other values")

    def streamed(self, sd: LazyWeights, arch: Arch, what: str = "checkpoint", keep: int = 2) -> StreamedParams:
        """:meth:`to_canonical` without reading: keys and shapes are checked now (from the headers), each
        canonical tensor is read from ``sd`` when asked for, block by block (:class:`StreamedParams`)."""
        sd, entries = self._entries(sd, arch, what)
        fused = self._fused_sizes(entries, arch)
        by_canon = {e.canon: e for e in entries if e.kind != "tied"}
        tied = [e for e in entries if e.kind == "tied" and e.key in sd]
        if tied:  # a stored second copy of the token embedding: checked once (two tensors read, then freed)
            self._check_tied(sd, tied, {e.canon: self._canonical(by_canon[e.canon], sd[by_canon[e.canon].key],
                                                                 fused, arch, what) for e in tied}, what)
        shapes = canonical_shapes(arch)
        lacking = [k for k in shapes if k not in by_canon]
        if lacking:
            raise TransportError(f"{what}: missing tensors for {arch.name}: {_names(lacking)}")

        def read(name: str) -> Tensor:
            e = by_canon[name]
            return self._canonical(e, sd[e.key], fused, arch, what, own=True)

        return StreamedParams(shapes, read, what, keep)

    def from_canonical(self, params: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        """Canonical tensors -> the family's own names and shapes (fused keys re-fused; partial input: only
        the keys all of whose canonical parts are given)."""
        entries = self.expand(arch)
        fused_sizes = self._fused_sizes(entries, arch)
        out: dict[str, Tensor] = {}
        fused: dict[str, dict[str, Tensor]] = {}
        for e in entries:
            if e.canon not in params:
                continue
            t = params[e.canon]
            if e.kind in ("fused", "fused_t"):
                fused.setdefault(e.key, {})[e.canon] = t
                continue
            if e.kind == "tied":
                t = t.clone()
            elif e.kind == "unsqueeze1":
                t = t.reshape(1, 1, -1)
            elif e.kind == "unsqueeze0":
                t = t.unsqueeze(0)
            elif e.kind == "transpose":
                t = t.t()
            out[e.key] = t.contiguous()
        for key, parts in fused.items():
            names = [c for _, c in fused_sizes[key]]
            if any(c not in parts for c in names):
                continue
            kind = next(e.kind for e in entries if e.key == key)
            ts = [parts[c] for c in names]
            out[key] = torch.cat(ts, 0) if kind == "fused" or ts[0].dim() == 1 else torch.cat([t.t() for t in ts], 1)
        return out

    def family_shapes(self, arch: Arch) -> dict[str, tuple[int, ...]]:
        """The family's own tensor names and shapes for ``arch`` (computed on the meta device, no memory)."""
        meta = {k: torch.empty(v.shape, device="meta") for k, v in param_axes(arch).items()}
        return {k: tuple(v.shape) for k, v in self.from_canonical(meta, arch).items()}

    def check_tensors(self, tower: Mapping[str, Tensor], arch: Arch, what: str, squeezable: bool = False) -> None:
        """Shape, dtype and NaN/Inf checks named by the checkpoint's OWN keys (missing/unexpected keys:
        :meth:`to_canonical`). ``squeezable``: singleton axes may be missing or extra."""
        want = self.family_shapes(arch)
        lazy = isinstance(tower, LazyWeights)  # shapes and dtypes from the headers; values checked as they are read
        for key in tower:
            k = self.alias(key)
            if k not in want:
                continue
            t = None if lazy else tower[key]
            shape, got = want[k], tower.shape(key) if lazy else tuple(t.shape)
            if got != shape and not (squeezable and tuple(s for s in got if s != 1) == tuple(s for s in shape if s != 1)):
                raise TransportError(f"{what}: shape mismatch for {key}: got {got}, {arch.name} needs {shape}")
            if lazy:
                continue
            if not t.is_floating_point():
                raise TransportError(f"{what}: tensor {key} holds {str(t.dtype).replace('torch.', '')} values; "
                                     "weights must be floating point")
            if not torch.isfinite(t).all():
                raise TransportError(f"{what}: tensor {key} contains NaN or Inf values")


@lru_cache(maxsize=None)
def load_table(name: str, directory: Optional[str] = None) -> NameTable:
    """The name table ``tables/NAME.json`` (cached)."""
    return NameTable.from_json(Path(directory) / f"{name}.json" if directory else TABLES / f"{name}.json")


__all__ = ["Entry", "NameTable", "load_table", "TABLES", "HOWS"]
