"""Theseus: closed-form transport of a task vector across widths from unlabelled calibration images
(Rinaldi, Panariello, Salici et al., 2026, arXiv:2602.12952).

``prepare`` runs BOTH pretrained models on the same calibration images (each with its own
preprocessing; the source's patch grid is resized bilinearly to the target's, class token apart),
accumulates for every activation space the cross-covariance ``C = X_A^T X_B`` (float64, streamed:
both models advance block by block over small chunks of images, so only one block's activations of
one chunk are alive, besides the residual stream entering the block), and turns each block's C into
the rectangular Procrustes maps ``T = U V^T`` (:mod:`transport.procrustes`) as soon as the block is done.
``apply`` maps every update in closed form: for a linear module with rows = outputs, columns = inputs,
``dW_B = T_out^T dW_A T_in`` and ``db_B = T_out^T db_A``; the final projection (used as ``x @ P``)
``dP_B = T_in^T dP_A T_out``; LayerNorm gains and biases by their LayerNorm's output map. Generally:
every axis of a tensor is contracted with the map of the activation space it lives in.

Activation spaces (one map each; source and target are paired by these names):

=============  ==========================================  ===========================================
space          rows                                        maps the axes of
=============  ==========================================  ===========================================
``embed``      embedding output (ln_pre input)             embeddings (only with transport_embeddings)
``res:0``      block 0 input (ln_pre output)               ln_pre
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
``ln_post``    final LayerNorm output                      ln_post, projection rows
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
- The polar factor (option ``polar``, :func:`transport.procrustes.polar`): ``'auto'`` takes the float64
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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from transport.arch import ParamInfo, ViTArch, param_axes
from transport.errors import TransportError
from transport.functional import block, embed, preprocess
from transport.methods import MethodInfo, Progress, TransportInputs, no_progress
from transport.procrustes import POLAR_MODES, CrossCovariance, naive_map, polar, resize_tokens
from transport.task_vector import TaskVector

Tensor = torch.Tensor

OPTIONS: dict[str, Any] = {"calib_batches": 1, "calib_size": 32, "center": False, "whiten": 0.0, "eps": 1e-6,
                           "hidden": "shared", "out_maps": "branch", "transport_embeddings": False, "polar": "auto"}
OUT_MAPS = ("branch", "residual")
HIDDEN = ("shared", "separate")
PCA_ROWS = 256  # class-token rows kept per residual space for the PCA view
SPECTRUM = 256  # singular values kept per map in the diagnostics


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def check_options(options: dict) -> dict:
    """Defaults filled in and every value checked (one-line TransportError naming the option)."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise TransportError(f"theseus: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    o = {**OPTIONS, **options}
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
    if o["polar"] not in POLAR_MODES:
        raise TransportError(f"theseus: option polar must be one of {', '.join(POLAR_MODES)}, got {o['polar']!r}")
    for k in ("center", "transport_embeddings"):
        if not isinstance(o[k], bool):
            raise TransportError(f"theseus: option {k} must be true or false, got {o[k]!r}")
    return o


# ----------------------------------------------------------------------------------------------
# the alignment
# ----------------------------------------------------------------------------------------------
def space_layer(space: str) -> int:
    """Block index of an activation space (-1 for ``embed``, ``res:0``, ``ln_post`` and ``proj``)."""
    m = re.fullmatch(r"[a-z0-9]+:(\d+)|res:(\d+)[am]", space)
    if m is None or space == "res:0":
        return -1
    return int(m.group(1) or m.group(2))


@dataclass
class TheseusAlignment:
    """Procrustes maps ``T`` [d_source, d_target] (float32) per activation space, plus what the app draws."""

    source_arch: ViTArch
    target_arch: ViTArch
    maps: dict[str, Tensor]
    info: dict  # diagnostics (see :meth:`diagnostics`)
    options: dict = field(default_factory=dict)
    pca_sample: dict[str, dict[str, Optional[Tensor]]] = field(default_factory=dict)

    def diagnostics(self) -> dict:
        """``{"method", "calib_images", "maps": [...], "updates": [...], "zeroed": [...], "timings": {...}}``.

        maps: per space ``space, layer, d_source, d_target, residual_before`` (naive zero-pad /
        truncation map), ``residual_after`` (``||X_A T - X_B|| / ||X_B||``) and the leading singular
        values of C; updates (from the last :func:`apply`, at alpha = 1): per transported tensor its
        target ``name, layer, block`` and Frobenius norms ``norm_source`` / ``norm_target``.
        """
        return {"method": "theseus", "calib_images": int(self.info.get("calib_images", 0)),
                "maps": list(self.info.get("maps", [])), "updates": list(self.info.get("updates", [])),
                "zeroed": list(self.info.get("zeroed", [])), "timings": dict(self.info.get("timings", {}))}

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
        from transport.io import write_safetensors

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
        from transport.io import read_safetensors

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
        return cls(ViTArch.from_json(meta["source_arch"]), ViTArch.from_json(meta["target_arch"]), maps,
                   meta["info"], meta["options"], pca)


