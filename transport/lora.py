"""LoRA adapters (PEFT) as low-rank task vectors: a source model's adapter directory read into canonical
factors (:class:`~transport.core.lowrank.LowRankTaskVector`), moved by the methods, written back for the
target by :mod:`transport.lora_write`.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Each adapted
module M with factors ``lora_A`` [r, in] and ``lora_B`` [out, r] adds ``scale * B @ A`` to its weight in
(out, in) order whatever the module stores (a Conv1D stores [in, out]: PEFT's ``fan_in_fan_out``), with
``scale = alpha / r`` (``alpha / sqrt(r)`` under ``use_rslora``; per module ``rank_pattern`` /
``alpha_pattern``). The module's weight is found in the family's name table through the family's own
tower rules (prefixes like a classifier wrapper's, older spellings); a fused weight (q, k and v in one
tensor, as in a multi-head attention's ``in_proj_weight`` or GPT-2's ``c_attn``) splits ``B``'s rows into
one factor pair per canonical tensor, all sharing ``A``. PEFT's multi-head-attention LoRA (the fused input
projection plus its nested output projection) is refused: PEFT's own forward adds twice (lora_alpha/r) B A to
the output projection (peft 0.21), so the adapter's update is not the low-rank task vector its factors say.

Full tensors an adapter saves (biases under ``bias='all'`` / ``'lora_only'``, ``modules_to_save``) are the
trained values: their updates are the difference to the source pretrained model, dense. What lies outside
the transported tower (a text tower, a classification head) is reported and left out. DoRA, LoRA on
embeddings or bare parameters, and the other variants whose update is not ``scale * B @ A`` are refused
with one line.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.lowrank import LowRank, LowRankTaskVector, scale_of
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import read_checkpoint, read_safetensors
from transport.sources import family_of, from_canonical

Tensor = torch.Tensor

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
BIAS_MODES = ("none", "all", "lora_only")
LINEAR_HOWS = ("same", "transpose", "fused", "fused_t")
#: roles of a canonical 2-D tensor's input axis (layout: 'read' columns, o's 'o' columns, fc2's 'down' columns)
INPUT_ROLES = ("read", "o", "down")
#: config fields whose update is not scale * B @ A (or that PEFT applies outside plain LoRA layers)
REFUSED = {
    "use_dora": "DoRA (use_dora) is not supported: its magnitude vector rescales the columns of the whole "
                "weight, so the update is not a low-rank task vector",
    "lora_bias": "lora_bias is not supported (a trained bias on lora_B)",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token rows (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication is not supported (it duplicates base layers)",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported: its update is only "
                               "active after the invocation tokens",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported (a learned diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config) are not supported",
}
_LORA_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")


def is_adapter_dir(ref: str | Path) -> bool:
    """A directory holding a PEFT ``adapter_config.json`` (the rest is checked when it is read)."""
    p = Path(ref)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class Module:
    """One adapted module of the source: its PEFT path, its weight's family key, the canonical tensors that
    weight holds (in the order of B's rows), its rank and alpha. ``nested``: an output projection inside a
    multi-head-attention LoRA (PEFT path ``...attn.base_layer.out_proj``)."""

    path: str
    key: str
    parts: tuple[str, ...]
    rank: int
    alpha: float
    nested: bool = False


@dataclass
class Adapter:
    """A PEFT LoRA adapter read for one source model (see the module docstring)."""

    directory: Path
    config: dict
    arch: Arch
    prefix: str  # what stands before the family's names in the adapter's module paths ('' or e.g. 'vit.')
    modules: list[Module]
    full: dict[str, str]  # canonical tensor saved whole -> 'bias' | 'module'
    outside: list[str]  # adapted modules / saved tensors outside the transported tower (left out)
    tau: LowRankTaskVector

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    def module_of(self, canonical: str) -> Optional[Module]:
        for m in self.modules:
            if canonical in m.parts:
                return m
        return None


# ----------------------------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------------------------
def read_config(directory: Path) -> dict:
    """``adapter_config.json``, checked: a LoRA adapter of a supported kind (one clear line otherwise)."""
    f = directory / CONFIG_FILE
    if not directory.is_dir():
        raise TransportError(f"{directory}: not a directory (a PEFT adapter is a directory with {CONFIG_FILE} "
                             f"and {WEIGHTS_FILE})")
    if not f.is_file():
        raise TransportError(f"{f}: file not found (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise TransportError(f"{f}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise TransportError(f"{f}: not a PEFT adapter config (a JSON object is expected)")
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise TransportError(f"{f}: peft_type {json.dumps(kind)} is not supported (only LORA adapters are)")
    for name, why in REFUSED.items():
        if cfg.get(name):
            raise TransportError(f"{f}: {why}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise TransportError(f"{f}: r must be a positive integer, got {json.dumps(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise TransportError(f"{f}: lora_alpha must be a positive number, got {json.dumps(alpha)}")
    if cfg.get("bias", "none") not in BIAS_MODES:
        raise TransportError(f"{f}: bias {json.dumps(cfg.get('bias'))} is not one of {', '.join(BIAS_MODES)}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise TransportError(f"{f}: {name} must be an object (module pattern -> value)")
    return cfg


def pattern_key(patterns: Sequence[str], module: str) -> Optional[str]:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module`` (PEFT's rule: the pattern,
    a regular expression, matches the module path's end after a dot), or None."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def module_rank_alpha(cfg: dict, owner: str) -> tuple[int, float]:
    """The rank and alpha the config gives the module ``owner`` (patterns first)."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    kr, ka = pattern_key(list(rp), owner), pattern_key(list(ap), owner)
    return int(rp[kr] if kr is not None else cfg["r"]), float(ap[ka] if ka is not None else cfg["lora_alpha"])


# ----------------------------------------------------------------------------------------------
# names: PEFT module paths -> the family's keys -> canonical tensors
# ----------------------------------------------------------------------------------------------
def _unwrapped(key: str) -> str:
    """A PEFT-wrapped parameter name in the base model's own names (every ``base_layer.`` removed)."""
    return re.sub(r"(^|\.)base_layer\.", r"\1", key)


def tower_keys(keys: Sequence[str], arch: Arch) -> dict[str, Optional[tuple[str, str]]]:
    """Each state-dict key -> (family key, prefix before it) when the family's tower rules keep it, else None.

    The family decides what its tower is (prefixes, text towers and heads left out): each key is probed
    with a tensor holding its index, and the kept ones are traced back by that index."""
    fam = family_of(arch)
    keys = list(keys)
    probe = {k: torch.full((1,), float(i), dtype=torch.float64) for i, k in enumerate(keys)}
    out: dict[str, Optional[tuple[str, str]]] = {k: None for k in keys}
    for kept, v in fam.tower(probe, arch).items():
        original = keys[int(v.item())]
        prefix = original[: len(original) - len(kept)] if original.endswith(kept) else ""
        out[original] = (fam.table.alias(kept), prefix)
    return out


def key_entries(arch: Arch) -> dict[str, list]:
    """Family key -> its name-table entries for ``arch`` (in part order)."""
    out: dict[str, list] = {}
    for e in family_of(arch).table.expand(arch):
        out.setdefault(e.key, []).append(e)
    return {k: sorted(es, key=lambda e: e.part) for k, es in out.items()}


def input_axis(arch: Arch, canonical: str) -> int:
    """Which axis of a canonical 2-D tensor is its input (0 for a projection used as ``x @ P``)."""
    info = param_axes(arch)[canonical]
    axes = [k for k, a in enumerate(info.axes) if a is not None and a.role in INPUT_ROLES]
    if len(info.shape) != 2 or len(axes) != 1:
        raise TransportError(f"{canonical} is not a linear weight of {arch.name}")
    return axes[0]


def weight_parts(arch: Arch, key: str, what: str) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """(canonical parts, their output sizes, input size) of the linear weight ``key`` (one line otherwise)."""
    entries = key_entries(arch).get(key)
    if not entries:
        raise TransportError(f"{what}: {key} is not a weight of {arch.name}")
    bad = [e for e in entries if e.kind not in LINEAR_HOWS]
    if bad:
        why = "is tied to the token embedding" if bad[0].kind == "tied" else f"is stored as '{bad[0].how}'"
        raise TransportError(f"{what}: {key} {why}, not a linear weight a LoRA can adapt")
    shapes = param_axes(arch)
    sizes, n_in = [], None
    for e in entries:
        ax = input_axis(arch, e.canon)
        shape = shapes[e.canon].shape
        if e.kind in ("fused", "fused_t"):
            # the concatenation runs along the stored output axis: B's rows split, A is shared
            stored_in = ax if e.kind == "fused" else 1 - ax
            if stored_in == (0 if e.kind == "fused" else 1):
                raise TransportError(f"{what}: {key} concatenates its parts along the input axis")
        sizes.append(shape[1 - ax])
        if n_in not in (None, shape[ax]):
            raise TransportError(f"{what}: the parts of {key} read inputs of different sizes")
        n_in = shape[ax]
    return tuple(e.canon for e in entries), tuple(sizes), int(n_in)


def canonical_factors(arch: Arch, parts: Sequence[str], sizes: Sequence[int], B: Tensor, A: Tensor,
                      scale: float) -> dict[str, LowRank]:
    """One factor pair per canonical part of a weight whose update is ``scale * B @ A`` in (out, in) order."""
    out, start = {}, 0
    for c, n in zip(parts, sizes):
        Bp = B[start:start + n]
        start += n
        out[c] = LowRank(Bp, A, scale) if input_axis(arch, c) == 1 else LowRank(A.t().contiguous(), Bp.t().contiguous(), scale)
    return out


# ----------------------------------------------------------------------------------------------
# reading an adapter
# ----------------------------------------------------------------------------------------------
def _weights(directory: Path, trust_pickle: bool) -> dict[str, Tensor]:
    st, bin_ = directory / WEIGHTS_FILE, directory / WEIGHTS_BIN
    if st.is_file():
        tensors, _ = read_safetensors(st)
    elif bin_.is_file():
        tensors, _ = read_checkpoint(bin_, trust_pickle)
    else:
        raise TransportError(f"{st}: file not found (the adapter's weights)")
    if not tensors:
        raise TransportError(f"{st}: holds no tensors")
    named = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}
    # a module of modules_to_save may come as its trained copy next to the original (PEFT under bias='all')
    out = {k: v for k, v in named.items() if ".modules_to_save." not in k and ".original_module." not in k}
    out.update({k.replace(".modules_to_save.", "."): v for k, v in named.items() if ".modules_to_save." in k})
    return out


