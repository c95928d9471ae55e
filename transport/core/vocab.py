"""Vocabularies that change between releases (e.g. 32000 -> 32768 tokens): rows moved by token identity.

A :class:`VocabMap` gives, for every row of the target's embedding, the row of the source's that holds the
same token (token string -> id in each tokenizer's table), or -1 where the target's token is new to the
source or no token names the row (padding rows past the tokenizer). :func:`map_rows` applies it to every
tensor axis whose role in the axis table is ``'vocab'`` (the token embedding, an untied unembedding; a tied
embedding is one tensor, mapped once); rows without a source row are zero.

:func:`to_target_vocabulary` puts both source models in the target's vocabulary before a method runs, so
tau = theta_ft - theta_pre has zero rows for new tokens, and a method that compares the source with the
target (TransFusion's matching, Theseus's calibration) sees the source's rows where the target keeps them.
Tokenizers are read through their token -> id table (``get_vocab()`` or an ``encoder`` dict).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.model import Model
from transport.errors import TransportError

Tensor = torch.Tensor
META_KEY = "vocabulary_map"  # a mapped model's meta: the summary of the map that put it in the target's vocabulary


def token_table(tokenizer: Any) -> Optional[dict[str, int]]:
    """A tokenizer's token -> id table (``get_vocab()``, else an ``encoder`` dict), or None when it has none."""
    if tokenizer is None:
        return None
    table = None
    get = getattr(tokenizer, "get_vocab", None)
    if callable(get):
        try:
            table = get()
        except Exception:  # noqa: BLE001 - a tokenizer without a readable table has none
            table = None
    if not isinstance(table, dict):
        table = getattr(tokenizer, "encoder", None)
    if not isinstance(table, dict) or not table:
        return None
    return {str(k): int(v) for k, v in table.items()}


def check_tokenizer_fits(tokenizer: Any, rows: int, what: str) -> None:
    """One line unless every id of the tokenizer indexes a row of an embedding with ``rows`` rows."""
    table = token_table(tokenizer)
    if table:
        top = max(table.values())
        if top >= rows or min(table.values()) < 0:
            raise TransportError(f"{what} has {len(table)} tokens with ids up to {top}, but the embedding has "
                                 f"{rows} rows (not the tokenizer of this model)")


@dataclass(frozen=True)
class VocabMap:
    """``rows`` [target rows]: the source row of each target row (-1: new token or padding, zero rows).

    Counts: ``kept`` (same token, same id), ``moved`` (same token, another id), ``new`` (target tokens the
    source lacks), ``dropped`` (source tokens the target lacks: their rows are not carried), ``padding``
    (target rows no token names)."""

    rows: Tensor
    source_rows: int
    kept: int
    moved: int
    new: int
    dropped: int
    padding: int

    def summary(self) -> dict[str, int]:
        return {"source_rows": self.source_rows, "target_rows": int(self.rows.numel()), "kept": self.kept,
                "moved": self.moved, "new": self.new, "dropped": self.dropped, "padding": self.padding}

    def is_identity(self) -> bool:
        n = int(self.rows.numel())
        return n == self.source_rows and bool(torch.equal(self.rows, torch.arange(n)))


def describe(summary: Mapping[str, int]) -> str:
    """One line for a report or a note."""
    return (f"vocabulary {summary['source_rows']} -> {summary['target_rows']} rows by token identity: "
            f"{summary['kept']} kept, {summary['moved']} moved, {summary['new']} new (zero in tau), "
            f"{summary['dropped']} dropped" + (f", {summary['padding']} padding" if summary.get("padding") else ""))


def vocab_map(source: Mapping[str, int], target: Mapping[str, int], source_rows: int, target_rows: int) -> VocabMap:
    """Rows of the target's vocabulary -> rows of the source's, by token string (tables: token -> id)."""
    by_id = {int(i): t for t, i in target.items() if 0 <= int(i) < target_rows}
    rows = torch.full((target_rows,), -1, dtype=torch.long)
    kept = moved = new = 0
    for r in range(target_rows):
        tok = by_id.get(r)
        if tok is None:
            continue
        s = source.get(tok)
        if s is None or not 0 <= int(s) < source_rows:
            new += 1
            continue
        rows[r] = int(s)
        kept, moved = kept + int(s == r), moved + int(s != r)
    padding = target_rows - len(by_id)
    dropped = sum(1 for t, i in source.items() if 0 <= int(i) < source_rows and t not in target)
    return VocabMap(rows, source_rows, kept, moved, new, dropped, padding)


