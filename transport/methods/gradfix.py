"""GradFix: gradient-sign masking of a task vector (same architecture, a few labelled target samples).

``prepare`` takes per-sample gradients of the target's own classification loss on K labelled
samples per class (train split) with ``torch.func.vmap(grad(...))`` in micro-batches, and keeps a
vote per parameter entry: the sum of the per-sample signs of the descent direction -grad l_n (majority
vote) and the mean gradient g (mean vote, first-order diagnostics). Nothing is updated. On texts the
loss is the language model's own next-token cross-entropy (see :mod:`transport.core.losses`): of the
label word after the prompt for K texts per label, or of every real token for K texts of a plain corpus;
each sample's loss reads only its real tokens.

``apply`` keeps the entries of tau whose sign agrees with the vote s (sign_mask m_i = 1 iff
sign(tau_i) == s_i, ties s_i = 0 dropped): delta = m ⊙ tau. With s = sign(-g) this is a descent
direction, <g, delta> = -sum_i m_i |g_i| |tau_i| <= 0. Variants: ``force`` (|tau| ⊙ s), ``random``
(same keep-rate per tensor, a control) and ``oracle`` (s = sign of the target's own task vector).
"""
from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes, same_shapes
from transport.core.losses import LossFn, task_loss
from transport.core.stems import TextBatch, check_token_ids, preprocess
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import read_safetensors, write_safetensors
from transport.methods import MethodInfo, Option, Progress, TransportInputs, no_progress

Tensor = torch.Tensor

VOTES = ("majority", "mean")
VARIANTS = ("normal", "force", "random", "oracle")
SPEC = (
    Option("vote", "majority", "how the sign vote is taken: majority of per-sample signs, or the sign of the "
           "mean gradient", choices=VOTES, apply_only=True, flag=True),
    Option("variant", "normal", "normal mask, force (|tau| x vote), random mask of the same keep-rate, or the "
           "oracle sign of the target's own task vector", choices=VARIANTS, apply_only=True, flag=True),
    Option("micro_batch", 0, "samples per per-sample-gradient call (0: from a memory budget)", minimum=0),
    Option("mask_seed", 0, "seed of the random-mask control", apply_only=True, minimum=0),
    Option("oracle_tau", None, "the target's own task vector (variant oracle)", apply_only=True, hidden=True),
)
DEFAULT_OPTIONS = {o.name: o.default for o in SPEC}
VOTES_FILE, META_FILE = "votes.safetensors", "alignment.json"


# ----------------------------------------------------------------------------------------------
# per-sample gradients and the vote
# ----------------------------------------------------------------------------------------------
def per_sample_grads(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor | TextBatch, labels: Tensor,
                     names: Optional[list[str]] = None) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of each sample's loss w.r.t. ``params[names]`` ([n, *shape] each) and the losses [n].

    ``pixels``: preprocessed images, or a TextBatch (each sample is seen as a batch of one text with its
    own mask, so its loss reads its real tokens only)."""
    names = list(params) if names is None else names
    wanted = set(names)
    frozen = {k: v for k, v in params.items() if k not in wanted}
    if isinstance(pixels, TextBatch):
        def one_text(p: dict[str, Tensor], ids: Tensor, mask: Tensor, y: Tensor) -> Tensor:
            return loss_fn({**frozen, **p}, TextBatch(ids.unsqueeze(0), mask.unsqueeze(0)), y.unsqueeze(0)).sum()

        grad_fn = torch.func.vmap(torch.func.grad_and_value(one_text), in_dims=(None, 0, 0, 0))
        return grad_fn({k: params[k] for k in names}, pixels.ids, pixels.mask, labels)

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn({**frozen, **p}, x.unsqueeze(0), y.unsqueeze(0)).sum()

    grad_fn = torch.func.vmap(torch.func.grad_and_value(one), in_dims=(None, 0, 0))
    grads, losses = grad_fn({k: params[k] for k in names}, pixels, labels)
    return grads, losses


def one_sample_grads(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor | TextBatch, labels: Tensor,
                     names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Like :func:`per_sample_grads` for one sample with plain autograd: no vmap, so the only extra memory is
    one gradient per parameter (at language-model scale vmap's batched intermediates do not fit)."""
    wanted = set(names)
    leaves = {k: params[k].detach().requires_grad_(True) for k in names}
    full = {k: (leaves[k] if k in wanted else v) for k, v in params.items()}
    with torch.enable_grad():
        loss = loss_fn(full, pixels, labels).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    out = {k: (torch.zeros_like(params[k]) if g is None else g).unsqueeze(0) for k, g in zip(names, grads)}
    return out, loss.detach().reshape(1)


