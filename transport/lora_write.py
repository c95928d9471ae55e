"""A transported LoRA adapter written for the target: PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` in the target family's own module names and shapes, so that
``peft.PeftModel.from_pretrained(target_model, DIR)`` loads it.

Each target weight that received a low-rank update becomes one LoRA module. Its factors are the
transported ones when they are still exact (all parts of a fused weight sharing one ``A``); otherwise
(a sign mask made the update dense) the update is re-factorised by truncated SVD to the chosen rank
(``same``: the source module's rank; ``full``: min(out, in), exact; or a number), with the relative
Frobenius error reported per module. Tensors the source adapter saved whole (biases, ``modules_to_save``)
are written whole: the target's own value plus the transported update. The config is the source's
with the target's module list, and ``rank_pattern`` / ``alpha_pattern`` for modules off the common value.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.lowrank import LowRank, LowRankTaskVector, scale_of, truncated
from transport.core.model import Model
from transport.errors import TransportError
from transport.files import safetensors_bytes
from transport.lora import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, Adapter, input_axis, key_entries, weight_parts
from transport.sources import family_of, from_canonical

Tensor = torch.Tensor
Rank = Union[str, int]


def parse_rank(value: Union[str, int, None]) -> Rank:
    """``same`` (default), ``full`` or a positive integer (one clear line otherwise)."""
    if value is None:
        return "same"
    text = str(value).strip().lower()
    if text in ("same", "full"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise TransportError(f"--adapter-rank: expected same, full or a positive integer, got '{value}'")


@dataclass
class Written:
    """One LoRA module of the written adapter."""

    path: str  # PEFT module path of its factors (``...attn.base_layer.out_proj`` inside an attention LoRA)
    owner: str  # the module PEFT targets (the attention module for both of its halves)
    key: str  # the target family key of its weight
    parts: tuple[str, ...]
    source: str  # the source module it came from
    B: Tensor
    A: Tensor
    alpha: float
    exact: bool
    rel_error: Optional[float] = None
    tail: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def row(self) -> dict:
        return {"module": self.path, "tensors": list(self.parts), "from": self.source, "rank": self.rank,
                "exact": self.exact, "rel_error": self.rel_error, "svd_tail": self.tail}


def checkpoint_key(target: Model, key: str) -> str:
    """A family key under the name the target checkpoint's own class uses (``vit.`` for a
    ViTForImageClassification, no ``vision_model.`` for a CLIPVisionModel): the module paths PEFT will find."""
    named, _ = family_of(target.arch).checkpoint_names({key: torch.zeros(0)}, target.meta)
    return next(iter(named))


def _paths(key: str, nested: bool) -> tuple[str, str]:
    """(factor path, targeted module) of the weight ``key``; a multi-head attention's fused input projection
    lives on the attention module itself, its output projection under ``base_layer``."""
    if key.endswith(".in_proj_weight"):
        m = key[: -len(".in_proj_weight")]
        return m, m
    if not key.endswith(".weight"):
        raise TransportError(f"{key}: not the weight of a module a LoRA can target")
    m = key[: -len(".weight")]
    if nested:
        parent, last = m.rsplit(".", 1)
        return f"{parent}.base_layer.{last}", parent
    return m, m


def _logical(arch: Arch, canonical: str, f: LowRank) -> tuple[Tensor, Tensor]:
    """(B [out, r], A [r, in]) of a canonical factor pair (the inverse of ``lora.canonical_factors``)."""
    return (f.left, f.right) if input_axis(arch, canonical) == 1 else (f.right.t(), f.left.t())


def _logical_dense(arch: Arch, canonical: str, D: Tensor) -> Tensor:
    return D if input_axis(arch, canonical) == 1 else D.t()


def _choose_rank(rank: Rank, source_rank: int, shape: tuple[int, int]) -> int:
    full = min(shape)
    if rank == "same":
        return min(source_rank, full)
    return full if rank == "full" else min(int(rank), full)


def _module(adapter: Adapter, moved: LowRankTaskVector, key: str, parts: tuple[str, ...], sizes: tuple[int, ...],
            n_in: int, rank: Rank, named: str) -> Written:
    arch = moved.arch
    sources = [adapter.module_of(moved.origin[c]) for c in parts if c in moved.origin]
    src = next(m for m in sources if m is not None)
    rslora = bool(adapter.config.get("use_rslora"))
    path, owner = _paths(named, src.nested)
    lows = {c: moved.factors[c] for c in parts if c in moved.factors}
    logical = {c: _logical(arch, c, f) for c, f in lows.items()}
    shared = list(logical.values())[0][1] if logical else None
    exact = (not any(c in moved.densified for c in parts) and len({f.scale for f in lows.values()}) == 1
             and all(torch.equal(A, shared) for _, A in logical.values()))
    if exact:
        r = shared.shape[0]
        B = torch.cat([logical[c][0] if c in logical else torch.zeros(n, r) for c, n in zip(parts, sizes)], 0)
        scale = next(iter(lows.values())).scale
        # the written alpha gives PEFT's scaling back for this rank (the source's own when it does)
        alpha = src.alpha if scale_of(src.alpha, r, rslora) == scale else scale * (r ** 0.5 if rslora else r)
        return Written(path, owner, key, parts, src.path, B.contiguous(), shared.contiguous(), alpha, True)
    blocks = []
    for c, n in zip(parts, sizes):
        if c in lows:
            blocks.append(_logical_dense(arch, c, lows[c].dense()))
        elif c in moved.densified:
            blocks.append(_logical_dense(arch, c, moved.densified[c]))
        else:
            blocks.append(torch.zeros(n, n_in))
    D = torch.cat(blocks, 0)
    r = _choose_rank(rank, max(m.rank for m in sources if m is not None), tuple(D.shape))
    tr = truncated(D, r, scale_of(src.alpha, r, rslora))
    return Written(path, owner, key, parts, src.path, tr.factors.left, tr.factors.right, src.alpha, False,
                   tr.rel_error, tr.tail)


def _complete_attention(mods: list[Written], arch: Arch) -> list[Written]:
    """PEFT adapts a multi-head attention's two projections together, at one rank: a missing half gets zero
    factors and the lower rank is padded with zero directions (both exact)."""
    out = list(mods)
    for owner in dict.fromkeys(m.owner for m in mods):
        ms = [m for m in out if m.owner == owner]
        fused = next((m for m in ms if m.key.endswith(".in_proj_weight")), None)
        inner = next((m for m in ms if m.path != m.owner), None)
        if fused is None and inner is None:
            continue
        if fused is None:
            key, path, like = inner.key.rsplit(".", 2)[0] + ".in_proj_weight", owner, inner
        elif inner is None:
            key, path, like = fused.key[: -len(".in_proj_weight")] + ".out_proj.weight", f"{owner}.base_layer.out_proj", fused
        else:
            key = None
        if key is not None:
            parts, sizes, n_in = weight_parts(arch, key, "target adapter")
            out.append(Written(path, owner, key, parts, like.source, torch.zeros(sum(sizes), like.rank),
                               torch.zeros(like.rank, n_in), like.alpha, True))
        ms = [m for m in out if m.owner == owner]
        r = max(m.rank for m in ms)
        for m in ms:
            if m.rank < r:
                m.B = torch.cat([m.B, torch.zeros(m.B.shape[0], r - m.rank)], 1)
                m.A = torch.cat([m.A, torch.zeros(r - m.A.shape[0], m.A.shape[1])], 0)
        if len({m.alpha for m in ms}) > 1:
            raise TransportError(f"target adapter: the two projections of {owner} would need different alphas")
    return out


def _wrapped_name(name: str, wrapped: set[str]) -> str:
    """A base-model parameter name as PEFT saves it once the modules in ``wrapped`` are LoRA layers
    (``base_layer.`` after each wrapped module)."""
    parts, path, out = name.split("."), "", []
    for p in parts:
        path = f"{path}.{p}" if path else p
        out.append(p)
        if path in wrapped:
            out.append("base_layer")
    return ".".join(out)


def _full_tensors(adapter: Adapter, moved: LowRankTaskVector, target: Model, wrapped: set[str]
                  ) -> tuple[dict[str, Tensor], list[str]]:
    """Tensors saved whole for the target (its value + the transported update) and the module paths of the
    ``modules_to_save`` among them."""
    arch = target.arch
    entries = key_entries(arch)
    own = {e.canon: e.key for es in entries.values() for e in es if e.kind != "tied"}
    keys = list(dict.fromkeys(own[c] for c in moved.names() if c in moved.dense))
    if not keys:
        return {}, []
    base = from_canonical(target.params, arch)
    parts = {e.canon: moved.dense.get(e.canon, torch.zeros(param_axes(arch)[e.canon].shape))
             for k in keys for e in entries[k] if e.kind != "tied"}
    deltas = from_canonical(parts, arch)
    tensors, modules = {}, []
    for k in keys:
        kinds = {adapter.full.get(moved.origin.get(e.canon, e.canon), "bias") for e in entries[k] if e.kind != "tied"}
        name = checkpoint_key(target, k)
        tensors[PEFT_PREFIX + _wrapped_name(name, wrapped)] = (base[k].float() + deltas[k].float()).contiguous()
        if "module" in kinds:
            modules.append(name.rsplit(".", 1)[0])
    return tensors, sorted(set(modules))


def _config(adapter: Adapter, mods: list[Written], saved_modules: list[str], target: Model) -> dict:
    cfg = copy.deepcopy(adapter.config)
    owners = {}
    for m in mods:
        owners.setdefault(m.owner, (m.rank, m.alpha))
    r = Counter(v[0] for v in owners.values()).most_common(1)[0][0] if owners else int(cfg["r"])
    a = Counter(v[1] for v in owners.values()).most_common(1)[0][0] if owners else float(cfg["lora_alpha"])
    a = int(a) if float(a).is_integer() else float(a)
    cfg.update(target_modules=sorted(owners), r=int(r), lora_alpha=a,
               rank_pattern={o: v[0] for o, v in sorted(owners.items()) if v[0] != r},
               alpha_pattern={o: (int(v[1]) if float(v[1]).is_integer() else v[1]) for o, v in sorted(owners.items())
                              if v[1] != a},
               modules_to_save=saved_modules or None, layers_to_transform=None, layers_pattern=None,
               exclude_modules=None, base_model_name_or_path=target.ref, revision=None)
    return cfg


def adapter_files(adapter: Adapter, moved: LowRankTaskVector, target: Model, rank: Rank = "same",
                  meta: Optional[dict[str, str]] = None) -> tuple[dict[str, bytes], dict]:
    """The target adapter's files (name -> bytes; ``meta``: extra string metadata of the weights file) and the
    report section on what was kept exact."""
    if moved.arch != target.arch and param_axes(moved.arch).keys() != param_axes(target.arch).keys():
        raise TransportError(f"the transported adapter is for {moved.arch.name}, not the target {target.arch.name}")
    arch = target.arch
    entries = key_entries(arch)
    own = {e.canon: e.key for es in entries.values() for e in es if e.kind != "tied"}
    low = [c for c in moved.names() if c in moved.factors or c in moved.densified]
    mods = []
    for key in dict.fromkeys(own[c] for c in low):
        parts, sizes, n_in = weight_parts(arch, key, f"target {target.ref}")
        mods.append(_module(adapter, moved, key, parts, sizes, n_in, rank, checkpoint_key(target, key)))
    mods = _complete_attention(mods, arch)
    wrapped = {m.path for m in mods} | {m.owner for m in mods}
    tensors: dict[str, Tensor] = {}
    for m in mods:
        tensors[f"{PEFT_PREFIX}{m.path}.lora_A.weight"] = m.A.float().contiguous()
        tensors[f"{PEFT_PREFIX}{m.path}.lora_B.weight"] = m.B.float().contiguous()
    full, saved_modules = _full_tensors(adapter, moved, target, wrapped)
    tensors.update(full)
    cfg = _config(adapter, mods, saved_modules, target)
    used = set(moved.origin.values())
    dropped = [m.path for m in adapter.modules if not any(c in used for c in m.parts)]
    rows = [m.row() for m in sorted(mods, key=lambda m: m.path)]
    names = family_of(arch).checkpoint_names({}, target.meta)[1]
    report = {"source_adapter": str(adapter.directory), "rank": rank, "modules": rows, "module_names": names,
              "exact_low_rank": [r["module"] for r in rows if r["exact"]],
              "refactorised": {r["module"]: r["rel_error"] for r in rows if not r["exact"]},
              "max_rel_error": max((r["rel_error"] for r in rows if not r["exact"]), default=0.0),
              "ranks": sorted({r["rank"] for r in rows}), "saved_whole": sorted(k[len(PEFT_PREFIX):] for k in full),
              "not_transported": sorted(adapter.outside + dropped)}
    files = {CONFIG_FILE: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
             WEIGHTS_FILE: safetensors_bytes(tensors, {**(meta or {}), "format": "pt"})}
    return files, report


__all__ = ["adapter_files", "parse_rank", "Written"]