def vocab_axes(arch: Arch) -> dict[str, int]:
    """Canonical tensor -> its axis whose role is 'vocab'."""
    out = {}
    for name, info in param_axes(arch).items():
        for i, a in enumerate(info.axes):
            if a is not None and a.role == "vocab":
                out[name] = i
    return out


def map_rows(params: Mapping[str, Tensor], arch: Arch, vmap: VocabMap) -> tuple[dict[str, Tensor], Arch]:
    """``params`` in the target's vocabulary (every 'vocab' axis gathered by ``vmap``; rows without a source row
    zero) and the architecture with the target's vocabulary size."""
    if arch.vocab_size != vmap.source_rows:
        raise TransportError(f"{arch.name}: the vocabulary map is for {vmap.source_rows} rows, the model has "
                             f"{arch.vocab_size}")
    out = dict(params)
    have = vmap.rows >= 0
    for name, axis in vocab_axes(arch).items():
        t = params[name].movedim(axis, 0)
        moved = torch.zeros((int(vmap.rows.numel()), *t.shape[1:]), dtype=t.dtype, device=t.device)
        moved[have] = t[vmap.rows[have]]
        out[name] = moved.movedim(0, axis).contiguous()
    return out, arch.replace(vocab_size=int(vmap.rows.numel()))


def _mapped(model: Model, vmap: VocabMap, target: Model) -> Model:
    params, arch = map_rows(model.params, model.arch, vmap)
    meta = {**model.meta, META_KEY: json.dumps(vmap.summary(), sort_keys=True)}
    return Model(arch, params, model.ref, model.head, model.zero_shot, meta, target.tokenizer)


def to_target_vocabulary(source_pre: Model, source_ft: Model, target: Model
                         ) -> tuple[Model, Model, Optional[dict[str, int]]]:
    """Both source models in the target's vocabulary when the vocabularies differ (by token identity: both
    tokenizers needed), with the map's summary; the models unchanged and None when they read the same ids.

    Idempotent: models an earlier call mapped carry the summary in their meta and pass through. Differing
    vocabulary sizes without both tokenizers are one error line.
    """
    a, b = source_pre.arch, target.arch
    if a.stem != "tokens" or b.stem != "tokens":
        return source_pre, source_ft, None
    if META_KEY in source_pre.meta and a.vocab_size == b.vocab_size:
        return source_pre, source_ft, json.loads(source_pre.meta[META_KEY])
    ta, tb = token_table(source_pre.tokenizer), token_table(target.tokenizer)
    tf = token_table(source_ft.tokenizer)
    if ta is not None and tf is not None and tf != ta:
        raise TransportError(f"{source_ft.ref} and {source_pre.ref} have different tokenizers; a fine-tune must "
                             "keep its base model's vocabulary")
    if ta is None or tb is None:
        if a.vocab_size != b.vocab_size:
            raise TransportError(f"{source_pre.ref} has a vocabulary of {a.vocab_size} tokens and {target.ref} one "
                                 f"of {b.vocab_size}: embedding rows can move by token identity only with both "
                                 "tokenizers (give model directories that hold them, or --arch one that does)")
        return source_pre, source_ft, None
    if ta == tb and a.vocab_size == b.vocab_size:
        return source_pre, source_ft, None
    check_tokenizer_fits(source_pre.tokenizer, a.vocab_size, f"{source_pre.ref}: its tokenizer")
    check_tokenizer_fits(target.tokenizer, b.vocab_size, f"{target.ref}: its tokenizer")
    vmap = vocab_map(ta, tb, a.vocab_size, b.vocab_size)
    if vmap.is_identity():
        return source_pre, source_ft, None
    return _mapped(source_pre, vmap, target), _mapped(source_ft, vmap, target), vmap.summary()


__all__ = ["VocabMap", "vocab_map", "vocab_axes", "map_rows", "token_table", "check_tokenizer_fits",
           "to_target_vocabulary", "describe", "META_KEY"]
