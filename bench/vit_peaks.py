"""Peak memory of every method's ``prepare`` on ViT towers read from safetensors files, against one model's size.

The models (random-init open_clip image towers, seeds 0 and 1, the GradFix target with a random normalised
10-way head) are written once as safetensors files and loaded with ``load_model(path, stream=True)``: nothing is
read at load time; Theseus then reads each block when it reaches it, TransFusion reads both models into memory
once (weight matching visits every tensor in every sweep), GradFix reads the target once (it needs gradients of
every tensor). Each row runs in a fresh process; peak is its VmHWM (imports and everything it read included),
``base`` the resident set after the imports.

    python -m bench.vit_peaks [--arch ViT-L-14] [--methods transfusion gradfix theseus] [--threads 2] [--dir DIR]
                              [--trace GIB]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_seconds, load_line, peak_bytes, random_model, run_child
from bench.lm_scale import _nbytes, _rss
from bench.memory_trace import HighWater

IMAGES = 32  # Theseus's calibration images
SHOTS, CLASSES = 2, 10  # GradFix's labelled samples: 2 per class


def make(arch_name: str, seed: int, path: Path) -> None:
    """A random-init tower (with a random normalised head) written to ``path`` (kept when already there)."""
    if path.is_file():
        return
    from transport.core.heads import Classifier
    from transport.sources import save_model

    m = random_model(arch_name, seed)
    g = torch.Generator().manual_seed(100 + seed)
    head = Classifier(torch.nn.functional.normalize(torch.randn(CLASSES, m.arch.feature_dim, generator=g), dim=-1),
                      normalize=True, logit_scale=100.0, classnames=[f"class{i}" for i in range(CLASSES)])
    save_model(type(m)(m.arch, m.params, m.ref, head=head), path)


def _task(n: int, size: int):
    from transport.data import Task

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.arange(CLASSES).repeat(n // CLASSES + 1)[:n]
    return Task("random", [f"class{i}" for i in range(CLASSES)],
                {"train": (x, y), "val": (x[:1], y[:1]), "test": (x[:1], y[:1])})


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors an alignment holds (its fields, dicts and lists walked; each storage counted once)."""
    import dataclasses

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(held_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    return 0


def worker(method: str, a: Path, b: Path, trace: float = 0.0) -> dict:
    from transport.methods import TransportInputs, get_method
    from transport.sources import load_model

    base = _rss()
    hw = HighWater(trace, base / 2**30, depth=9).start() if trace > 0 else None
    A, B = load_model(str(a), stream=True), load_model(str(b), stream=True)
    model = _nbytes(A.params)
    m = get_method(method)
    if method == "gradfix":
        inputs, options = TransportInputs(A, B, _task(SHOTS * CLASSES, B.arch.image_size), SHOTS, 0), {}
    elif method == "theseus":
        inputs, options = TransportInputs(A, B, _task(IMAGES, B.arch.image_size), seed=0), {"calib_size": IMAGES}
    else:
        inputs, options = TransportInputs(A, B, None, seed=0), {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    al = m.prepare(inputs, m.resolve(options))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if hw is not None:
        hw.stop()
    return {"marks": hw.lines() if hw is not None else [], "method": method, "prepare_s": seconds,
            "prepare_cpu_s": cpu, "alignment_gib": held_bytes(al) / 2**30,
            "peak_gib": peak_bytes("cpu") / 2**30, "base_gib": base / 2**30, "model_gib": model / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--methods", nargs="+", default=["transfusion", "gradfix", "theseus"],
                    choices=["transfusion", "gradfix", "theseus"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dir", default=None, help="keep the model files here (reused when present)")
    ap.add_argument("--trace", type=float, default=0.0,
                    help="also print the resident set's high-water marks every TRACE GiB, with the stack at each")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        kind, rest = a.worker.split(":", 1)
        if kind == "make":
            seed, path = rest.split(":", 1)
            make(a.arch, int(seed), Path(path))
            print(json.dumps({"made": path}))
        else:
            pa, pb = rest.split("|")
            print(json.dumps(worker(kind, Path(pa), Path(pb), a.trace)))
        return
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="vit_peaks-")
    root = Path(a.dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    common = ["--arch", a.arch, "--threads", str(a.threads)]
    files = [root / f"{a.arch}-{s}.safetensors" for s in (0, 1)]
    try:
        for s, f in enumerate(files):
            run_child("bench.vit_peaks", ["--worker", f"make:{s}:{f}", *common])
        rows = []
        for method in a.methods:
            r = run_child("bench.vit_peaks", ["--worker", f"{method}:{files[0]}|{files[1]}", *common,
                                              "--trace", str(a.trace)])
            for line in r.pop("marks"):
                print(f"  {method}: {line}")
            print(json.dumps(r), flush=True)
            rows.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\n{a.arch} towers read from safetensors (stream=True); load {load_line()}")
    print(f"{'method':<12}{'prepare s (cpu)':>20}{'model GiB':>11}{'base GiB':>10}{'peak GiB':>10}{'peak/model':>12}"
          f"{'peak-base/model':>17}{'result GiB':>12}")
    for r in rows:
        m = r["model_gib"]
        print(f"{r['method']:<12}{r['prepare_s']:>11.1f} ({r['prepare_cpu_s']:.1f}){m:>11.3f}{r['base_gib']:>10.2f}"
              f"{r['peak_gib']:>10.2f}{r['peak_gib'] / m:>12.2f}{(r['peak_gib'] - r['base_gib']) / m:>17.2f}"
              f"{r['alignment_gib']:>12.3f}")


if __name__ == "__main__":
    main()
