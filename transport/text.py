"""Text tasks: token ids (a :class:`~transport.core.stems.TextBatch` per split) with optional labels.

The counterpart of :class:`transport.data.Task` for token-stem models: ``split``, ``shots`` and
``calibration`` return a TextBatch where an image task returns an image tensor, so methods and the
evaluation treat both alike (``len``, indexing, :func:`transport.core.stems.model_inputs`).

Two kinds, read from a JSONL or CSV file by :func:`load_text_file` with the TARGET model's tokenizer:

- a classification task (a ``label`` column): every text becomes a prompt (the template up to
  ``{label}``), ``classnames`` are the label words and ``label_ids`` the first token of each label word
  as it follows the prompt (the template's whitespace before ``{label}`` is part of the label word, as
  a byte-level BPE tokenizer reads "Label: positive" as "Label", ":", " positive"). A model is scored
  on its next-token logits at the prompt's last token, restricted to ``label_ids``;
- a plain corpus (no ``label`` column): the texts as they are, for next-token loss / perplexity.

Splits are seeded: per label 60 / 15 / 25 % (the rule of the ImageFolder loader), a corpus the same
way as one pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from transport.core.stems import TextBatch
from transport.errors import TransportError
from transport.textfile import read_text_file

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")
#: the prompt of a classification task: ``{text}`` is replaced by the text, the label word follows ``{label}``'s
#: place (``"{text}\nLabel:"`` then " positive")
DEFAULT_TEMPLATE = "{text}\nLabel: {label}"


@dataclass
class TextTask:
    """``splits[name] = (TextBatch, labels [N] or None)``; ``classnames``: label words ([] for a plain corpus);
    ``label_ids`` [C]: the token each label word starts with (what a classification task is scored on)."""

    name: str
    splits: dict[str, tuple[TextBatch, Optional[Tensor]]]
    classnames: list[str] = field(default_factory=list)
    description: str = ""
    tokenizer_id: str = ""  # what tokenised it (texts for one model are refused by a model with another vocabulary)
    label_ids: Optional[Tensor] = None
    template: str = ""
    kind = "text"

    def __post_init__(self) -> None:
        if self.classnames and (self.label_ids is None or len(self.label_ids) != len(self.classnames)):
            raise TransportError(f"task {self.name}: {len(self.classnames)} label words need as many label token "
                                 "ids")

    def split(self, name: str) -> tuple[TextBatch, Optional[Tensor]]:
        if name not in self.splits:
            raise TransportError(f"task {self.name}: no '{name}' split")
        return self.splits[name]

    @property
    def labelled(self) -> bool:
        return all(y is not None for _, y in self.splits.values()) and bool(self.classnames)

    def shot_counts(self, k: int, split: str = "train") -> dict[str, int]:
        """How many texts :meth:`shots` really draws per label: K, or fewer where the split has fewer."""
        _, y = self.split(split)
        if y is None or not self.classnames:
            return {}
        return {c: min(k, int((y == i).sum())) for i, c in enumerate(self.classnames)}

    def shots(self, k: int, seed: int = 0, split: str = "train") -> tuple[TextBatch, Tensor]:
        """K labelled texts per class from ``split`` (train by default, never test), seeded. A plain corpus:
        K texts (a text is its own next-token target) and labels 0."""
        if k < 1:
            raise TransportError(f"shots must be >= 1, got {k}")
        if split == "test":
            raise TransportError("shots are never drawn from the test split")
        x, y = self.split(split)
        g = torch.Generator().manual_seed(seed)
        if not self.labelled:
            if len(x) == 0:
                raise TransportError(f"task {self.name}: the {split} split holds no texts")
            i = torch.randperm(len(x), generator=g)[: min(k, len(x))]
            return x[i].trimmed(), torch.zeros(len(i), dtype=torch.long)
        idx = []
        for c in range(len(self.classnames)):
            pool = torch.nonzero(y == c).flatten()
            if len(pool) == 0:
                raise TransportError(f"task {self.name}: class '{self.classnames[c]}' has no {split} samples")
            idx.append(pool[torch.randperm(len(pool), generator=g)[: min(k, len(pool))]])
        i = torch.cat(idx)
        return x[i].trimmed(), y[i]

    def calibration(self, n: int, seed: int = 0, with_labels: bool = False):
        """``n`` texts of the train split (seeded): unlabelled inputs (labels only for colouring figures)."""
        x, y = self.split("train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[: min(n, len(x))]
        batch = x[idx].trimmed()
        if with_labels:
            return batch, (None if y is None else y[idx])
        return batch


# ----------------------------------------------------------------------------------------------
# splits, prompts, tokens
# ----------------------------------------------------------------------------------------------
def split_groups(labels: np.ndarray, seed: int) -> dict[str, list[int]]:
    """Seeded 60 / 15 / 25 % split per label value (the ImageFolder loader's rule: with two or more items a
    label keeps one in train, with three or more one in validation)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n = len(idx)
        a = max(1, int(round(0.6 * n))) if n > 1 else n
        b = a + (max(1, int(round(0.15 * n))) if n - a > 1 else 0)
        parts["train"] += idx[:a].tolist()
        parts["val"] += idx[a:b].tolist()
        parts["test"] += idx[b:].tolist()
    return parts


def parse_template(template: str) -> tuple[str, str]:
    """``(prompt, label_prefix)``: the template up to ``{label}`` (trailing spaces moved to the label word).

    The template holds ``{text}`` once and ends with ``{label}``."""
    if template.count("{text}") != 1:
        raise TransportError(f"--template must hold {{text}} exactly once, got {template!r}")
    if not template.endswith("{label}") or template.count("{label}") != 1:
        raise TransportError(f"--template must end with {{label}} (the label word the model is scored on), "
                             f"got {template!r}")
    head = template[: -len("{label}")]
    prompt = head.rstrip(" \t")
    if "{text}" not in prompt:
        raise TransportError(f"--template: {{text}} must come before {{label}}, got {template!r}")
    return prompt, head[len(prompt):]