# ----------------------------------------------------------------------------------------------
# recording: module records -> activation spaces
# ----------------------------------------------------------------------------------------------
_BLOCK_RECORD = re.compile(r"blocks\.(\d+)\.(ln1|ln2|attn\.q|attn\.k|attn\.v|attn\.o|mlp\.fc1|mlp\.fc2)")
#: tokens per forward chunk: one block's activations of a chunk stay small (tens of MB for ViT-B)
CHUNK_ROWS = 2048


class _Spaces:
    """A recorder that keeps, per activation space, the tensor [N, tokens, d] one block (or ln_pre) reveals."""

    def __init__(self, hidden: str):
        self.hidden = hidden
        self.found: dict[str, Tensor] = {}

    def __call__(self, name: str, x: Tensor, y: Tensor) -> None:
        if name == "ln_pre":
            self.found.update({"embed": x, "res:0": y})
            return
        m = _BLOCK_RECORD.fullmatch(name)
        if m is None:
            return
        l, what = int(m.group(1)), m.group(2)
        if what == "ln1":
            self.found[f"ln1:{l}"] = y
        elif what in ("attn.q", "attn.k", "attn.v"):
            self.found[f"{what[-1]}:{l}"] = y
        elif what == "attn.o":
            self.found.update({f"ctx:{l}": x, f"o:{l}": y})
        elif what == "ln2":
            self.found.update({f"res:{l}a": x, f"ln2:{l}": y})
        elif what == "mlp.fc1":
            if self.hidden == "separate":
                self.found[f"fc1:{l}"] = y
        else:
            self.found.update({f"act:{l}": x, f"fc2:{l}": y})


def _head_spaces(params: dict[str, Tensor], arch: ViTArch, x: Tensor, proj: bool) -> dict[str, Tensor]:
    """``ln_post`` and (when both models project) ``proj``, from every token of the last residual stream."""
    z = F.layer_norm(x, (x.shape[-1],), params["ln_post.weight"], params["ln_post.bias"], arch.ln_eps)
    return {"ln_post": z, **({"proj": z @ params["head.proj"]} if proj and arch.output_dim else {})}


