"""Theseus: closed-form transport of a task vector across widths (and depths) from unlabelled calibration
samples (Rinaldi, Panariello, Salici et al., 2026, arXiv:2602.12952).

``prepare`` runs BOTH pretrained models on the same calibration samples (:mod:`.theseus_inputs`: images,
each model with its own preprocessing and the source's patch grid resized to the target's; or texts,
the same token ids for both models, one row per real token), accumulates for every activation space
the cross-covariance ``C = X_A^T X_B`` (float64, streamed block by block over small chunks,
:mod:`.theseus_fit`), and turns each block's C into the rectangular Procrustes maps ``T = U V^T``
(:mod:`transport.core.procrustes`) as soon as the block is done. ``apply`` maps every update in closed
form: for a linear module with rows = outputs, columns = inputs, ``dW_B = T_out^T dW_A T_in`` and
``db_B = T_out^T db_A``; the final projection (used as ``x @ P``) ``dP_B = T_in^T dP_A T_out``; norm
gains and biases by their norm's output map. Generally: every axis of a tensor is contracted with the
map of the activation space it lives in.

Language models add three things:

- heads (option ``heads``, :mod:`.theseus_maps`): under grouped-query attention or rotary positions the
  q, k, v and ctx maps of a layer are fitted together: heads move as heads, one q/k map per key/value
  group shared by its query heads (under rotary positions 2x2 rotations on rotary pairs of equal
  frequency; APPROXIMATE, and reported so, where head widths differ), one v map per group that is also
  its query heads' ctx map;
- depth (option ``depth``, :mod:`.theseus_depth`): when depths differ each target block takes its update
  from one source block (relative depth, or activation similarity), unmatched target blocks get zero;
- tied embeddings: the token embedding is ONE tensor serving as input embedding and unembedding; it is
  mapped once, with the input embedding's map (``res:0``: its rows are exactly what enters block 0,
  so that map is fitted on the tensor's own rows, while ``ln_post``'s is fitted on normalised final
  states; for a truly tied model the two are one symmetry space anyway). An untied target of a tied
  source gets the source tensor's update in both of its tensors (``ln_post``'s map for the unembedding).
  Token embeddings are always transported (their vocabulary axis is shared by construction).

Activation spaces (one map each; source and target are paired by these names):

=============  ==========================================  ===========================================
space          rows                                        maps the axes of
=============  ==========================================  ===========================================
``embed``      embedding output (ln_pre input)             embeddings (only with transport_embeddings)
``res:0``      block 0 input (ln_pre output)               ln_pre; token embedding (without ln_pre)
``ln1:l``      ln1 output = input of q, k, v (shared)      q/k/v columns, ln1
``q:l`` ...    q, k, v outputs                             q/k/v rows and biases
``ctx:l``      concatenated head context = input of o      o columns
``o:l``        o output (attention branch)                 o rows and bias ('branch' out maps)
``res:la``     residual stream after attention (ln2 input) o rows and bias ('residual' out maps)
``ln2:l``      ln2 output = input of fc1                   fc1 columns, ln2
``act:l``      MLP post-activation = input of fc2          fc2 columns; fc1 rows and bias ('shared')
``fc1:l``      MLP pre-activation (``hidden='separate'``)  fc1 rows and bias ('separate')
``fc2:l``      fc2 output (MLP branch)                     fc2 rows and bias ('branch' out maps)
``res:lm``     residual stream after block l               fc2 rows and bias ('residual' out maps)
``ln_post``    final norm output                           ln_post, projection rows, untied unembedding
``proj``       projection output                           projection columns
=============  ==========================================  ===========================================

Choices (the paper's text was not available; these are ours, consistent with its abstract):

- LayerNorm output and input are different spaces (LayerNorm commutes with permutations, not with
  rotations): q, k, v read the ln1 output, so their map comes from it, and ln1's gain and bias live
  there too; the residual-stream maps (``res:*``) serve the diagnostics, the PCA view and, on request,
  the output side of o and fc2.
- The MLP hidden units get ONE map by default (``hidden='shared'``), from the post-activation: GELU acts
  unit by unit, so fc1's outputs and fc2's inputs share one coordinate system, and the pre-activation
  ``X W1^T + b1`` has rank <= d + 1 in an m-dimensional space (m = 4d): a map fitted on it leaves
  m - d - 1 directions undetermined, while fine-tuning moves fc1's rows in all of them. ``'separate'``
  fits the pre-activation map as well (one more m x m map per block).
- ``ln_post`` and ``proj`` use every token of the last residual stream (final LayerNorm and projection
  applied to each token), not only the pooled class token: with n images the class token alone
  leaves a d-dimensional map determined by n rows.
- The polar factor (option ``polar``, :func:`transport.core.procrustes.polar`): ``'auto'`` takes the float64
  eigendecomposition of the smaller Gram matrix up to 1024 wide and the float32 one above (the MLP
  maps). That is the fast choice, but in float32 the squared spectrum loses the directions whose
  singular value is below about 3e-4 of the largest; ``'svd32'`` keeps them at about 1.7x the cost of
  a large map, ``'svd'`` is the float64 SVD (``python -m bench.theseus --polar`` measures all of them).
- class token, positional embedding and patch embedding are set to zero (listed in ``zeroed``) unless
  ``transport_embeddings`` and their non-residual axes agree; tensors the source lacks are zero too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from transport.core.arch import Arch
from transport.core.axis_maps import TensorMap
from transport.core.layout import ParamInfo, param_axes, same_shapes, site_layer
from transport.core.procrustes import POLAR_MODES, naive_map
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import read_safetensors, write_safetensors
from transport.methods import MethodInfo, Option, Progress, TransportInputs, no_progress
from transport.methods.theseus_depth import DEPTH_MODES, check_mapping, depth_info
from transport.methods.theseus_fit import PCA_ROWS, Fit
from transport.methods.theseus_inputs import Calibration, check_inputs
from transport.methods.theseus_maps import HEAD_MODES, resolve_heads

Tensor = torch.Tensor

OUT_MAPS = ("branch", "residual")
HIDDEN = ("shared", "separate")
SPEC = (
    Option("calib_batches", 1, "calibration batches", flag=True, minimum=1),
    Option("calib_size", 32, "calibration batch size", flag=True, minimum=1),
    Option("center", False, "centre the activations before the cross-covariance"),
    Option("whiten", 0.0, "partial whitening exponent p in [0, 0.5]", minimum=0.0, maximum=0.5),
    Option("eps", 1e-6, "relative regulariser of the whitening", minimum=0.0),
    Option("hidden", "shared", "MLP hidden units: one map from the post-activation, or a separate "
           "pre-activation map for fc1's rows", choices=HIDDEN),
    Option("out_maps", "branch", "output side of o and fc2: their branch's output map, or the residual "
           "stream's", choices=OUT_MAPS, apply_only=True),
    Option("transport_embeddings", False, "also transport the embeddings (class token, positions, patch "
           "embedding; token embeddings always are)", apply_only=True),
    Option("polar", "auto", "how polar factors are computed (see the docs)", choices=POLAR_MODES),
    Option("heads", "auto", "attention head maps: free per space (the paper's), or grouped (one q/k and one v "
           "map per key/value group, rotary pairs kept); auto: grouped under grouped-query attention or "
           "rotary positions", choices=HEAD_MODES),
    Option("depth", "relative", "when depths differ, which source block each target block takes its update "
           "from: by relative depth, or by activation similarity (CKA)", choices=DEPTH_MODES),
)
OPTIONS: dict[str, Any] = {o.name: o.default for o in SPEC}


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def check_options(options: dict) -> dict:
    """Defaults filled in and every value checked (one-line TransportError naming the option)."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise TransportError(f"theseus: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    o = {**OPTIONS, **options}
    if isinstance(o["whiten"], int) and not isinstance(o["whiten"], bool):
        o["whiten"] = float(o["whiten"])
    for k in ("calib_batches", "calib_size"):
        if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 1:
            raise TransportError(f"theseus: option {k} must be a positive integer, got {o[k]!r}")
    try:
        o["whiten"], o["eps"] = float(o["whiten"]), float(o["eps"])
    except (TypeError, ValueError):
        raise TransportError(f"theseus: options whiten and eps must be numbers, got {o['whiten']!r}, {o['eps']!r}") from None
    if not 0.0 <= o["whiten"] <= 0.5:
        raise TransportError(f"theseus: option whiten (the exponent p) must be in [0, 0.5], got {o['whiten']}")
    if not (o["eps"] > 0 and math.isfinite(o["eps"])):
        raise TransportError(f"theseus: option eps must be a positive number, got {o['eps']}")
    if o["hidden"] not in HIDDEN:
        raise TransportError(f"theseus: option hidden must be one of {', '.join(HIDDEN)}, got {o['hidden']!r}")
    if o["out_maps"] not in OUT_MAPS:
        raise TransportError(f"theseus: option out_maps must be one of {', '.join(OUT_MAPS)}, got {o['out_maps']!r}")
    for k, allowed in (("polar", POLAR_MODES), ("heads", HEAD_MODES), ("depth", DEPTH_MODES)):
        if o[k] not in allowed:
            raise TransportError(f"theseus: option {k} must be one of {', '.join(allowed)}, got {o[k]!r}")
    for k in ("center", "transport_embeddings"):
        if not isinstance(o[k], bool):
            raise TransportError(f"theseus: option {k} must be true or false, got {o[k]!r}")
    return o