def encode(tokenizer: Any, texts: list[str], special: bool, what: str) -> list[list[int]]:
    """Token ids of ``texts`` with a Hugging Face style tokenizer (``tokenizer(texts)['input_ids']``)."""
    if not texts:
        return []
    try:
        out = tokenizer(list(texts), add_special_tokens=special)["input_ids"]
        return [[int(i) for i in ids] for ids in out]
    except Exception as e:  # noqa: BLE001 - a tokenizer of another kind fails in its own ways
        raise TransportError(f"{what}: the tokenizer cannot encode texts ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None


def _token(tokenizer: Any, i: int) -> str:
    try:
        return str(tokenizer.convert_ids_to_tokens(int(i)))
    except Exception:  # noqa: BLE001 - only for messages
        return "?"


def label_token_ids(tokenizer: Any, classnames: list[str], prefix: str, what: str) -> Tensor:
    """[C] the first token of each label word ``prefix + name``; refused when a label gives no token, the
    unknown token, or the first token of another label (the classes could not be told apart)."""
    ids = encode(tokenizer, [prefix + c for c in classnames], False, what)
    unk = getattr(tokenizer, "unk_token_id", None)
    first: dict[int, str] = {}
    for c, t in zip(classnames, ids):
        if not t:
            raise TransportError(f"{what}: the label {c!r} tokenises to nothing")
        if unk is not None and t[0] == unk:
            raise TransportError(f"{what}: the label {c!r} starts with the unknown token")
        if t[0] in first:
            raise TransportError(f"{what}: the labels {first[t[0]]!r} and {c!r} start with the same token "
                                 f"{_token(tokenizer, t[0])!r} (id {t[0]}); label-word scoring cannot tell them "
                                 "apart, rename one")
        first[t[0]] = c
    return torch.tensor(list(first), dtype=torch.long)


def _check_lengths(seqs: list[list[int]], rows: list[int], vocab_size: int, context: int, minimum: int,
                   what: str, rowname: str) -> None:
    for s, r in zip(seqs, rows):
        if len(s) < minimum:
            raise TransportError(f"{what}: {rowname} {r} has {len(s)} token(s); "
                                 + ("the next-token loss needs 2 or more" if minimum == 2 else "it is empty"))
        if context and len(s) > context:
            raise TransportError(f"{what}: {rowname} {r} has {len(s)} tokens, more than the model's context of "
                                 f"{context}")
        bad = [i for i in s if not 0 <= i < vocab_size]
        if bad:
            raise TransportError(f"{what}: {rowname} {r}: the tokenizer gives id {bad[0]}, outside the model's "
                                 f"vocabulary of {vocab_size} tokens (tokenizer and model do not fit)")


def load_text_file(path: str | Path, tokenizer: Any, vocab_size: int, context: int = 0,
                   template: str = DEFAULT_TEMPLATE, seed: int = 0, tokenizer_id: str = "") -> TextTask:
    """A JSONL or CSV file with a ``text`` and an optional ``label`` column, tokenised with ``tokenizer`` (the
    target model's), as a seeded train / val / test :class:`TextTask` (see the module docstring).

    ``vocab_size`` / ``context``: the model's; a token id outside the vocabulary or a text longer than the
    context (0: no limit) is refused. Every problem is one TransportError line naming the file.
    """
    from transport.data import check_seed

    check_seed(seed)
    path = Path(path)
    what = str(path)
    if tokenizer is None:
        raise TransportError(f"{what}: the target model has no tokenizer to read texts with (a model directory "
                             "needs its tokenizer files, e.g. tokenizer.json)")
    table = read_text_file(path)
    texts, labels, rowname = table.texts, table.labels, table.rowname
    if labels is not None:
        classnames = sorted(set(labels))
        if len(classnames) < 2:
            raise TransportError(f"{what}: every row has the label {classnames[0]!r}; label-word scoring needs "
                                 "two or more labels (drop the label column for a plain text corpus)")
        prompt, prefix = parse_template(template)
        label_ids = label_token_ids(tokenizer, classnames, prefix, what)
        seqs = encode(tokenizer, [prompt.replace("{text}", t) for t in texts], True, what)
        y = np.array([classnames.index(c) for c in labels])
        _check_lengths(seqs, table.rows, vocab_size, context, 1, what, rowname)
        bad = [int(i) for i in label_ids if not 0 <= int(i) < vocab_size]
        if bad:
            raise TransportError(f"{what}: a label token has id {bad[0]}, outside the model's vocabulary of "
                                 f"{vocab_size} tokens")
    else:
        classnames, label_ids, prompt = [], None, ""
        seqs = encode(tokenizer, texts, True, what)
        y = np.zeros(len(texts), dtype=np.int64)
        _check_lengths(seqs, table.rows, vocab_size, context, 2, what, rowname)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) and 0 <= pad < vocab_size else 0
    parts = split_groups(y, seed)
    splits = {}
    for s in SPLITS:
        idx = sorted(parts[s])
        batch = TextBatch.from_lists([seqs[i] for i in idx], pad_id=pad)
        splits[s] = (batch, torch.as_tensor(y[idx], dtype=torch.long) if classnames else None)
    kind = f"{len(classnames)} labels" if classnames else "plain text"
    return TextTask(path.stem, splits, classnames, f"{kind} from {path}", tokenizer_id, label_ids,
                    template if classnames else "")


__all__ = ["TextTask", "SPLITS", "DEFAULT_TEMPLATE", "load_text_file", "parse_template", "label_token_ids",
           "split_groups"]
