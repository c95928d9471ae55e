"""Depth mapping for Theseus: which source block each target block takes its update from.

Sizes of one model family differ in depth as well as width (e.g. 24 vs 28 blocks). Every target block
gets at most one source block and every source block serves at most one target block, in order (an
order-preserving one-to-one matching of min(L_A, L_B) pairs): blocks compose in sequence, so a
crossing match would move an update to a place that reads other inputs, and using one source block
twice would apply its update twice. Target blocks left unmatched get a zero update (when the target
is deeper), source blocks left unmatched are dropped (when it is shallower); both are reported.

- ``depth='relative'`` (the baseline): by relative depth. The shallower model's block i goes to the
  deeper model's block ``floor(i (L_deep - 1) / (L_shallow - 1) + 1/2)``: first to first, last to last.
- ``depth='similarity'``: by activation similarity. On every k-th calibration row (at most
  :data:`DEPTH_ROWS` of them) both models run to the end; block j of the target and block i
  of the source score ``S[j, i] = (CKA(in_B(j), in_A(i)) + CKA(out_B(j), out_A(i))) / 2`` (linear CKA of
  the residual streams entering and leaving the blocks: invariant to rotations and scale, defined
  across widths); the matching maximises the total score (dynamic programming). Comparing inputs AND
  outputs tells a copied block from an inserted near-identity one, whose output equals its input.

Equal depths give the identity either way (no similarity pass is run then).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from transport.methods.theseus_maps import monotone_matching

Tensor = torch.Tensor

DEPTH_MODES = ("relative", "similarity")
DEPTH_ROWS = 1024  # calibration rows the similarity pass keeps per residual stream


def relative_depth(l_a: int, l_b: int) -> list[Optional[int]]:
    """Per target block its source block by relative depth (None: unmatched)."""
    out: list[Optional[int]] = [None] * l_b
    if l_b >= l_a:
        step = (l_b - 1) / (l_a - 1) if l_a > 1 else 0.0
        for i in range(l_a):
            out[math.floor(i * step + 0.5)] = i
    else:
        step = (l_a - 1) / (l_b - 1) if l_b > 1 else 0.0
        for j in range(l_b):
            out[j] = math.floor(j * step + 0.5)
    return out


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of two row-paired activation matrices [n, d_x], [n, d_y] (float64, centred columns)."""
    X = X.to(torch.float64)
    Y = Y.to(torch.float64)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    Kx, Ky = X @ X.t(), Y @ Y.t()
    den = float(Kx.norm() * Ky.norm())
    return float((Kx * Ky).sum()) / den if den > 0 else 0.0


def block_similarity(streams_a: list[Tensor], streams_b: list[Tensor]) -> Tensor:
    """S [L_B, L_A] from the residual streams entering block 0..L-1 and leaving the last (L + 1 each)."""
    gram = [[None] * len(streams_a), [None] * len(streams_b)]

    def K(side: int, l: int) -> Tensor:
        if gram[side][l] is None:
            X = (streams_a if side == 0 else streams_b)[l].to(torch.float64)
            X = X - X.mean(0)
            G = X @ X.t()
            gram[side][l] = G / G.norm().clamp_min(torch.finfo(torch.float64).tiny)
        return gram[side][l]

    la, lb = len(streams_a) - 1, len(streams_b) - 1
    cka = torch.tensor([[float((K(1, j) * K(0, i)).sum()) for i in range(la + 1)] for j in range(lb + 1)],
                       dtype=torch.float64)
    return 0.5 * (cka[:-1, :-1] + cka[1:, 1:])


def similarity_depth(S: Tensor) -> list[Optional[int]]:
    """Per target block its source block: the order-preserving matching with the largest total similarity."""
    return monotone_matching(S)


def row_stride(total_rows: int) -> int:
    """Keep every ``stride``-th calibration row (at most :data:`DEPTH_ROWS`)."""
    return max(1, math.ceil(total_rows / DEPTH_ROWS))


def depth_info(mode: str, mapping: list[Optional[int]], l_a: int, l_b: int, S: Optional[Tensor] = None) -> dict:
    """What the diagnostics report about the depth map (JSON-able)."""
    used = {i for i in mapping if i is not None}
    return {"mode": mode, "source_layers": l_a, "target_layers": l_b, "map": list(mapping),
            "unmatched_target": [j for j, i in enumerate(mapping) if i is None],
            "dropped_source": [i for i in range(l_a) if i not in used],
            "similarity": None if S is None else [[round(float(x), 6) for x in row] for row in S]}


def check_mapping(mapping: list[Optional[int]], l_a: int, l_b: int) -> None:
    """Raise ValueError unless ``mapping`` is an order-preserving one-to-one partial map of blocks."""
    got = [i for i in mapping if i is not None]
    if len(mapping) != l_b or any(not 0 <= i < l_a for i in got) or got != sorted(set(got)):
        raise ValueError(f"not an order-preserving depth map of {l_a} -> {l_b} blocks: {mapping}")


__all__ = ["DEPTH_MODES", "DEPTH_ROWS", "relative_depth", "linear_cka", "block_similarity", "similarity_depth",
           "row_stride", "depth_info", "check_mapping"]