def _token_rows(xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the paired activations, the source's patch grid resized to the target's when token counts differ."""
    if xa.shape[0] != xb.shape[0]:
        raise TransportError(f"theseus: calibration batch sizes differ ({xa.shape[0]} vs {xb.shape[0]})")
    ta, tb = xa.shape[1], xb.shape[1]
    if ta != tb:
        ga, gb = math.isqrt(ta - 1), math.isqrt(tb - 1)
        if ga * ga != ta - 1 or gb * gb != tb - 1:
            raise TransportError(f"theseus: token counts {ta} and {tb} are not a class token plus a square patch grid")
        xa = resize_tokens(xa, gb)
    return xa.reshape(-1, xa.shape[-1]), xb.reshape(-1, xb.shape[-1])


def _calibration(task, n: int, seed: int) -> tuple[Tensor, Optional[Tensor]]:
    """Calibration images of the train split and, when the task has them, their labels (display only)."""
    x, y = task.calibration(n, seed, with_labels=True)
    return x, (y if task.labelled and y is not None and len(y) == len(x) else None)


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------
def prepare(inputs: TransportInputs, options: dict, progress: Progress = no_progress) -> TheseusAlignment:
    """Procrustes maps between the two pretrained models' activation spaces from unlabelled train images."""
    o = check_options(dict(options or {}))
    A, B = inputs.source, inputs.target
    if A.arch.layers != B.arch.layers:
        raise TransportError(f"theseus: source and target depths differ ({A.ref}: {A.arch.layers} layers, "
                             f"{B.ref}: {B.arch.layers} layers); Theseus maps layer l to layer l")
    if inputs.task is None:
        raise TransportError("theseus needs unlabelled calibration images: give --task or --data")
    device = torch.device(inputs.device)
    images, labels = _calibration(inputs.task, o["calib_batches"] * o["calib_size"], inputs.seed)
    if len(images) == 0:
        raise TransportError(f"theseus: task {inputs.task.name} has no training images for calibration")
    step = max(1, CHUNK_ROWS // max(A.arch.tokens, B.arch.tokens))
    chunks = [slice(i, min(i + step, len(images))) for i in range(0, len(images), step)]
    pa = {k: v.to(device) for k, v in A.params.items()}
    pb = {k: v.to(device) for k, v in B.params.items()}
    acc: dict[str, CrossCovariance] = {}
    maps: dict[str, Tensor] = {}
    map_info: list[dict] = []
    pca: dict[str, dict[str, list]] = {}
    timings = {"forward": 0.0, "covariance": 0.0, "svd": 0.0}
    cpu = {"forward": 0.0, "covariance": 0.0, "svd": 0.0}  # process CPU seconds (all threads) per phase
    n_rows_pca = min(PCA_ROWS, len(images))

    def clock(phase: str, t0: float, c0: float) -> None:
        timings[phase] += time.perf_counter() - t0
        cpu[phase] += time.process_time() - c0

    def finish() -> None:  # every space accumulated so far: its map and diagnostics
        t0, c0 = time.perf_counter(), time.process_time()
        for space in list(acc):
            cc = acc.pop(space)
            T, S = polar(cc.target_matrix(o["center"], o["whiten"], o["eps"]), o["polar"])
            maps[space] = T.float().cpu()
            map_info.append({"space": space, "layer": space_layer(space), "d_source": cc.d_a, "d_target": cc.d_b,
                             "residual_before": cc.residual_naive(o["center"]),
                             "residual_after": cc.residual(T, o["center"]),
                             "singular_values": [float(s) for s in S[:SPECTRUM].cpu()]})
        clock("svd", t0, c0)

    def pair(found_a: dict[str, Tensor], found_b: dict[str, Tensor], first: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for space, xa in found_a.items():
            xb = found_b[space]
            if space == "res:0" or space.startswith("res:") and space.endswith("m"):
                keep = max(0, min(xa.shape[0], n_rows_pca - first))
                if keep:
                    s = pca.setdefault(space, {"source": [], "target": []})
                    s["source"].append(xa[:keep, 0].detach().to(torch.float16).cpu())
                    s["target"].append(xb[:keep, 0].detach().to(torch.float16).cpu())
            ra, rb = _token_rows(xa, xb)
            if space not in acc:
                d_a, d_b = ra.shape[1], rb.shape[1]
                acc[space] = CrossCovariance(d_a, d_b, gram_a=d_a > d_b or o["whiten"] > 0, gram_b=o["whiten"] > 0,
                                             device=device)
            acc[space].update(ra, rb)
        clock("covariance", t0, c0)

    def run(fn_a, fn_b, ci: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        t0, c0 = time.perf_counter(), time.process_time()
        sa, sb = _Spaces(o["hidden"]), _Spaces(o["hidden"])
        xa[ci], xb[ci] = fn_a(sa), fn_b(sb)
        clock("forward", t0, c0)
        return sa.found, sb.found

    L = A.arch.layers
    xa: list[Optional[Tensor]] = [None] * len(chunks)  # the residual stream entering the next block, per chunk
    xb: list[Optional[Tensor]] = [None] * len(chunks)
    with torch.no_grad():
        for ci, c in enumerate(chunks):
            imgs = images[c].to(device)
            found_a, found_b = run(lambda r: embed(pa, A.arch, preprocess(A.arch, imgs), r),
                                   lambda r: embed(pb, B.arch, preprocess(B.arch, imgs), r), ci)
            found_a.setdefault("res:0", xa[ci])  # without ln_pre the embedding output enters block 0
            found_b.setdefault("res:0", xb[ci])
            if "embed" not in found_a or "embed" not in found_b:  # both need an ln_pre for this space
                found_a.pop("embed", None)
                found_b.pop("embed", None)
            pair(found_a, found_b, c.start)
        finish()
        for l in range(L):
            for ci, c in enumerate(chunks):
                found_a, found_b = run(lambda r: block(pa, A.arch, l, xa[ci], r),
                                       lambda r: block(pb, B.arch, l, xb[ci], r), ci)
                found_a[f"res:{l}m"], found_b[f"res:{l}m"] = xa[ci], xb[ci]
                if l == L - 1:
                    found_a.update(_head_spaces(pa, A.arch, xa[ci], bool(B.arch.output_dim)))
                    found_b.update(_head_spaces(pb, B.arch, xb[ci], bool(A.arch.output_dim)))
                pair(found_a, found_b, c.start)
                del found_a, found_b
            finish()
            progress(min(0.99, (l + 1) / L), f"theseus: block {l + 1}/{L} ({len(images)} images)")
    pca_sample = {}
    for space, s in pca.items():
        pca_sample[space] = {"source": torch.cat(s["source"]), "target": torch.cat(s["target"]),
                             "labels": None if labels is None else labels[:n_rows_pca].clone()}
    info = {"calib_images": len(images), "maps": map_info, "updates": [],
            "zeroed": _zeroed_names(A.arch, B.arch, maps, o), "timings": {k: round(v, 4) for k, v in timings.items()},
            "cpu_timings": {k: round(v, 4) for k, v in cpu.items()}}
    progress(1.0, f"theseus: {len(maps)} maps from {len(images)} calibration images")
    return TheseusAlignment(A.arch, B.arch, maps, info, o, pca_sample)


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
def axis_space(info: ParamInfo, axis: int, out_maps: str = "branch", hidden: str = "shared") -> Optional[str]:
    """The activation space whose map acts on ``axis`` of the canonical tensor ``info`` (None: no map)."""
    l, b, s = info.layer, info.block, info.axes[axis]
    if b == "embed":
        return "embed" if s == "res:0" else None
    if b == "ln_pre":
        return "res:0"
    if b == "ln_post":
        return "ln_post"
    if b == "proj":
        return "ln_post" if axis == 0 else "proj"
    if s is None:
        return None
    if s.startswith("heads:"):
        return f"ctx:{l}" if b == "O" else f"{b.lower()}:{l}"
    if s.startswith("mlp:"):
        return f"fc1:{l}" if b == "fc1" and hidden == "separate" else f"act:{l}"
    # residual-stream axes
    if b in ("Q", "K", "V", "ln1"):
        return f"ln1:{l}"
    if b in ("ln2", "fc1"):
        return f"ln2:{l}"
    if b == "O":
        return f"o:{l}" if out_maps == "branch" else f"res:{l}a"
    if b == "fc2":
        return f"fc2:{l}" if out_maps == "branch" else f"res:{l}m"
    return None


def _plan(name: str, source: dict[str, ParamInfo], target: dict[str, ParamInfo], maps: dict[str, Tensor],
          o: dict) -> Optional[list[Optional[str]]]:
    """Per axis the space to map it with (None: identity, sizes equal); None when the tensor is not transported."""
    tb = target[name]
    ta = source.get(name)
    if ta is None or len(ta.shape) != len(tb.shape):
        return None
    if tb.block == "embed" and not o["transport_embeddings"]:
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


def _zeroed_names(a: ViTArch, b: ViTArch, maps: dict[str, Tensor], o: dict) -> list[str]:
    source, target = param_axes(a), param_axes(b)
    return [n for n in target if _plan(n, source, target, maps, o) is None]


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
    if not tau.arch.same_shapes(alignment.source_arch):
        raise TransportError(f"theseus: the task vector is for {tau.arch.name} (width {tau.arch.width}), "
                             f"the alignment was prepared from source {alignment.source_arch.name} "
                             f"(width {alignment.source_arch.width})")
    source, target = param_axes(alignment.source_arch), param_axes(alignment.target_arch)
    out: dict[str, Tensor] = {}
    zeroed, updates = [], []
    for name, info in target.items():
        plan = _plan(name, source, target, alignment.maps, o) if name in tau.tensors else None
        if plan is None:
            out[name] = torch.zeros(info.shape)
            zeroed.append(name)
            continue
        src = tau.tensors[name].detach().float().cpu()
        moved = transport_tensor(src, [None if s is None else alignment.maps[s] for s in plan])
        out[name] = moved * float(alpha)
        updates.append({"name": name, "layer": info.layer, "block": info.block,
                        "norm_source": float(src.double().norm()), "norm_target": float(moved.double().norm())})
    alignment.info["updates"] = updates
    alignment.info["zeroed"] = zeroed
    return TaskVector(alignment.target_arch, out, {"transported_by": "theseus"})


# ----------------------------------------------------------------------------------------------
# the naive baseline across widths
# ----------------------------------------------------------------------------------------------
def naive_resize(tau: TaskVector, target_arch: ViTArch, alpha: float = 1.0) -> TaskVector:
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
                    options=dict(OPTIONS))

__all__ = ["METHOD", "OPTIONS", "TheseusAlignment", "prepare", "apply", "naive_resize", "transport_tensor",
           "axis_space", "check_options", "space_layer"]
