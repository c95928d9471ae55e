"""Seconds of one polar factor at an LLM MLP map's shape: C = X_A^T X_B from ``--rows`` random rows (so C
has rank ``--rows``), ``polar(C, 'auto')`` with and without the known rank bound, and the largest difference.

Theseus's MLP map at Qwen2.5-0.5B -> 1.5B shape is 4864 x 8960 from 4096 calibration rows (the default).
To time an older ``transport.core.procrustes``, run this file against that checkout (it passes ``rank`` only
where ``polar`` takes it).

    python -m bench.polar_speed [--rows 4096] [--shape 4864 8960] [--threads 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import inspect
import time

import torch

from bench.common import load_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--shape", type=int, nargs=2, default=[4864, 8960])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    from transport.core.procrustes import polar

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(a.rows, a.shape[0], generator=g)
    xb = torch.randn(a.rows, a.shape[1], generator=g)
    C = xa.double().t() @ xb.double()
    takes_rank = "rank" in inspect.signature(polar).parameters
    print(f"polar of a {a.shape[0]} x {a.shape[1]} C of rank {a.rows}, {a.threads} threads; load {load_line()}")
    first = None
    for rank in ([None, a.rows] if takes_rank else [None]):
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            T, _ = polar(C, "auto", **({"rank": rank} if takes_rank else {}))
            times.append(time.perf_counter() - t0)
        first = T if first is None else first
        print(f"  rank bound {str(rank):>6}: {min(times):.2f} s (best of {a.repeat}), "
              f"max |T - T_first| {float((T - first).abs().max()):.1e}")


if __name__ == "__main__":
    main()