def sample_workers() -> int:
    """Samples computed side by side on CPU: torch's thread setting, at most the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


def invariant_tensors(arch: Arch) -> list[str]:
    """Tensors no loss depends on (the axis table marks them): without rotary positions the key bias adds
    q·b_k to every logit of a query, which softmax ignores.

    Their gradient is rounding noise, so they take no vote and pass through ``apply`` unmasked.
    """
    return [k for k, i in param_axes(arch).items() if i.invariant]


def count_dtype(n: int) -> torch.dtype:
    """Smallest signed integer type holding a vote sum in [-n, n]."""
    return torch.int8 if n <= 127 else torch.int16 if n <= 32767 else torch.int32


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def auto_micro_batch(params: dict[str, Tensor], names: list[str], pixels: Tensor | TextBatch,
                     arch: Optional[Arch] = None) -> int:
    """Samples per vmap call: per-sample gradients plus activations must fit a memory budget."""
    dev = pixels.device
    item = params[names[0]].element_size() if names else 4
    grads = item * sum(params[k].numel() for k in names)
    acts = grads
    if arch is not None:  # saved activations of one sample, per block: ~10 d-wide and 2 m-wide rows per token
        text = isinstance(pixels, TextBatch)
        t, d, m = max(int(pixels.ids.shape[1]) if text else arch.tokens, 1), arch.width, arch.mlp_width
        acts = item * arch.layers * (t * (10 * d + 2 * m) + 2 * arch.heads * t * t)
        if text:  # next-token logits, their softmax and its gradient at every position
            acts += item * 3 * t * arch.vocab_size
    if dev.type == "cuda":
        budget = 0.5 * torch.cuda.mem_get_info(dev)[0]
    else:
        budget = 0.75 * 2**30  # ViT-B/16: one sample per call, 2.5 GiB peak in total (two: 3.3 GiB, 2% faster)
    return max(1, min(len(pixels), int(budget // max(grads + acts, 1))))


@dataclass
class Votes:
    """sum_n sign(-grad l_n) per entry (integers), the mean gradient, and what produced them."""

    counts: dict[str, Tensor]
    grad: dict[str, Tensor]
    n: int
    mean_loss: float
    micro_batch: int
    no_grad: list[str]  # tensors with an identically zero gradient on every sample: the loss does not reach them


def collect_votes(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor | TextBatch, labels: Tensor,
                  names: Optional[list[str]] = None, micro_batch: int = 0, arch: Optional[Arch] = None,
                  progress: Progress = no_progress) -> Votes:
    """Per-sample gradient signs summed chunk by chunk (peak memory: one micro-batch of gradients).

    ``micro_batch`` 0 picks one from a memory budget; a chunk that runs out of memory is retried
    with half as many samples. ``params`` are only read.
    """
    names = [k for k, v in params.items() if v.is_floating_point()] if names is None else list(names)
    n = len(labels)
    if n == 0:
        raise TransportError("gradfix: no labelled samples to take gradients on")
    cdtype = count_dtype(n)
    counts = {k: torch.zeros(params[k].shape, dtype=cdtype, device=params[k].device) for k in names}
    gsum = {k: torch.zeros_like(params[k]) for k in names}
    b = micro_batch if micro_batch > 0 else auto_micro_batch(params, names, pixels, arch)
    b_used, i, loss_sum = b, 0, 0.0
    if b == 1 and pixels.device.type == "cpu" and n > 1:
        loss_sum, i = _side_by_side(loss_fn, params, pixels, labels, names, counts, gsum, cdtype, progress), n
    while i < n:
        i, b, b_used, loss_sum = _one_chunk(loss_fn, params, pixels, labels, names, counts, gsum, cdtype,
                                            i, b, b_used, loss_sum)
        progress(i / n, f"gradfix: gradients of {i}/{n} samples")
    grad = {}
    for k in names:  # the sum becomes the mean in place: no second model-sized copy (ViT-L/14: 1.1 GiB)
        if not bool(torch.isfinite(gsum[k]).all()):
            raise TransportError(f"gradfix: the gradient of {k} is not finite")
        grad[k] = gsum.pop(k).div_(n).cpu()
    counts = {k: v.cpu() for k, v in counts.items()}
    no_grad = [k for k in names if not counts[k].any() and not grad[k].any()]
    return Votes(counts, grad, n, loss_sum / n, b_used, no_grad)


class _InOrder:
    """Per tensor, the sample whose gradient it takes next: each tensor's sum and vote take the samples in
    sample order whichever thread produced them (float sums depend on their order)."""

    def __init__(self, names: list[str]):
        self.next = dict.fromkeys(names, 0)
        self.cv = threading.Condition()
        self.failed = None  # the first sample that failed: later ones stop, earlier ones finish

    def wait(self, name: str, i: int) -> None:
        with self.cv:
            while self.next[name] != i and (self.failed is None or self.failed > i):
                self.cv.wait()
            if self.failed is not None and self.failed < i:
                raise _Aborted

    def done(self, name: str, i: int) -> None:
        with self.cv:
            self.next[name] = i + 1
            self.cv.notify_all()

    def abort(self, i: int) -> None:
        with self.cv:
            self.failed = i if self.failed is None else min(self.failed, i)
            self.cv.notify_all()


class _Aborted(Exception):
    """Another sample failed: this one stops without folding anything more."""


def _side_by_side(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor | TextBatch, labels: Tensor,
                  names: list[str], counts: dict[str, Tensor], gsum: dict[str, Tensor], cdtype: torch.dtype,
                  progress: Progress) -> float:
    """One sample per worker thread, each on one torch thread; each gradient is folded as backward produces it.

    Samples run side by side instead of splitting each operation over threads: no thread waits at a
    parallel region's barrier for a starved sibling when another process holds a core, and every sample's
    gradient is computed by the same single-threaded kernels whatever the worker count. A tensor's gradient is
    added into the sum and the vote by a hook the moment it is complete and then dropped, in sample order per
    tensor (:class:`_InOrder`), so no sample's whole gradient is ever held (peak: the model, the sum and vote,
    and each worker's activations) and the vote and the mean gradient are byte-identical for any worker count.
    """
    n, workers, start = len(labels), sample_workers(), torch.get_num_threads()
    order = _InOrder(names)

    def fold_hook(name: str, i: int, folded: set[str]):
        def fold(leaf: Tensor) -> None:
            g, leaf.grad = leaf.grad, None
            order.wait(name, i)
            gsum[name].add_(g)
            counts[name].sub_(g.sign_().to(cdtype))  # sum_n sign(-g_n)
            order.done(name, i)
            folded.add(name)
        return fold

    def sample(i: int) -> float:
        try:
            chunk = pixels[i:i + 1]
            chunk = chunk.trimmed() if isinstance(chunk, TextBatch) else chunk
            leaves, folded = {k: params[k].detach().requires_grad_(True) for k in names}, set()
            for k, leaf in leaves.items():
                leaf.register_post_accumulate_grad_hook(fold_hook(k, i, folded))
            with torch.enable_grad():
                loss = loss_fn({**params, **leaves}, chunk, labels[i:i + 1]).sum()
                _check_loss(loss.detach(), pixels)
                loss.backward()
            for k in names:  # tensors this sample's loss does not reach take nothing, in their turn
                if k not in folded:
                    order.wait(k, i)
                    order.done(k, i)
            return float(loss.detach().double())
        except _Aborted:
            raise
        except BaseException:
            order.abort(i)
            raise

    loss_sum = 0.0
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(sample, i) for i in range(n)]
            try:  # in sample order: the first failure is what is raised (later samples stop at it)
                for i, f in enumerate(futures):
                    loss_sum += f.result()
                    progress((i + 1) / n, f"gradfix: gradients of {i + 1}/{n} samples")
            finally:
                for f in futures:
                    f.cancel()
    finally:
        torch.set_num_threads(start)
    return loss_sum


def _check_loss(losses: Tensor, pixels: Tensor | TextBatch) -> None:
    if not bool(torch.isfinite(losses).all()):
        raise TransportError("gradfix: the loss is not finite on the labelled samples (NaN/Inf in the "
                             f"{'texts' if isinstance(pixels, TextBatch) else 'images'} or the model)")


def _fold(grads: dict[str, Tensor], losses: Tensor, pixels: Tensor | TextBatch, names: list[str],
          counts: dict[str, Tensor], gsum: dict[str, Tensor], cdtype: torch.dtype) -> float:
    """Add per-sample gradients [b, *shape] into the sum and their descent signs into the vote; the loss sum."""
    _check_loss(losses, pixels)
    for k in names:  # one sample at a time, in place: the fewest passes over the per-sample gradients
        g = grads.pop(k)
        if 0 in g.stride():  # an expanded (broadcast) gradient cannot be overwritten in place
            g = g.contiguous()
        for gi in g.unbind(0):
            gsum[k].add_(gi)
            counts[k].sub_(gi.sign_().to(cdtype))  # sum_n sign(-g_n)
        del g
    return float(losses.double().sum())


def _one_chunk(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor | TextBatch, labels: Tensor,
               names: list[str], counts: dict[str, Tensor], gsum: dict[str, Tensor], cdtype: torch.dtype,
               i: int, b: int, b_used: int, loss_sum: float) -> tuple[int, int, int, float]:
    """Fold samples i..i+b into the vote (one sample: plain autograd; more: vmap); halves b on out-of-memory."""
    n = len(labels)
    while True:
        j = min(n, i + b)
        chunk = pixels[i:j]
        if isinstance(chunk, TextBatch):
            chunk = chunk.trimmed()  # the chunk's longest text sets its length; shorter texts are masked
        try:
            if j - i == 1:
                grads, losses = one_sample_grads(loss_fn, params, chunk, labels[i:j], names)
            else:
                grads, losses = per_sample_grads(loss_fn, params, chunk, labels[i:j], names)
        except RuntimeError as e:
            if not _is_oom(e) or b == 1:
                raise
            b = max(1, b // 2)
            b_used = min(b_used, b)
            if pixels.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        break
    loss_sum += _fold(grads, losses, pixels, names, counts, gsum, cdtype)
    return j, b, b_used, loss_sum


# ----------------------------------------------------------------------------------------------
# the alignment: the vote, and how a task vector is masked by it
# ----------------------------------------------------------------------------------------------
@dataclass
class GradFixAlignment:
    """The sign vote of the target's task loss on a few labelled samples.

    ``counts[k]`` = sum_n sign(-grad l_n) (integers), ``grad[k]`` = mean gradient g over the N samples.
    ``no_grad``: tensors the loss does not reach (they pass through ``apply`` unmasked).
    """

    arch: Arch
    counts: dict[str, Tensor]
    grad: dict[str, Tensor]
    n_samples: int
    vote: str = "majority"
    shots: int = 0
    no_grad: list[str] = field(default_factory=list)
    mean_loss: float = float("nan")
    micro_batch: int = 0
    last: Optional[dict] = None  # tau-dependent part of the last apply

    def __post_init__(self) -> None:
        if self.vote not in VOTES:
            raise TransportError(f"gradfix: unknown vote '{self.vote}' (use {' or '.join(VOTES)})")

    # -- the vote ---------------------------------------------------------------------------
    def sign(self, name: str, vote: Optional[str] = None) -> Tensor:
        """s in {-1, 0, +1} (int8): sign of the vote sum (majority) or of -g (mean)."""
        vote = vote or self.vote
        if vote == "majority":
            return torch.sign(self.counts[name]).to(torch.int8)
        if vote == "mean":
            return torch.sign(-self.grad[name]).to(torch.int8)
        raise TransportError(f"gradfix: unknown vote '{vote}' (use {' or '.join(VOTES)})")

    def margin(self, name: str) -> Tensor:
        """Vote margin |sum_n sign(-g_n)| / N in [0, 1]: the confidence of each entry's sign."""
        return self.counts[name].abs().float() / self.n_samples

    def entry_map(self, name: str, tau: TaskVector, vote: Optional[str] = None) -> Tensor:
        """+1 where sign(tau) agrees with the vote, 0 on ties (s = 0), -1 elsewhere (int8, tensor's shape)."""
        if name not in self.counts:
            raise TransportError(f"gradfix: no vote for tensor '{name}'")
        if name not in tau.tensors:
            raise TransportError(f"gradfix: the task vector has no tensor '{name}'")
        s = self.sign(name, vote)
        agree = torch.sign(tau[name]).to(torch.int8) == s
        return torch.where(s == 0, torch.zeros_like(s), torch.where(agree, torch.ones_like(s), -torch.ones_like(s)))

    def margin_hist(self) -> dict:
        """Distribution of the vote margin over all voted entries: one bin per possible value k/N."""
        n = self.n_samples
        bins = torch.zeros(n + 1, dtype=torch.long)
        for k, c in self.counts.items():
            if k not in self.no_grad:
                bins += torch.bincount(c.abs().flatten().long(), minlength=n + 1)[: n + 1]
        edges = [0.0] + [(k + 0.5) / n for k in range(n)] + [1.0]
        return {"edges": edges, "counts": bins.tolist()}

    # -- transport ---------------------------------------------------------------------------
    def transport(self, tau: TaskVector, options: Optional[dict] = None) -> tuple[dict[str, Tensor], dict]:
        """delta at alpha 1 for ``options['variant']`` and its tau-dependent statistics."""
        opts = {**DEFAULT_OPTIONS, **(options or {})}
        variant, vote = opts["variant"], (options or {}).get("vote") or self.vote
        if variant not in VARIANTS:
            raise TransportError(f"gradfix: unknown variant '{variant}' (use {', '.join(VARIANTS)})")
        if vote not in VOTES:
            raise TransportError(f"gradfix: unknown vote '{vote}' (use {' or '.join(VOTES)})")
        if not same_shapes(tau.arch, self.arch):
            raise TransportError(f"gradfix: the task vector is for {tau.arch.name}, the vote was taken on "
                                 f"{self.arch.name} (shapes differ)")
        oracle = opts.get("oracle_tau")
        if variant == "oracle":
            if not isinstance(oracle, TaskVector):
                raise TransportError("gradfix: variant 'oracle' needs options['oracle_tau'], the target's own "
                                     "task vector")
            if not same_shapes(oracle.arch, self.arch):
                raise TransportError(f"gradfix: oracle task vector is for {oracle.arch.name}, not {self.arch.name}")
        gen = torch.Generator().manual_seed(int(opts["mask_seed"]))
        info = param_axes(self.arch)
        delta: dict[str, Tensor] = {}
        rows: dict[tuple[int, str], dict[str, float]] = {}
        passed: list[str] = []
        for k, t in tau.items():
            key = (info[k].layer, info[k].block)
            r = rows.setdefault(key, {"numel": 0, "agree": 0, "voted": 0, "kept": 0, "ties": 0, "fo": 0.0})
            r["numel"] += t.numel()
            if (k not in self.counts or k in self.no_grad) and not (variant == "oracle" and k in oracle.tensors):
                delta[k] = t.clone()
                r["kept"] += t.numel()
                passed.append(k)
                continue
            st = torch.sign(t).to(torch.int8)
            voted = k in self.counts and k not in self.no_grad
            s = self.sign(k, vote).to(t.device) if voted else torch.zeros_like(st)
            agree = (st == s) & (s != 0)
            n_agree = int(agree.sum())
            n_ties = int((s == 0).sum()) if voted else 0
            if variant == "normal":
                keep, kept = agree, n_agree
            elif variant == "oracle":
                so = torch.sign(oracle[k]).to(torch.int8).to(t.device) if k in oracle.tensors else st
                keep = (st == so) & (so != 0)
                kept = int(keep.sum())
            elif variant == "random":  # same number kept per tensor as the normal mask, positions at random
                keep = torch.zeros(t.numel(), dtype=torch.bool)
                keep[torch.randperm(t.numel(), generator=gen)[:n_agree]] = True
                keep = keep.view(t.shape).to(t.device)
                kept = n_agree
            else:  # force
                keep = None
                kept = int(((s != 0) & (t != 0)).sum())
            d = t.abs() * s.to(t.dtype) if keep is None else torch.where(keep, t, torch.zeros_like(t))
            delta[k] = d
            r["kept"] += kept
            if not voted:
                passed.append(k)  # only the oracle masks it
                continue
            r["agree"] += n_agree
            r["voted"] += t.numel() - n_ties
            r["ties"] += n_ties
            r["fo"] += float((self.grad[k].to(d.device, torch.float64) * d.double()).sum())
        blocks = [{"layer": l, "block": b, "numel": int(r["numel"]),
                   "agreement": r["agree"] / r["voted"] if r["voted"] else None,
                   "keep_rate": r["kept"] / r["numel"] if r["numel"] else None,
                   "ties": int(r["ties"]), "first_order": r["fo"]} for (l, b), r in rows.items()]
        tot = {x: sum(r[x] for r in rows.values()) for x in ("numel", "agree", "voted", "kept", "fo")}
        stats = {"vote": vote, "variant": variant, "blocks": blocks, "first_order_total": tot["fo"],
                 "keep_rate_total": tot["kept"] / tot["numel"] if tot["numel"] else None,
                 "agreement_total": tot["agree"] / tot["voted"] if tot["voted"] else None,
                 "passed_unmasked": passed}
        return delta, stats

    def agreement(self, tau: TaskVector, options: Optional[dict] = None) -> dict:
        """The full diagnostics for ``tau`` (agreement, keep-rate, first-order decrease per layer x block)."""
        _, stats = self.transport(tau, options)
        return self._diagnostics(stats)

    # -- pipeline-facing -------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        """JSON-able summary; tau-dependent fields come from the last ``apply`` (None before one ran)."""
        return self._diagnostics(self.last)

    def _diagnostics(self, stats: Optional[dict]) -> dict:
        info = param_axes(self.arch)
        if stats is None:
            rows: dict[tuple[int, str], dict] = {}
            for k, i in info.items():
                r = rows.setdefault((i.layer, i.block), {"numel": 0, "ties": 0})
                r["numel"] += math.prod(i.shape)
                if k in self.counts and k not in self.no_grad:
                    r["ties"] += int((self.sign(k) == 0).sum())
            blocks = [{"layer": l, "block": b, "numel": r["numel"], "agreement": None, "keep_rate": None,
                       "ties": r["ties"], "first_order": None} for (l, b), r in rows.items()]
            stats = {"vote": self.vote, "variant": "normal", "blocks": blocks, "first_order_total": None,
                     "keep_rate_total": None, "agreement_total": None, "passed_unmasked": []}
        no_grad = list(dict.fromkeys(list(self.no_grad) + list(stats["passed_unmasked"])))
        return {"method": "gradfix", "vote": stats["vote"], "n_samples": self.n_samples, "shots": self.shots,
                "variant": stats["variant"], "blocks": stats["blocks"], "margin_hist": self.margin_hist(),
                "first_order_total": stats["first_order_total"], "keep_rate_total": stats["keep_rate_total"],
                "agreement_total": stats["agreement_total"], "no_grad": no_grad}

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"counts/{k}": v.contiguous() for k, v in self.counts.items()}
        tensors.update({f"grad/{k}": v.contiguous() for k, v in self.grad.items()})
        write_safetensors(d / VOTES_FILE, tensors)
        meta = {"method": "gradfix", "arch": self.arch.to_json(), "n_samples": self.n_samples, "vote": self.vote,
                "shots": self.shots, "no_grad": self.no_grad, "mean_loss": self.mean_loss,
                "micro_batch": self.micro_batch, "last": self.last, "order": list(self.counts)}
        (d / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory) -> "GradFixAlignment":
        d = Path(directory)
        try:
            meta = json.loads((d / META_FILE).read_text())
        except (OSError, ValueError) as e:
            raise TransportError(f"{d / META_FILE}: not a readable gradfix alignment ({type(e).__name__})") from None
        if meta.get("method") != "gradfix":
            raise TransportError(f"{d / META_FILE}: not a gradfix alignment")
        tensors, _ = read_safetensors(d / VOTES_FILE)
        order = meta["order"]
        try:
            counts = {k: tensors[f"counts/{k}"] for k in order}
            grad = {k: tensors[f"grad/{k}"] for k in order}
        except KeyError as e:
            raise TransportError(f"{d / VOTES_FILE}: missing tensor {e}") from None
        return cls(Arch.from_json(meta["arch"]), counts, grad, int(meta["n_samples"]), meta["vote"],
                   int(meta["shots"]), list(meta["no_grad"]), float(meta["mean_loss"]), int(meta["micro_batch"]),
                   meta.get("last"))


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
def _check_options(opts: dict) -> None:
    if opts["vote"] not in VOTES:
        raise TransportError(f"gradfix: unknown vote '{opts['vote']}' (use {' or '.join(VOTES)})")
    if opts["variant"] not in VARIANTS:
        raise TransportError(f"gradfix: unknown variant '{opts['variant']}' (use {', '.join(VARIANTS)})")
    if not isinstance(opts["micro_batch"], int) or opts["micro_batch"] < 0:
        raise TransportError(f"gradfix: micro_batch must be an integer >= 0 (0 = automatic), got {opts['micro_batch']!r}")


