"""Theseus's prepare loop: both pretrained models advance over the calibration chunks, block pair by block pair.

Per chunk of calibration samples only one block's activations are alive (besides the residual
streams entering the next block); every activation space accumulates its cross-covariance in
float64 (:class:`~transport.core.procrustes.CrossCovariance`) and gets its map as soon as its block is
done. With a depth map (:mod:`transport.methods.theseus_depth`) source block i is paired with target
block j: each model runs the blocks in between unrecorded. Source sites are renamed to the target's
(``q:i`` -> ``q:j``), so every map is keyed by the target's activation space.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.forward import block, embed, norm
from transport.core.layout import site_layer
from transport.core.memory import release_freed
from transport.core.procrustes import CrossCovariance, polar
from transport.core.stems import model_inputs
from transport.methods import Progress, TransportInputs
from transport.methods.theseus_depth import (block_similarity, depth_info, relative_depth, row_stride,
                                             similarity_depth)
from transport.methods.theseus_inputs import Calibration
from transport.methods.theseus_maps import HEAD_SITES, head_maps

Tensor = torch.Tensor

PCA_ROWS = 256  # at most this many display rows (one per sample) per residual space for the PCA view
SPECTRUM = 256  # singular values kept per map in the diagnostics
_PRE_ACTIVATION = ("fc1", "gate")  # sites kept only with hidden='separate'


class _Spaces:
    """A recorder that keeps, per activation site, the tensor [N, tokens, width] one stage reveals."""

    def __init__(self, hidden: str):
        self.hidden = hidden
        self.found: dict[str, Tensor] = {}

    def __call__(self, site: str, x: Tensor) -> None:
        if site.split(":")[0] in _PRE_ACTIVATION and self.hidden != "separate":
            return
        if site in ("ln_post", "proj"):  # the pooled features: Theseus maps every token instead
            return
        self.found[site] = x


def _head_spaces(params: dict[str, Tensor], arch: Arch, x: Tensor, proj: bool) -> dict[str, Tensor]:
    """``ln_post`` and (when both models project) ``proj``, from every token of the last residual stream."""
    z = norm(x, params, "ln_post", arch)
    return {"ln_post": z, **({"proj": z @ params["head.proj"]} if proj and arch.output_dim else {})}


def _renamed(site: str, layer: int) -> str:
    """A block site of the source renamed to the target block it is paired with."""
    kind = site.split(":")[0]
    return f"res:{layer}{site[-1]}" if kind == "res" else f"{kind}:{layer}"


class Fit:
    """One prepare run: both models advance over the calibration chunks, pair by pair of matched blocks."""

    def __init__(self, inputs: TransportInputs, o: dict, calib: Calibration, heads: str):
        self.A, self.B, self.o, self.calib, self.heads = inputs.source, inputs.target, o, calib, heads
        self.device = torch.device(inputs.device)
        self.pa, self.pb = _on(self.A.params, self.device), _on(self.B.params, self.device)
        self.acc: dict[str, CrossCovariance] = {}
        self.maps: dict[str, Tensor] = {}
        self.map_info: list[dict] = []
        self.head_info: list[dict] = []
        self.pca: dict[str, dict[str, list]] = {}
        self.timings = {"forward": 0.0, "covariance": 0.0, "svd": 0.0}
        self.cpu = {"forward": 0.0, "covariance": 0.0, "svd": 0.0}  # process CPU seconds (all threads) per phase
        self.n_pca = min(PCA_ROWS, len(calib))  # without a display sample: the first calibration samples
        self.rows = 0
        n = len(calib.chunks)
        self.xa: list[Optional[Tensor]] = [None] * n  # the residual stream entering the next block, per chunk
        self.xb: list[Optional[Tensor]] = [None] * n
        self.masks: list[Optional[Tensor]] = [calib.chunk(ci, self.device)[1] for ci in range(n)]

    def clock(self, phase: str, t0: float, c0: float) -> None:
        self.timings[phase] += time.perf_counter() - t0
        self.cpu[phase] += time.process_time() - c0

    # -- maps ---------------------------------------------------------------------------------
    def _store(self, space: str, cc: CrossCovariance, T: Tensor, S: Tensor, isometry: bool = True) -> None:
        o = self.o
        self.maps[space] = T.float().cpu()
        self.map_info.append({"space": space, "layer": site_layer(space), "d_source": cc.d_a, "d_target": cc.d_b,
                              "residual_before": cc.residual_naive(o["center"]),
                              "residual_after": cc.residual(T, o["center"], isometry),
                              "singular_values": [float(s) for s in S[:SPECTRUM].cpu()]})

    def finish(self) -> None:
        """Every space accumulated so far: its map and diagnostics (a layer's head spaces together when grouped)."""
        t0, c0 = time.perf_counter(), time.process_time()
        o = self.o
        for space in list(self.acc):
            if space not in self.acc:  # already fitted with its layer's other head spaces
                continue
            layer = site_layer(space)
            if self.heads == "grouped" and space.split(":")[0] in HEAD_SITES and layer >= 0:
                group = {s: self.acc.pop(f"{s}:{layer}") for s in HEAD_SITES}
                C = {s: cc.target_matrix(o["center"], o["whiten"], o["eps"]) for s, cc in group.items()}
                T, info = head_maps(C, self.A.arch, self.B.arch, o["polar"])
                self.head_info.append({"layer": layer, **info})
                for s, cc in group.items():
                    self._store(f"{s}:{layer}", cc, T[s], _singular_values(C[s]), isometry=False)
                continue
            cc = self.acc.pop(space)
            T, S = polar(cc.target_matrix(o["center"], o["whiten"], o["eps"]), o["polar"], rank=cc.n)
            self._store(space, cc, T, S)
            del cc, T, S
            release_freed()  # the polar factor's temporaries leave the resident set (the heap keeps them else)
        self.clock("svd", t0, c0)

    def pair(self, found_a: dict[str, Tensor], found_b: dict[str, Tensor], ci: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        o, mask, first = self.o, self.masks[ci], self.calib.chunks[ci].start
        display = first >= self.calib.n_calib  # a display chunk: PCA rows only, never a map
        for space, xa in found_a.items():
            if space not in found_b:
                continue
            xb = found_b[space]
            if space == "res:0" or space.startswith("res:") and space.endswith("m"):
                if display:
                    keep = xa.shape[0]
                else:
                    keep = 0 if self.calib.display else max(0, min(xa.shape[0], self.n_pca - first))
                if keep:
                    s = self.pca.setdefault(space, {"source": [], "target": []})
                    s["source"].append(self.calib.display_rows(xa, keep, mask).detach().to(torch.float16).cpu())
                    s["target"].append(self.calib.display_rows(xb, keep, mask).detach().to(torch.float16).cpu())
            if display:
                continue
            ra, rb = self.calib.paired_rows(xa, xb, mask)
            if space not in self.acc:
                d_a, d_b = ra.shape[1], rb.shape[1]
                head = self.heads == "grouped" and space.split(":")[0] in HEAD_SITES
                self.acc[space] = CrossCovariance(d_a, d_b, gram_a=d_a > d_b or o["whiten"] > 0 or head,
                                                  gram_b=o["whiten"] > 0, device=self.device)
            self.acc[space].update(ra, rb)
            if space == "res:0":
                self.rows += ra.shape[0]
        self.clock("covariance", t0, c0)

    # -- forward ------------------------------------------------------------------------------
    def run(self, fn_a, fn_b, ci: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        t0, c0 = time.perf_counter(), time.process_time()
        sa, sb = _Spaces(self.o["hidden"]), _Spaces(self.o["hidden"])
        self.xa[ci], self.xb[ci] = fn_a(sa), fn_b(sb)
        self.clock("forward", t0, c0)
        return sa.found, sb.found

    def advance(self, side: str, ci: int, start: int, stop: int) -> None:
        """Run blocks start..stop-1 of one model on chunk ci without recording."""
        p, arch, xs = (self.pa, self.A.arch, self.xa) if side == "a" else (self.pb, self.B.arch, self.xb)
        t0, c0 = time.perf_counter(), time.process_time()
        for l in range(start, stop):
            xs[ci] = block(p, arch, l, xs[ci], mask=self.masks[ci])
        self.clock("forward", t0, c0)

    def embed_stage(self) -> None:
        A, B = self.A, self.B
        for ci in range(len(self.calib.chunks)):
            x, _ = self.calib.chunk(ci, self.device)
            found_a, found_b = self.run(lambda r: embed(self.pa, A.arch, model_inputs(A.arch, x), r),
                                        lambda r: embed(self.pb, B.arch, model_inputs(B.arch, x), r), ci)
            found_a.setdefault("res:0", self.xa[ci])  # without ln_pre the embedding output enters block 0
            found_b.setdefault("res:0", self.xb[ci])
            if "embed" not in found_a or "embed" not in found_b:  # both need an ln_pre for this space
                found_a.pop("embed", None)
                found_b.pop("embed", None)
            self.pair(found_a, found_b, ci)
        self.finish()

    def blocks(self, steps: list[tuple[int, int]], progress: Progress) -> None:
        """Source block i paired with target block j for every matched (i, j), in order."""
        A, B = self.A, self.B
        pos_a = pos_b = 0
        what = "texts" if self.calib.text else "images"
        for k, (i, j) in enumerate(steps):
            last = k == len(steps) - 1
            for ci in range(len(self.calib.chunks)):
                mask = self.masks[ci]
                self.advance("a", ci, pos_a, i)
                self.advance("b", ci, pos_b, j)
                found_a, found_b = self.run(lambda r: block(self.pa, A.arch, i, self.xa[ci], r, mask=mask),
                                            lambda r: block(self.pb, B.arch, j, self.xb[ci], r, mask=mask), ci)
                if i != j:
                    found_a = {_renamed(s, j): v for s, v in found_a.items()}
                found_a[f"res:{j}m"], found_b[f"res:{j}m"] = self.xa[ci], self.xb[ci]
                if last:  # blocks after the last matched pair run unrecorded, then the final norm's spaces
                    self.advance("a", ci, i + 1, A.arch.layers)
                    self.advance("b", ci, j + 1, B.arch.layers)
                    found_a.update(_head_spaces(self.pa, A.arch, self.xa[ci], bool(B.arch.output_dim)))
                    found_b.update(_head_spaces(self.pb, B.arch, self.xb[ci], bool(A.arch.output_dim)))
                self.pair(found_a, found_b, ci)
                del found_a, found_b
            pos_a, pos_b = i + 1, j + 1
            self.finish()
            progress(min(0.99, (k + 1) / len(steps)),
                     f"theseus: block {j + 1}/{B.arch.layers} ({len(self.calib)} {what})")

    # -- depth --------------------------------------------------------------------------------
    def streams(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every k-th calibration row of both models' residual streams entering each block and leaving the last.

        Block-major (every chunk through block l before block l + 1), so a streamed model reads each block once."""
        A, B = self.A, self.B
        cal = self.calib
        total = int(cal.samples.mask.sum()) if cal.text else len(cal) * B.arch.tokens
        stride = row_stride(total)
        chunks = list(cal.calibration_chunks())
        out: tuple[list[Tensor], list[Tensor]] = ([], [])
        t0, c0 = time.perf_counter(), time.process_time()
        for side, (p, arch) in enumerate(((self.pa, A.arch), (self.pb, B.arch))):
            hs, masks = [], []
            for ci in chunks:
                x, mask = cal.chunk(ci, self.device)
                hs.append(embed(p, arch, model_inputs(arch, x)))
                masks.append(mask)
            for l in range(arch.layers + 1):
                offset, kept = 0, []
                for k in range(len(chunks)):
                    rows = cal.rows(hs[k], masks[k], B.arch.tokens)
                    n = rows.shape[0]
                    keep = torch.nonzero((torch.arange(n, device=rows.device) + offset) % stride == 0).flatten()
                    kept.append(rows[keep].float().cpu())
                    offset += n
                    if l < arch.layers:
                        hs[k] = block(p, arch, l, hs[k], mask=masks[k])
                out[side].append(torch.cat(kept))
            del hs
        self.clock("forward", t0, c0)
        return out

    def depth(self, progress: Progress) -> tuple[list[Optional[int]], dict]:
        la, lb = self.A.arch.layers, self.B.arch.layers
        if la == lb:
            return list(range(lb)), depth_info(self.o["depth"], list(range(lb)), la, lb)
        if self.o["depth"] == "relative":
            mapping = relative_depth(la, lb)
            return mapping, depth_info("relative", mapping, la, lb)
        progress(0.0, f"theseus: matching {lb} target blocks to {la} source blocks by activation similarity")
        with torch.no_grad():
            S = block_similarity(*self.streams())
        mapping = similarity_depth(S)
        return mapping, depth_info("similarity", mapping, la, lb, S)


def _on(params: Mapping[str, Tensor], device: torch.device) -> Mapping[str, Tensor]:
    """The parameters on ``device``: on the CPU the mapping itself (a streamed model stays streamed)."""
    if device.type == "cpu":
        return params
    return {k: params[k].to(device) for k in params}


def _singular_values(C: Tensor) -> Tensor:
    """Singular values of C (descending) from the eigenvalues of its smaller Gram matrix."""
    C = C.to(torch.float64)
    G = C @ C.t() if C.shape[0] <= C.shape[1] else C.t() @ C
    return torch.linalg.eigvalsh(0.5 * (G + G.t())).flip(0).clamp_min(0).sqrt()


__all__ = ["Fit", "PCA_ROWS", "SPECTRUM"]