def _split_keys(tensors: dict[str, Tensor], where: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """(module path -> {'A', 'B'}, full tensors by name); other LoRA tensors refused by what they are."""
    lora: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    for k, v in tensors.items():
        m = _LORA_KEY.match(k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        elif "lora_magnitude_vector" in k:
            raise TransportError(f"{where}: {k} is a DoRA magnitude vector; DoRA is not supported (the update "
                                 "is not a low-rank task vector)")
        elif "lora_embedding_" in k:
            raise TransportError(f"{where}: {k}: LoRA on an embedding is not supported (only linear modules)")
        elif "lora_" in k:
            raise TransportError(f"{where}: {k} is not a plain LoRA factor (lora_A / lora_B weights)")
        else:
            full[k] = v
    for path, ab in lora.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise TransportError(f"{where}: module {path} has no {missing}.weight")
    return lora, full


def _module(cfg: dict, arch: Arch, path: str, A: Tensor, B: Tensor, key: str, where: str) -> Module:
    nested = ".base_layer." in path
    owner = path.split(".base_layer.")[0] if nested else path
    parts, sizes, n_in = weight_parts(arch, key, where)
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.dim() != 2 or not t.is_floating_point():
            raise TransportError(f"{where}: {path}.{name}.weight must be a floating-point matrix, got "
                                 f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise TransportError(f"{where}: {path}.{name}.weight contains NaN or Inf values")
    r = int(A.shape[0])
    if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (sum(sizes), r):
        raise TransportError(f"{where}: {path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                             f"{key} of {arch.name} (needs [r, {n_in}] and [{sum(sizes)}, r])")
    rank, alpha = module_rank_alpha(cfg, owner)
    if rank != r:
        raise TransportError(f"{where}: {path} has rank {r} but {CONFIG_FILE} gives it {rank}")
    return Module(path, key, parts, r, alpha, nested)


def _full_deltas(full: dict[str, Tensor], known: dict[str, tuple[str, str]], source: Model, where: str
                 ) -> dict[str, Tensor]:
    """Canonical updates of tensors saved whole: saved value minus the source pretrained value."""
    arch = source.arch
    fam = family_of(arch)
    shapes = fam.family_shapes(arch)
    given = {known[k][0]: v for k, v in full.items()}
    fam.table.check_tensors(given, arch, where, fam.squeezable)
    pre = from_canonical(source.params, arch)
    tied = {e.key for es in key_entries(arch).values() for e in es if e.kind == "tied"}
    deltas = {k: (given[k].float().reshape(shapes[k]) - pre[k].float()) if k in given else torch.zeros(shape)
              for k, shape in shapes.items() if k not in tied}
    canon = fam.table.to_canonical(deltas, arch, where)
    wanted = {e.canon for k in given for e in key_entries(arch)[k] if e.kind != "tied"}
    return {c: canon[c] for c in canon if c in wanted}


def read_adapter(directory: str | Path, source: Model, trust_pickle: bool = False) -> Adapter:
    """A PEFT LoRA adapter of ``source`` (its pretrained model) as canonical low-rank factors + dense parts."""
    d = Path(directory)
    cfg = read_config(d)
    where = str(d / WEIGHTS_FILE)
    arch = source.arch
    lora, full = _split_keys(_weights(d, trust_pickle), where)
    if full and cfg.get("bias", "none") == "none" and not cfg.get("modules_to_save"):
        raise TransportError(f"{where}: holds whole tensors ({', '.join(sorted(full)[:3])}) but {CONFIG_FILE} has "
                             "bias 'none' and no modules_to_save")
    if not lora and not full:
        raise TransportError(f"{where}: holds no LoRA factors")
    candidates = {p: [_unwrapped(p) + ".weight"] + ([] if ".base_layer." in p else [p + ".in_proj_weight"])
                  for p in lora}
    full_keys = {k: _unwrapped(k) for k in full}
    probed = tower_keys(sorted({c for cs in candidates.values() for c in cs} | set(full_keys.values())), arch)
    known_keys = set(key_entries(arch))
    table = family_of(arch).table
    modules, outside, prefixes = [], [], set()
    for path in sorted(lora):
        hits = [probed[c] for c in candidates[path] if probed[c] is not None]
        hit = next((h for h in hits if h[0] in known_keys), None)
        if hit is None:
            if not hits or all(table.ignored(h[0]) for h in hits):
                outside.append(path)
                continue
            raise TransportError(f"{where}: adapted module {path} is not a module of {arch.name} (family "
                                 f"{arch.family}: no weight {hits[0][0]})")
        if hit[0].endswith(".in_proj_weight") or ".base_layer." in path:
            raise TransportError(f"{where}: {path}: LoRA on a multi-head attention module is not supported (PEFT's "
                                 "forward adds its output projection's (lora_alpha/r) B A twice: not the task vector its factors give)")
        prefixes.add(hit[1])
        modules.append(_module(cfg, arch, path, lora[path]["A"].float(), lora[path]["B"].float(), hit[0], where))
    known_full = {}
    for k, fk in full_keys.items():
        hit = probed[fk]
        if hit is None or table.ignored(hit[0]):
            outside.append(k)
        elif hit[0] not in known_keys:
            raise TransportError(f"{where}: saved tensor {k} is not a tensor of {arch.name} (family {arch.family})")
        else:
            known_full[k] = hit
            prefixes.add(hit[1])
    if len(prefixes) > 1:
        raise TransportError(f"{where}: the adapted modules sit under different model prefixes "
                             f"({', '.join(sorted(repr(p) for p in prefixes))})")
    if not modules and not known_full:
        raise TransportError(f"{where}: none of its modules belongs to the transported tower of {arch.name}")
    factors: dict[str, LowRank] = {}
    for m in modules:
        A, B = lora[m.path]["A"].float(), lora[m.path]["B"].float()
        scale = scale_of(m.alpha, m.rank, bool(cfg.get("use_rslora")))
        sizes = weight_parts(arch, m.key, where)[1]
        for c, f in canonical_factors(arch, m.parts, sizes, B, A, scale).items():
            if c in factors:
                raise TransportError(f"{where}: two adapted modules update {c}")
            factors[c] = f
    dense = _full_deltas({k: full[k] for k in known_full}, known_full, source, where) if known_full else {}
    both = sorted(set(dense) & set(factors))
    if both:
        raise TransportError(f"{where}: {both[0]} is both adapted and saved whole")
    saved = cfg.get("modules_to_save") or []
    entries = key_entries(arch)
    kinds = {e.canon: ("module" if any(_unwrapped(k).rsplit(".", 1)[0].endswith(s) for s in saved) else "bias")
             for k, hit in known_full.items() for e in entries[hit[0]] if e.kind != "tied"}
    tau = LowRankTaskVector(arch, factors, dense, meta={"adapter": str(d)})
    return Adapter(d, cfg, arch, prefixes.pop() if prefixes else "", modules, kinds, sorted(outside), tau)


# ----------------------------------------------------------------------------------------------
# moving it through the methods
# ----------------------------------------------------------------------------------------------
def transport_lowrank(tau: LowRankTaskVector, steps: Sequence[tuple[Any, Any, dict]], target: Arch) -> LowRankTaskVector:
    """``tau`` through each (method info, alignment, options) step, onto ``target``: a method with per-axis
    maps moves the factors (exact); any other is applied to the dense updates (its factors become
    ``densified``, re-factorised when written). Alignments are never modified."""
    out = tau
    for info, alignment, options in steps:
        maps_of = getattr(info, "axis_maps", None)
        if maps_of is not None:
            out = out.transport(maps_of(alignment, options, out.arch), target)
        else:  # the whole task vector (zeros where nothing is adapted), as the dense transport gets it
            full = out.tensors()
            dense = TaskVector(out.arch, {k: full[k] if k in full else torch.zeros(i.shape)
                                          for k, i in param_axes(out.arch).items()}, out.meta)
            out = out.with_dense_update(info.apply(copy.copy(alignment), dense, 1.0, options))
    return out


__all__ = ["Adapter", "Module", "read_adapter", "read_config", "is_adapter_dir", "transport_lowrank", "tower_keys",
           "key_entries", "weight_parts", "canonical_factors", "input_axis", "module_rank_alpha", "pattern_key",
           "CONFIG_FILE", "WEIGHTS_FILE", "PEFT_PREFIX"]
