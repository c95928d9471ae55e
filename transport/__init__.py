"""transport: move fine-tuning (task vectors) between pretrained vision transformers.

The package never imports streamlit. Public entry points:

- :mod:`transport.arch` -- architecture as data (canonical parameter names, family adapters)
- :mod:`transport.functional` -- one functional forward for every supported family
- :mod:`transport.task_vector` -- :class:`TaskVector` with tensor-like arithmetic
- :mod:`transport.io` -- loading models from zoo / open_clip / Hugging Face / files
- :mod:`transport.methods` -- registry of transport methods (``prepare`` + ``apply``)
"""
from __future__ import annotations

__version__ = "0.1.0"

from transport.errors import TransportError  # noqa: E402

__all__ = ["TransportError", "__version__"]
