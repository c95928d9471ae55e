"""The zoo build's processes: worker start-up, progress reports from workers, and the process pool."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Callable

import torch

_progress_queue = None  # set in worker processes


def report(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


class Ticker:
    """Batches progress reports (one queue message per ``every`` steps)."""

    def __init__(self, report: Callable[[int], None], every: int = 10):
        self.report, self.every, self.n = report, every, 0

    def __call__(self, n: int) -> None:
        self.n += n
        if self.n >= self.every:
            self.report(self.n)
            self.n = 0

    def flush(self) -> None:
        self.report(self.n)
        self.n = 0


def init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue
    torch.set_num_threads(1)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: a build worker gets SIGTERM when the building process dies (an interrupted build leaves no
    orphans writing into the zoo directory). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        pass


def children_cpu() -> float:
    """CPU seconds used by finished child processes (the build's workers), where the OS tells."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    except (ImportError, OSError):  # pragma: no cover - not on POSIX
        return 0.0


class CallbackBar:
    """A progress bar that also reports (fraction, message) to a callback."""

    def __init__(self, bar, total: int, variant: str, callback: Callable[[float, str], None]):
        self.bar, self.total, self.n, self.variant, self.callback = bar, max(1, total), 0, variant, callback

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        self.callback(min(1.0, self.n / self.total), f"building the {self.variant} zoo: {self.n}/{self.total} steps")

    def close(self) -> None:
        self.bar.close()
        self.callback(1.0, "zoo built")


class InlineQueue:
    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def progress_bar(total: int, variant: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"building the {variant} zoo", unit="step", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def run_pool(r: Path, cfg, jobs, n_workers: int, bar, records, take_models, take_eval, evaluate) -> None:
    """Run the training jobs in worker processes; each seed is evaluated (``evaluate``) once both its jobs are done."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    done_jobs: dict[int, int] = {s: 0 for s in cfg.seeds}
    with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=init_worker,
                                initargs=(queue,)) as pool:
        pending = {pool.submit(fn, str(r), cfg, s): ("train", s) for fn, s in jobs}
        while pending:
            done, _ = cf.wait(list(pending), timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain(queue, bar)
            for f in done:
                what, s = pending.pop(f)
                out = f.result()
                if what == "train":
                    take_models(s, out)
                    done_jobs[s] += 1
                    if done_jobs[s] == 2:
                        pending[pool.submit(evaluate, r, cfg, s, records[s])] = ("eval", s)
                else:
                    take_eval(s, out)
        drain(queue, bar)


def drain(queue, bar) -> None:
    import queue as _q

    while True:
        try:
            bar.update(queue.get_nowait())
        except _q.Empty:
            return