def prepare(inputs: TransportInputs, options: dict, progress: Progress = no_progress) -> GradFixAlignment:
    """Vote of the target's loss on K labelled samples per class of the task's TRAIN split."""
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    _check_options(opts)
    if inputs.task is None:
        raise TransportError("gradfix needs labelled data: give a task (K samples per class of its train split)")
    target, task = inputs.target, inputs.task
    x, y = task.shots(inputs.shots, inputs.seed)
    loss_fn, _ = task_loss(target, task, inputs.device)
    params = {k: v.detach().to(inputs.device) for k, v in target.params.items()}
    dtype = next(iter(params.values())).dtype
    if isinstance(x, TextBatch):
        if target.arch.stem != "tokens":
            raise TransportError(f"gradfix: task {task.name} holds texts, {target.ref} reads images")
        check_token_ids(target.arch, x.ids)  # before the per-sample transform, where values cannot be checked
        pixels = x.to(inputs.device)
    else:
        pixels = preprocess(target.arch, x.to(inputs.device)).to(dtype)
    progress(0.0, f"gradfix: per-sample gradients of {len(y)} samples on {inputs.device}")
    skip = set(invariant_tensors(target.arch)) | set(inputs.left_out)  # left out: no vote, passed through
    names = [k for k in params if k not in skip]
    votes = collect_votes(loss_fn, params, pixels, y.to(inputs.device), names=names,
                          micro_batch=int(opts["micro_batch"]), arch=target.arch, progress=progress)
    progress(1.0, "gradfix: vote collected")
    no_grad = [k for k in params if k in skip or k in votes.no_grad]
    return GradFixAlignment(target.arch, votes.counts, votes.grad, votes.n, opts["vote"], inputs.shots,
                            no_grad, votes.mean_loss, votes.micro_batch)


def apply(alignment: GradFixAlignment, tau: TaskVector, alpha: float = 1.0,
          options: Optional[dict] = None) -> TaskVector:
    """alpha * (m ⊙ tau) (or the chosen variant) in the target's names; records the agreement statistics.

    ``tau`` may be any task vector of the target's shapes, e.g. another method's transported tau.
    """
    delta, stats = alignment.transport(tau, options)
    alignment.last = stats
    return TaskVector(alignment.arch, delta, tau.meta) * alpha


def load_alignment(directory: Any) -> GradFixAlignment:
    return GradFixAlignment.load(directory)


METHOD = MethodInfo(name="gradfix", summary="keep the entries of tau whose sign agrees with the target's few-shot "
                    "gradient-sign vote", same_arch=True, data="labelled", prepare=prepare, apply=apply,
                    load_alignment=load_alignment, spec=SPEC)
