"""One exception type for every user-facing failure: a one-line message naming the input and the problem."""
from __future__ import annotations

import warnings


class TransportError(Exception):
    """Bad input or an impossible request. ``str(err)`` is one line, fit for a CLI or an ``st.error``."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NotImplementedYet(TransportError):
    """A method or family that is planned but not built: never answered with a fake result."""


class TransportWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one ``warning:`` line)."""


def warn(message: str) -> None:
    """Issue a one-line :class:`TransportWarning` (the CLI shows ``warning: <message>``)."""
    warnings.warn(" ".join(str(message).split()), TransportWarning, stacklevel=2)
