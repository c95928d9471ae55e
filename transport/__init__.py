"""transport: move fine-tuning (task vectors) between pretrained transformers.

The package never imports streamlit. Layers, imports pointing one way:

- leaves: :mod:`transport.errors`, :mod:`transport.files` (checkpoint I/O, deterministic atomic writes),
  :mod:`transport.hub` (offline-first Hugging Face hub), :mod:`transport.cache`, :mod:`transport.data`
- :mod:`transport.core` -- architecture switches, the axis table, symmetries, one functional forward, heads,
  task vectors (``+``, ``-``, scalar ``*``, ``sum``), Procrustes maps, assignment solvers, evaluation
- :mod:`transport.families` -- one adapter plus a JSON name table per model family
- :mod:`transport.methods` -- naive, TransFusion, GradFix, Theseus (``prepare`` + ``apply``; read the core only)
- :mod:`transport.sources` -- a reference -> a model, and files in a family's own names
- :mod:`transport.zoo` -- the demo zoo's store (:mod:`transport.zoo.builder` trains it)
- :mod:`transport.pipeline`, :mod:`transport.cli` -- the end-to-end transfer and the command line
"""
from __future__ import annotations

__version__ = "0.1.0"

from transport.errors import TransportError  # noqa: E402

__all__ = ["TransportError", "__version__"]
