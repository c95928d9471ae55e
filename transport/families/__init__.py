"""Model families as data: a registry of adapters, each a :class:`~transport.families.base.Family` with a
JSON name table (``tables/``). Only :mod:`transport.sources` imports this package; the core and the
methods never see a family's parameter names.

Adding a family whose shape the core already covers is one name table plus a small adapter (how to read
its config, where its tower sits in a state dict, and a tiny real module for the contract test).
"""
from __future__ import annotations

from transport.errors import TransportError
from transport.families import hf_clip, hf_decoder, hf_vit, open_clip, open_clip_text
from transport.families.base import Family

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise TransportError(f"model family '{family.name}' is registered twice")
    _REGISTRY[family.name] = family
    return family


for _family in (open_clip.FAMILY, open_clip_text.FAMILY, hf_clip.FAMILY, hf_vit.FAMILY, *hf_decoder.FAMILIES):
    register(_family)

ENCODER_DECODERS = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "longt5", "switch_transformers")


def get(name: str) -> Family:
    """The adapter of family ``name`` (one clear line for an unknown one)."""
    if name not in _REGISTRY:
        raise TransportError(f"unknown model family '{name}' (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def for_model_type(model_type: str, what: str) -> Family:
    """The adapter that reads Hugging Face ``config.model_type``."""
    if model_type in ENCODER_DECODERS:
        raise TransportError(f"{what}: '{model_type}' is an encoder-decoder model; only decoder-only language "
                             "models and vision towers are supported (encoder-decoders are out of scope)")
    for f in _REGISTRY.values():
        if model_type in f.model_types:
            return f
    known = sorted(t for f in _REGISTRY.values() for t in f.model_types)
    raise TransportError(f"{what}: model type '{model_type}' is not supported (known: {', '.join(known)})")


__all__ = ["Family", "register", "get", "names", "for_model_type"]
