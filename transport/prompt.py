"""What several versions of one language model do with a typed prompt: next-token distributions, the
label-word prediction of a classification task, a greedy continuation, and where (token by token) each
version's predictions differ from a reference version's.

Versions are ``name -> (Model, params)`` over the same vocabulary (the target zero-shot, the target plus
naive / transported task vectors, the source fine-tuned, the oracle). Pure computation on canonical
parameters (:func:`transport.core.forward.encode`); the figures are in :mod:`viz.text`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from transport.core.forward import encode
from transport.core.model import Model
from transport.core.stems import TextBatch
from transport.errors import TransportError

Tensor = torch.Tensor


@dataclass
class PromptReport:
    """``tokens``: the prompt's tokens as text; per version: ``top`` [(token, p)] of the next token,
    ``labels`` {label word: p renormalised over the label words} (a classification task), ``divergence`` [T]
    KL(version || reference) of the next-token distribution after each prompt token (nats), ``continuation``
    the greedy continuation's tokens."""

    tokens: list[str]
    reference: str
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    labels: dict[str, dict[str, float]] = field(default_factory=dict)
    divergence: dict[str, list[float]] = field(default_factory=dict)
    continuation: dict[str, list[str]] = field(default_factory=dict)

    def predicted(self, name: str) -> Optional[str]:
        lab = self.labels.get(name)
        return max(lab, key=lab.get) if lab else None


def _show(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (byte-level tokens decoded one by one)."""
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def prompt_report(versions: Mapping[str, tuple[Model, Mapping[str, Tensor]]], tokenizer: Any, text: str,
                  reference: str, label_ids: Optional[Tensor] = None, classnames: Optional[list[str]] = None,
                  k: int = 8, new_tokens: int = 16) -> PromptReport:
    """Run every version on ``text`` (tokenised by ``tokenizer``) and compare each with ``reference``."""
    if not text:
        raise TransportError("type a prompt first")
    if reference not in versions:
        raise TransportError(f"unknown reference version '{reference}'")
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    arch0 = next(iter(versions.values()))[0].arch
    if arch0.context and len(ids) + new_tokens > arch0.context:
        raise TransportError(f"the prompt has {len(ids)} tokens; with {new_tokens} more it exceeds the model's "
                             f"context of {arch0.context} tokens")
    batch = TextBatch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
    logp: dict[str, Tensor] = {}
    out = PromptReport(_show(tokenizer, ids), reference)
    for name, (model, params) in versions.items():
        if model.arch.vocab_size != arch0.vocab_size:
            raise TransportError(f"{name}: a vocabulary of {model.arch.vocab_size} tokens, not {arch0.vocab_size}")
        lp = torch.log_softmax(encode(dict(params), model.arch, batch)[0].double(), -1)  # [T, V]
        logp[name] = lp
        p, i = lp[-1].exp().topk(min(k, lp.shape[-1]))
        out.top[name] = list(zip(_show(tokenizer, i.tolist()), [float(v) for v in p]))
        if label_ids is not None and classnames:
            q = lp[-1, label_ids].exp()
            out.labels[name] = {c: float(v) for c, v in zip(classnames, q / q.sum())}
        out.continuation[name] = _show(tokenizer, _greedy(model, params, ids, new_tokens))
    ref = logp[reference]
    for name, lp in logp.items():
        out.divergence[name] = [float(v) for v in (lp.exp() * (lp - ref)).sum(-1)]
    return out


def _greedy(model: Model, params: Mapping[str, Tensor], ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        b = TextBatch(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))
        seq.append(int(encode(dict(params), model.arch, b, index=torch.tensor([len(seq) - 1]))[0].argmax()))
    return seq[len(ids):]


__all__ = ["PromptReport", "prompt_report"]
