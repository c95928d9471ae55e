"""Rounding floors of the polar routes on exactly rank-deficient C: where the null-space rule of
``transport.core.procrustes`` (``route_noise``, ``null_tol``) gets its constants.

For C = Qa diag(s) Qb^T with a quarter of s exactly zero (random, not axis-aligned directions; s
spread over ``cond``), it prints the largest zero singular value each route returns (relative to
S_max, and in units of its floor: ``d^(1/4) eps`` for the SVD routes, ``sqrt(d^(1/4) eps)`` for S of
the eigh routes) and, for the eigh routes, the largest ``|R_ii|`` of the QR of ``(U^T C)^T`` on the
zero directions (units ``d^(1/4) eps``), the quantity their rule decides on.

    python -m bench.polar_floors [--threads N] [--max-d 1024]
"""
from __future__ import annotations

import argparse
import math

import torch

SHAPES = [(16, 16), (12, 20), (64, 64), (64, 128), (256, 256), (768, 896), (1024, 1024), (3072, 3584)]


def rank_deficient(d_a: int, d_b: int, nullity: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(d_a, d_b)
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    s[k - nullity:] = 0
    Qa, _ = torch.linalg.qr(torch.randn(d_a, k, generator=g, dtype=torch.float64))
    Qb, _ = torch.linalg.qr(torch.randn(d_b, k, generator=g, dtype=torch.float64))
    return (Qa * s) @ Qb.t()


def floors(C: torch.Tensor, nullity: int, mode: str) -> tuple[float, float]:
    """(largest zero S / S_max, largest zero |R_ii| / S_max or nan) for one route."""
    wd = torch.float32 if mode.endswith("32") else torch.float64
    M = C.to(wd)
    s0 = float(torch.linalg.svdvals(C)[0])
    if mode.startswith("svd"):
        return float(torch.linalg.svdvals(M)[-nullity:].max()) / s0, float("nan")
    G = M @ M.t()
    lam, U = torch.linalg.eigh(0.5 * (G + G.t()))
    lam, U = lam.flip(-1), U.flip(-1)
    _, R = torch.linalg.qr((U.t() @ M).t())
    S = torch.sqrt(lam.clamp_min(0)).double()
    return float(S[-nullity:].max()) / s0, float(torch.diagonal(R).abs()[-nullity:].max()) / s0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-d", type=int, default=1024, help="skip shapes whose smaller side is larger")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} threads, torch {torch.__version__}")
    print("| C | route | zero S / S_max | in floors of S | zero abs(R_ii) / S_max | in d^(1/4) eps |")
    print("|---|---|---|---|---|---|")
    for d_a, d_b in SHAPES:
        d = min(d_a, d_b)
        if d > args.max_d:
            continue
        for mode in ("svd", "svd32", "eigh", "eigh32"):
            eps = torch.finfo(torch.float32 if mode.endswith("32") else torch.float64).eps
            worst_s = worst_r = 0.0
            for seed in range(3 if d < 1000 else 1):
                for cond in (10.0, 1e3):
                    zs, zr = floors(rank_deficient(d_a, d_b, max(1, d // 4), cond, seed), max(1, d // 4), mode)
                    worst_s, worst_r = max(worst_s, zs), max(worst_r, zr)
            unit_s = d ** 0.25 * eps if mode.startswith("svd") else math.sqrt(d ** 0.25 * eps)
            r = "-" if mode.startswith("svd") else f"{worst_r:.1e} | {worst_r / (d ** 0.25 * eps):.2f}"
            print(f"| {d_a} x {d_b} | {mode} | {worst_s:.1e} | {worst_s / unit_s:.2f} | "
                  + (r if not mode.startswith("svd") else "- | -") + " |", flush=True)


if __name__ == "__main__":
    main()
