"""Long work off the page's script run: a session's transfer runs in a background thread, reports its phase,
can be cancelled, and keeps its result when the user moves to another page. No Streamlit in here.

A :class:`Job` wraps ``work(progress) -> result``; ``progress(fraction, message)`` is the callback every
transport phase already reports to, and it raises :class:`RunCancelled` once :meth:`Job.cancel` was
called, so the pipeline stops at its next report.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transport.errors import NotImplementedYet, TransportError

log = logging.getLogger("transport.app")


class RunCancelled(Exception):
    """Raised inside the progress callback of a cancelled job (ends the pipeline at its next report)."""


@dataclass(frozen=True)
class JobStatus:
    """A consistent snapshot of a job, for drawing."""

    label: str
    state: str  # 'running' | 'done' | 'failed' | 'cancelled'
    fraction: float
    message: str
    elapsed: float
    remaining: Optional[float]  # seconds, at the current phase's pace; None while unknown
    error: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass
class Job:
    """One background computation of one session (at most one runs per session at a time)."""

    label: str
    work: Callable[[Callable[[float, str], None]], Any]
    key: str = ""  # what the job computes (so a page can tell its own job from another page's)
    meta: dict = field(default_factory=dict)
    result: Any = None
    error: str = ""
    state: str = "running"
    fraction: float = 0.0
    message: str = "starting"
    started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    _phase: tuple[str, float, float] = ("", 0.0, 0.0)  # (phase name, its start time, fraction at its start)
    harvested: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: Optional[threading.Thread] = field(default=None, repr=False)

    def start(self) -> "Job":
        self._thread = threading.Thread(target=self._main, name=f"transfer: {self.label}", daemon=True)
        self._thread.start()
        return self

    def progress(self, fraction: float, message: str) -> None:
        """The callback handed to the pipeline: records the phase; raises RunCancelled after cancel()."""
        if self._cancel.is_set():
            raise RunCancelled(self.label)
        with self._lock:
            self.fraction = min(1.0, max(self.fraction, float(fraction)))
            self.message = str(message)
            phase = self.message.split(":")[0]
            if phase != self._phase[0]:
                self._phase = (phase, time.monotonic(), self.fraction)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def _main(self) -> None:
        try:
            out = self.work(self.progress)
            state, err = "done", ""
        except RunCancelled:
            out, state, err = None, "cancelled", ""
        except NotImplementedYet as e:
            out, state, err = None, "failed", f"Not available yet: {e}"
        except TransportError as e:
            out, state, err = None, "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a failed computation must end as one line, never kill the session
            log.exception("unexpected error in a background transfer")
            first = (str(e).splitlines() or [""])[0]
            out, state, err = None, "failed", f"Unexpected error ({type(e).__name__}): {first}"
        with self._lock:
            self.result, self.state, self.error = out, state, err
            self.finished = time.monotonic()
            if state == "done":
                self.fraction, self.message = 1.0, "done"

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread (tests and shutdown); True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != "running"

    def status(self) -> JobStatus:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            elapsed = end - self.started
            f = self.fraction
            remaining = None
            # the current phase's pace carried over the rest (phases differ: prepare is slower than a sweep)
            _, t0, f0 = self._phase
            if self.state == "running" and f - f0 >= 0.02 and end - t0 >= 1.0:
                remaining = (end - t0) * (1.0 - f) / (f - f0)
            return JobStatus(self.label, self.state, f, self.message, elapsed, remaining, self.error)


def describe(status: JobStatus) -> str:
    """One line: phase, elapsed time and the estimate (or the outcome)."""
    if status.running:
        left = ("estimating the time left" if status.remaining is None
                else f"about {status.remaining:.0f} s left (at the current phase's pace)")
        return f"{status.label}: {status.message} · {status.elapsed:.0f} s elapsed · {left}"
    if status.state == "done":
        return f"{status.label}: finished in {status.elapsed:.1f} s"
    if status.state == "cancelled":
        return f"{status.label}: cancelled after {status.elapsed:.1f} s"
    return f"{status.label}: failed after {status.elapsed:.1f} s: {status.error}"
