"""The text zoo's files: models as Hugging Face ``save_pretrained`` directories, read back as canonical models,
and its task files tokenised as ``transport run --data`` reads them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from transport.core.arch import Arch
from transport.core.model import Model
from transport.errors import TransportError
from transport.methods.theseus_inputs import tokenizer_identity
from transport.sources import family_of, from_canonical, load_hf
from transport.text import DEFAULT_TEMPLATE, load_text_file

Tensor = torch.Tensor
PRETRAINED = ("A", "B_control", "B_next", "B_next_unshuffled", "B_indep", "W_grown", "W_indep", "D_grown", "V_vocab")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def save_directory(path: Path, arch: Arch, params: dict[str, Tensor], tokenizer) -> Path:
    """A Hugging Face ``save_pretrained`` directory (config, safetensors weights, tokenizer), written to a
    temporary sibling and renamed into place."""
    _quiet_transformers()
    fam = family_of(arch)
    module = fam.init_module(arch, 0)
    missing, unexpected = module.load_state_dict(from_canonical(params, arch), strict=False)
    missing = [k for k in missing if not fam.table.ignored(k)]
    if missing or unexpected:  # pragma: no cover - the family's own names
        raise TransportError(f"{path}: cannot save: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def load_directory(path: Path, arch: Arch) -> Model:
    m = load_hf(str(path))
    out = m.with_params(m.params)
    out.arch = arch
    return out


def load_tasks(root: Path, cfg, tokenizer, context: int) -> dict:
    """Every task tokenised by ``tokenizer`` (what ``transport run --data`` does with the target's)."""
    return {t: load_text_file(root / "tasks" / f"{t}.jsonl", tokenizer, len(tokenizer), context, DEFAULT_TEMPLATE, 0,
                              tokenizer_identity(tokenizer) or "") for t in cfg.tasks}



__all__ = ["PRETRAINED", "save_directory", "load_directory", "load_tasks"]
