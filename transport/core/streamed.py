"""Canonical parameters read from their files block by block, when asked for.

A :class:`StreamedParams` is a read-only mapping canonical name -> float32 tensor, like a model's resident
``params`` dict, but it holds only the tensors of the last ``keep`` groups it was asked for (a group is one
block, ``blocks.{l}.*``, or everything outside the blocks). A method that walks the blocks in order
(Theseus's prepare, a forward pass) then never has more than a couple of blocks of each model in memory;
one that asks for every tensor at once (``dict(params)``) gets what a resident model would have held.

The shapes are known up front (from the files' headers), so a model's keys and shapes are checked without
reading a byte; each tensor's dtype and values are checked as it is read (one line naming the file).
"""
from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import torch

from transport.errors import TransportError

Tensor = torch.Tensor


def group_of(name: str) -> int:
    """The block a canonical tensor belongs to (``blocks.3.attn.q.weight`` -> 3), -1 outside the blocks."""
    if name.startswith("blocks."):
        head = name.split(".", 2)[1]
        if head.isdigit():
            return int(head)
    return -1


class StreamedParams(Mapping[str, Tensor]):
    """Canonical tensors read by ``read(name)`` when asked for; the last ``keep`` groups' tensors are held."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Tensor], what: str,
                 keep: int = 2):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self._read, self.what, self.keep = read, what, keep
        self._held: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # tensors read from the files so far (what the tests and benches count)
        self.live_bytes = 0  # bytes of the tensors read that are still alive anywhere (held here or by a caller)
        self.peak_live_bytes = 0

    def __len__(self) -> int:
        return len(self._shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def nbytes(self) -> int:
        """float32 bytes of every tensor (what a resident copy would take)."""
        return sum(4 * math.prod(s) for s in self._shapes.values())

    def held_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for g in self._held.values() for t in g.values())

    def _freed(self, n: int) -> None:
        self.live_bytes -= n

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        g = group_of(name)
        with self._lock:
            held = self._held.get(g)
            if held is not None:
                self._held.move_to_end(g)
                if name in held:
                    return held[name]
            t = self._read(name)
            self.reads += 1
            if tuple(t.shape) != self._shapes[name]:
                raise TransportError(f"{self.what}: shape mismatch for {name}: got {tuple(t.shape)}, "
                                     f"expected {self._shapes[name]}")
            if t.dtype != torch.float32:
                t = t.float()
            n = t.numel() * t.element_size()
            self.live_bytes += n
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
            weakref.finalize(t, self._freed, n)
            if held is None:
                held = self._held[g] = {}
                while len(self._held) > self.keep:
                    self._held.popitem(last=False)
            held[name] = t
            return t


def resident(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor in memory (a plain dict; a resident dict is returned as it is)."""
    return params if isinstance(params, dict) else {k: params[k] for k in params}


__all__ = ["StreamedParams", "group_of", "resident"]
