"""What the Hugging Face families share: reading a model directory's config, normalisation statistics and
weight names without loading any weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError, safe_open

from transport.errors import TransportError

ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "silu": "silu", "swish": "silu", "relu": "relu"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_config(directory: Path) -> Any:
    """The config of a model directory, or of a config JSON file itself (local files only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - unknown model types, malformed json
        where = directory if directory.is_file() else directory / "config.json"
        raise TransportError(f"{where}: not a readable Hugging Face config: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def processor_stats(directory: Path, mean: tuple[float, ...], std: tuple[float, ...]
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from ``preprocessor_config.json`` when the directory has one, else the defaults given."""
    f = directory / "preprocessor_config.json"
    if f.is_file():
        try:
            d = json.loads(f.read_text())
            if d.get("image_mean") and d.get("image_std"):
                return tuple(float(x) for x in d["image_mean"]), tuple(float(x) for x in d["image_std"])
        except (ValueError, TypeError, AttributeError):
            raise TransportError(f"{f}: malformed preprocessor config") from None
    return mean, std


def activation_name(cfg: Any, what: str) -> str:
    act = getattr(cfg, "hidden_act", "gelu")
    if act not in ACTS:
        raise TransportError(f"{what}: activation '{act}' is not supported (known: {', '.join(ACTS)})")
    return ACTS[act]


def weight_keys(directory: Path) -> Optional[set[str]]:
    """Tensor names in the directory's weights without loading them (None when only a .bin is there)."""
    idx = [directory / "model.safetensors.index.json", directory / "pytorch_model.bin.index.json"]
    for f in idx:
        if f.is_file():
            try:
                return set(json.loads(f.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError):
                raise TransportError(f"{f}: malformed weight index") from None
    f = directory / "model.safetensors"
    if f.is_file():
        try:
            with safe_open(str(f), framework="pt") as h:
                return set(h.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise TransportError(f"{f}: not a readable safetensors file (truncated or another format): "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return None


def arch_name(ref: str, directory: Path) -> str:
    return ref if ref.startswith("hf:") else f"hf:{directory}"


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


__all__ = ["load_config", "processor_stats", "activation_name", "weight_keys", "arch_name", "has_tokenizer", "ACTS"]