# ----------------------------------------------------------------------------------------------
# the alignment
# ----------------------------------------------------------------------------------------------
def space_layer(space: str) -> int:
    """Block index of an activation space (-1 for ``embed``, ``res:0``, ``ln_post`` and ``proj``)."""
    return site_layer(space)


@dataclass
class TheseusAlignment:
    """Procrustes maps ``T`` [d_source, d_target] (float32) per activation space, plus what the app draws."""

    source_arch: Arch
    target_arch: Arch
    maps: dict[str, Tensor]
    info: dict  # diagnostics (see :meth:`diagnostics`)
    options: dict = field(default_factory=dict)
    pca_sample: dict[str, dict[str, Optional[Tensor]]] = field(default_factory=dict)

    def diagnostics(self) -> dict:
        """``{"method", "calib_images", "maps", "updates", "zeroed", "unused", "timings", "calibration", "depth",
        "heads"}``.

        maps: per space ``space, layer, d_source, d_target, residual_before`` (naive zero-pad /
        truncation map), ``residual_after`` (``||X_A T - X_B|| / ||X_B||``) and the leading singular
        values of C; updates (from the last :func:`apply`, at alpha = 1): per transported tensor its
        target ``name, layer, block``, the ``source`` tensor it came from and Frobenius norms
        ``norm_source`` / ``norm_target``; unused: the source tensors with a nonzero update that reaches no
        target tensor (a dropped source block, an untied unembedding under a tied target, embeddings not
        transported); calibration: ``kind`` (images | texts), ``samples``, ``rows``
        (paired rows per space: tokens, real tokens only for texts); depth: the depth map
        (:func:`transport.methods.theseus_depth.depth_info`); heads: ``mode`` (free | grouped) and per
        layer the matched groups and query heads and whether the q/k part is exact.
        """
        la, lb = self.source_arch.layers, self.target_arch.layers
        same = depth_info("relative", list(range(lb)), la, lb) if la == lb else {}
        return {"method": "theseus", "calib_images": int(self.info.get("calib_images", 0)),
                "maps": list(self.info.get("maps", [])), "updates": list(self.info.get("updates", [])),
                "zeroed": list(self.info.get("zeroed", [])), "unused": list(self.info.get("unused", [])),
                "timings": dict(self.info.get("timings", {})),
                "calibration": dict(self.info.get("calibration", {})), "depth": dict(self.info.get("depth", same)),
                "heads": dict(self.info.get("heads", {"mode": "free", "layers": []}))}

    def depth_map(self) -> list[Optional[int]]:
        """Per target block the source block it takes its update from (None: zero update)."""
        depth = self.info.get("depth")
        if depth is None:
            if self.source_arch.layers != self.target_arch.layers:
                raise TransportError("theseus: this alignment has no depth map and the depths differ")
            return list(range(self.target_arch.layers))
        mapping = list(depth["map"])
        try:
            check_mapping(mapping, self.source_arch.layers, self.target_arch.layers)
        except ValueError as e:
            raise TransportError(f"theseus: malformed alignment: {e}") from None
        return mapping

    def mapped_sample(self, space: str) -> Tensor:
        """The PCA sample of the source in ``space`` mapped into the target's coordinates, ``X_A T`` [n, d_B]."""
        return self._sample(space) @ self.maps[space]

    def naive_sample(self, space: str) -> Tensor:
        """The same rows zero-padded / truncated to the target's width (what no alignment gives)."""
        T = self.maps[space]
        return self._sample(space) @ naive_map(T.shape[0], T.shape[1], T.dtype)

    def _sample(self, space: str) -> Tensor:
        if space not in self.pca_sample:
            raise TransportError(f"theseus: no PCA sample for space '{space}' (have: {', '.join(self.pca_sample)})")
        if space not in self.maps:
            raise TransportError(f"theseus: no map for space '{space}'")
        return self.pca_sample[space]["source"].float()

    # -- files --------------------------------------------------------------------------------
    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"map/{k}": v.detach().float().contiguous().cpu() for k, v in self.maps.items()}
        pca_labels = {}
        for space, s in self.pca_sample.items():
            tensors[f"pca/{space}/source"] = s["source"].contiguous().cpu()
            tensors[f"pca/{space}/target"] = s["target"].contiguous().cpu()
            if s.get("labels") is not None:
                tensors[f"pca/{space}/labels"] = s["labels"].contiguous().cpu()
            pca_labels[space] = s.get("labels") is not None
        write_safetensors(d / "theseus.safetensors", tensors)
        meta = {"format": "transport.theseus", "source_arch": self.source_arch.to_json(),
                "target_arch": self.target_arch.to_json(), "options": self.options, "info": self.info,
                "map_order": list(self.maps), "pca_order": list(self.pca_sample)}
        (d / "alignment.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory) -> "TheseusAlignment":
        d = Path(directory)
        try:
            meta = json.loads((d / "alignment.json").read_text())
        except (OSError, ValueError) as e:
            raise TransportError(f"{d / 'alignment.json'}: not a readable Theseus alignment ({type(e).__name__})") from None
        if meta.get("format") != "transport.theseus":
            raise TransportError(f"{d / 'alignment.json'}: not a Theseus alignment")
        tensors, _ = read_safetensors(d / "theseus.safetensors")
        maps = {k: tensors[f"map/{k}"] for k in meta["map_order"]}
        pca = {}
        for space in meta["pca_order"]:
            pca[space] = {"source": tensors[f"pca/{space}/source"], "target": tensors[f"pca/{space}/target"],
                          "labels": tensors.get(f"pca/{space}/labels")}
        return cls(Arch.from_json(meta["source_arch"]), Arch.from_json(meta["target_arch"]), maps,
                   meta["info"], meta["options"], pca)


#: tokens per forward chunk: one block's activations of a chunk stay small (tens of MB for ViT-B)
CHUNK_ROWS = 2048


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------
PCA_TOKENS = 4096  # at most this many tokens per model for the display sample (bounds the extra forward)


def _display_sample(task, n: int, seed: int) -> Optional[tuple[Tensor, Tensor]]:
    """The PCA view's images: ``n`` train images stratified by class (labels pick and colour them, they never
    touch a map). None for texts and for tasks without labels to stratify by."""
    if getattr(task, "kind", "image") == "text" or not getattr(task, "labelled", True) or n < 1:
        return None
    _, y = task.split("train")
    if y is None or len(y) == 0 or not hasattr(task, "stratified"):
        return None
    return task.stratified(n, seed)


def prepare(inputs: TransportInputs, options: dict, progress: Progress = no_progress) -> TheseusAlignment:
    """Procrustes maps between the two pretrained models' activation spaces from unlabelled train samples."""
    o = check_options(dict(options or {}))
    A, B = inputs.source, inputs.target
    if inputs.task is None:
        raise TransportError("theseus needs unlabelled calibration images or texts: give --task or --data")
    check_inputs(inputs.task, A, B)
    heads = resolve_heads(o["heads"], A.arch, B.arch)
    shown = _display_sample(inputs.task, min(PCA_ROWS, max(1, PCA_TOKENS // max(A.arch.tokens, B.arch.tokens, 1))),
                            inputs.seed)
    calib = Calibration.draw(inputs.task, o["calib_batches"] * o["calib_size"], inputs.seed, A.arch, B.arch,
                             CHUNK_ROWS, shown)
    if len(calib) == 0:
        raise TransportError(f"theseus: task {inputs.task.name} has no training samples for calibration")
    fit = Fit(inputs, o, calib, heads)
    with torch.no_grad():
        mapping, depth = fit.depth(progress)
        fit.embed_stage()
        fit.blocks([(i, j) for j, i in enumerate(mapping) if i is not None], progress)
    pca_sample = {}
    for space, s in fit.pca.items():
        pca_sample[space] = {"source": torch.cat(s["source"]), "target": torch.cat(s["target"]),
                             "labels": None if calib.labels is None else
                             (calib.labels if calib.display else calib.labels[:fit.n_pca]).clone()}
    info = {"calib_images": len(calib), "maps": fit.map_info, "updates": [],
            "zeroed": _zeroed_names(A.arch, B.arch, fit.maps, o, mapping),
            "timings": {k: round(v, 4) for k, v in fit.timings.items()},
            "cpu_timings": {k: round(v, 4) for k, v in fit.cpu.items()},
            "calibration": {"kind": "texts" if calib.text else "images", "samples": len(calib), "rows": fit.rows},
            "depth": depth, "heads": {"mode": heads, "layers": fit.head_info}}
    progress(1.0, f"theseus: {len(fit.maps)} maps from {len(calib)} calibration {'texts' if calib.text else 'images'}")
    return TheseusAlignment(A.arch, B.arch, fit.maps, info, o, pca_sample)


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
def axis_space(info: ParamInfo, axis: int, out_maps: str = "branch", hidden: str = "shared") -> Optional[str]:
    """The activation space whose map acts on ``axis`` of the canonical tensor ``info`` (None: no map).

    Read off the axis table: the site the axis indexes; with ``hidden='shared'`` an MLP unit axis uses the
    post-activation map; with ``out_maps='residual'`` a branch output uses the residual stream it joins.
    """
    a = info.axes[axis]
    if a is None or a.site is None:
        return None
    if info.block == "embed":
        return a.site if a.space == "res:0" else None
    if a.space is not None and a.space.startswith("mlp:") and hidden == "shared":
        return f"act:{info.layer}"
    if a.residual is not None and out_maps == "residual":
        return a.residual
    return a.site


def source_name(name: str, info: ParamInfo, depth: list[Optional[int]], source_arch: Arch) -> Optional[str]:
    """The source tensor a target tensor takes its update from (None: a target block no source block serves).

    Blocks follow the depth map; a tied source's token embedding also serves an untied target's unembedding.
    """
    if info.layer >= 0:
        i = depth[info.layer]
        return None if i is None else f"blocks.{i}." + name.split(".", 2)[2]
    if name == "head.unembed" and source_arch.tied_embeddings:
        return "embed.tokens"
    return name


def _plan(name: str, src: Optional[str], source: dict[str, ParamInfo], target: dict[str, ParamInfo],
          maps: dict[str, Tensor], o: dict) -> Optional[list[Optional[str]]]:
    """Per axis the space to map it with (None: identity, sizes equal); None when the tensor is not transported.

    The token embedding (one tensor even when tied: input embedding AND unembedding) is always transported,
    with its width axis's ONE map, the input embedding's (``res:0`` without ln_pre); see the module docstring.
    """
    tb = target[name]
    ta = source.get(src) if src is not None else None
    if ta is None or len(ta.shape) != len(tb.shape):
        return None
    if tb.block == "embed" and not o["transport_embeddings"] and name != "embed.tokens":
        return None
    plan: list[Optional[str]] = []
    for k in range(len(tb.shape)):
        space = axis_space(tb, k, o["out_maps"], o["hidden"])
        if space is not None and tb.block == "embed" and space not in maps:
            space = "res:0"  # no ln_pre: the embedding output is the block-0 input
        if space is None:
            if ta.shape[k] != tb.shape[k]:
                return None
        elif space not in maps or tuple(maps[space].shape) != (ta.shape[k], tb.shape[k]):
            return None
        plan.append(space)
    return plan


def _zeroed_names(a: Arch, b: Arch, maps: dict[str, Tensor], o: dict, depth: list[Optional[int]]) -> list[str]:
    source, target = param_axes(a), param_axes(b)
    return [n for n, i in target.items() if _plan(n, source_name(n, i, depth, a), source, target, maps, o) is None]


def transport_tensor(t: Tensor, axis_maps: list[Optional[Tensor]]) -> Tensor:
    """Contract every mapped axis of ``t`` with its map T [d_A, d_B]: ``out[..j..] = sum_i t[..i..] T[i, j]``.

    For a linear weight [d_out, d_in] that is ``T_out^T dW T_in``; for a bias ``T_out^T db``; for the
    projection [d, e] (used as ``x @ P``) ``T_in^T dP T_out``.
    """
    out = t
    for k, T in enumerate(axis_maps):
        if T is not None:
            out = (out.movedim(k, -1) @ T.to(out.dtype)).movedim(-1, k)
    return out.contiguous()


def apply(alignment: TheseusAlignment, tau: TaskVector, alpha: float = 1.0, options: Optional[dict] = None) -> TaskVector:
    """alpha * (tau transported to the target architecture), in the target's canonical names (every tensor)."""
    o = check_options({**{k: v for k, v in alignment.options.items() if k in OPTIONS},
                       **{k: v for k, v in (options or {}).items() if k in OPTIONS}})
    if not same_shapes(tau.arch, alignment.source_arch):
        raise TransportError(f"theseus: the task vector is for {tau.arch.name} (width {tau.arch.width}), "
                             f"the alignment was prepared from source {alignment.source_arch.name} "
                             f"(width {alignment.source_arch.width})")
    source, target = param_axes(alignment.source_arch), param_axes(alignment.target_arch)
    depth = alignment.depth_map()
    out: dict[str, Tensor] = {}
    zeroed, updates = [], []
    for name, info in target.items():
        src_name = source_name(name, info, depth, alignment.source_arch)
        plan = _plan(name, src_name, source, target, alignment.maps, o) if src_name in tau.tensors else None
        if plan is None:
            out[name] = torch.zeros(info.shape)
            zeroed.append(name)
            continue
        src = tau.tensors[src_name].detach().float().cpu()
        moved = transport_tensor(src, [None if s is None else alignment.maps[s] for s in plan])
        out[name] = moved * float(alpha)
        updates.append({"name": name, "layer": info.layer, "block": info.block, "source": src_name,
                        "norm_source": float(src.double().norm()), "norm_target": float(moved.double().norm())})
    used = {u["source"] for u in updates}
    alignment.info["updates"] = updates
    alignment.info["zeroed"] = zeroed
    alignment.info["unused"] = [n for n, t in tau.tensors.items() if n not in used and bool(t.detach().abs().max() > 0)]
    return TaskVector(alignment.target_arch, out, {"transported_by": "theseus"})


def axis_maps(alignment: TheseusAlignment, options: Optional[dict] = None,
              arch: Optional[Arch] = None) -> dict[str, TensorMap]:
    """The closed form as per-axis matrices: per target tensor its source tensor (depth map, tied embeddings)
    and each axis's Procrustes map T [d_A, d_B] (None: same size, not mapped). What :func:`apply` does at
    alpha = 1 to a task vector holding every source tensor; low-rank factors move as ``(T_out^T L)(R T_in)``."""
    o = check_options({**{k: v for k, v in alignment.options.items() if k in OPTIONS},
                       **{k: v for k, v in (options or {}).items() if k in OPTIONS}})
    if arch is not None and not same_shapes(arch, alignment.source_arch):
        raise TransportError(f"theseus: the task vector is for {arch.name}, the alignment was prepared from "
                             f"source {alignment.source_arch.name}")
    source, target = param_axes(alignment.source_arch), param_axes(alignment.target_arch)
    depth = alignment.depth_map()
    out: dict[str, TensorMap] = {}
    for name, info in target.items():
        src_name = source_name(name, info, depth, alignment.source_arch)
        plan = _plan(name, src_name, source, target, alignment.maps, o)
        if plan is not None:
            out[name] = TensorMap(src_name, tuple(None if s is None else alignment.maps[s] for s in plan))
    return out


# ----------------------------------------------------------------------------------------------
# the naive baseline across widths
# ----------------------------------------------------------------------------------------------
def naive_resize(tau: TaskVector, target_arch: Arch, alpha: float = 1.0) -> TaskVector:
    """alpha * tau zero-padded / truncated to the target's shapes (leading corner kept): no alignment at all."""
    target = param_axes(target_arch)
    out = {}
    for name, info in target.items():
        z = torch.zeros(info.shape)
        t = tau.tensors.get(name)
        if t is not None and t.dim() == len(info.shape):
            idx = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, info.shape))
            z[idx] = t[idx].float().cpu() * float(alpha)
        out[name] = z
    return TaskVector(target_arch, out, {"transported_by": "naive_resize"})


def _load(directory) -> TheseusAlignment:
    return TheseusAlignment.load(directory)


METHOD = MethodInfo(name="theseus",
                    summary="closed-form transport across widths: Procrustes maps between activations of both "
                            "pretrained models on a few unlabelled images, dW_B = T_out^T dW_A T_in",
                    same_arch=False, data="unlabelled", prepare=prepare, apply=apply, load_alignment=_load,
                    spec=SPEC, same_depth=False, axis_maps=axis_maps)

__all__ = ["METHOD", "axis_maps", "OPTIONS", "TheseusAlignment", "prepare", "apply", "naive_resize", "transport_tensor",
           "axis_space", "check_options", "space_layer", "source_name"]
