"""Where a method's ``prepare`` holds its memory: the resident set sampled every 5 ms, with the stack of the
main thread each time it reaches a new high-water mark (by at least ``--step`` GiB).

Models are the language-model benchmark's random-init ``save_pretrained`` pairs (:mod:`bench.lm_scale`:
Qwen2.5-0.5B-shaped source; the 0.5B-shaped second seed for TransFusion, the 1.5B-shaped target for
Theseus), shrunk by ``--scale``. Prints the resident set after the imports, after loading both models and at
its peak, then one line per high-water step: GiB, seconds into ``prepare``, innermost frames first.

    python -m bench.memory_trace [--method transfusion|theseus] [--scale 0.5] [--step 0.05] [--dir DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from bench.lm_scale import _rss, _texts, make, seq_len

N_SEQ = 32


class HighWater:
    """Samples the resident set every 5 ms in a thread; records (GiB, seconds, main thread's stack) each time it
    exceeds the last mark by ``step_gib``."""

    def __init__(self, step_gib: float, floor_gib: float = 0.0, depth: int = 7):
        self.step, self.peak, self.depth = step_gib, floor_gib, depth
        self.marks: list[tuple[float, float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._main = threading.main_thread().ident

    def _sample(self) -> None:
        t0 = time.perf_counter()
        while not self._done.is_set():
            r = _rss() / 2**30
            if r > self.peak + self.step:
                self.peak = r
                frames = traceback.extract_stack(sys._current_frames()[self._main])[-self.depth:]
                self.marks.append((r, time.perf_counter() - t0,
                                   " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(frames))))
            time.sleep(0.005)

    def start(self) -> "HighWater":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def lines(self) -> list[str]:
        return [f"{gib:6.2f} GiB {at:7.1f} s  {where}" for gib, at, where in self.marks]


def trace(method: str, scale: float, step_gib: float, directory: Path, threads: int = 2) -> dict:
    """Peak and high-water stacks of ``method``'s prepare on the scaled pair (models made once in ``directory``)."""
    from transport.methods import TransportInputs, get_method
    from transport.sources import load_model

    torch.set_num_threads(threads)
    target = ("qwen-1.5b", 1) if method == "theseus" else ("qwen-0.5b", 1)
    make("qwen-0.5b", scale, 0, directory / "source")
    make(target[0], scale, target[1], directory / f"target-{target[0]}")
    base = _rss() / 2**30
    A, B = load_model(str(directory / "source")), load_model(str(directory / f"target-{target[0]}"))
    loaded = _rss() / 2**30
    hw = HighWater(step_gib, loaded)
    t0 = time.perf_counter()
    hw.start()
    m = get_method(method)
    task = _texts(A.arch.vocab_size, N_SEQ, seq_len(scale)) if method == "theseus" else None
    options = {"calib_size": N_SEQ} if method == "theseus" else {}
    m.prepare(TransportInputs(A, B, task, seed=0), m.resolve(options))
    seconds = time.perf_counter() - t0
    hw.stop()
    size = lambda M: sum(v.numel() * v.element_size() for v in M.params.values()) / 2**30  # noqa: E731
    return {"base": base, "loaded": loaded, "peak": max(hw.peak, loaded), "source_gib": size(A),
            "target_gib": size(B), "seconds": seconds, "marks": hw.lines()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="transfusion", choices=["transfusion", "theseus"])
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--step", type=float, default=0.05, help="GiB between two recorded high-water marks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="keep the saved models here (reused when present)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.dir or tmp) / f"scale-{a.scale:g}"
        r = trace(a.method, a.scale, a.step, d, a.threads)
    print(f"{a.method} at scale {a.scale:g}: models {r['source_gib']:.3f} + {r['target_gib']:.3f} GiB; resident "
          f"after imports {r['base']:.2f}, after loading {r['loaded']:.2f}, peak {r['peak']:.2f} GiB; "
          f"prepare {r['seconds']:.1f} s")
    for line in r["marks"]:
        print(line)


if __name__ == "__main__":
    main()
