"""The built-in demo zoo: tiny open_clip ViTs trained offline on scikit-learn digits (see :mod:`.builder`).

This package's namespace is the store (locating models of a built zoo); building lives in
:mod:`transport.zoo.builder`, which no library module imports.
"""
from transport.zoo.store import *  # noqa: F401,F403
from transport.zoo.store import __all__  # noqa: F401
