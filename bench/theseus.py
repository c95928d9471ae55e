"""Theseus ``prepare`` cost: random-init ViT-B-16 -> ViT-B-16-plus-240, 32 calibration images.

Reports the time split into the two models' forward passes, the streamed cross-covariance accumulation
and the Procrustes maps (polar factors), the peak memory (RSS on CPU, allocated memory on CUDA), the
``apply`` time, and (``--polar``) the accuracy and cost of the polar factor from the eigendecomposition
of the smaller Gram matrix against the float64 thin SVD on real cross-covariances of the two towers.
``--floors`` measures what no implementation of this formulation can avoid: the bare forwards of both
towers, one float32 cross-covariance product per map and one polar factor per map (on real block-0
cross-covariances), and sums them for the 12-block count of maps. Each measurement runs in its own
process so its peak memory is its own. The load average is printed:
on a shared machine timings are only as good as the CPU time the process actually got.

    python -m bench.theseus [--device cpu|cuda] [--threads N] [--images 32] [--polar] [--floors] [--layers L]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.common import cpu_seconds, peak_bytes, random_model, reset_peak, run_child, sync

SOURCE, TARGET = "ViT-B-16", "ViT-B-16-plus-240"


def _models(layers: int):
    return [random_model(name, i, layers) for i, name in enumerate((SOURCE, TARGET))]


def _task(n: int, size: int):
    from transport.data import Task

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Task("random", [str(i) for i in range(10)], {"train": (x, y), "val": (x[:1], y[:1]), "test": (x[:1], y[:1])})





def run_prepare(device: str, images: int, layers: int) -> dict:
    from transport.methods import TransportInputs
    from transport.methods.theseus import apply, prepare
    from transport.core.task_vector import TaskVector

    A, B = _models(layers)
    task = _task(images, B.arch.image_size)
    inputs = TransportInputs(A, B, task, seed=0, device=device)
    reset_peak(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    c0, t0 = cpu_seconds(), time.perf_counter()
    al = prepare(inputs, {"calib_size": images}, lambda f, m: None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = peak_bytes(device)
    g = torch.Generator().manual_seed(1)
    tau = TaskVector(A.arch, {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in A.params.items()})
    t1 = time.perf_counter()
    apply(al, tau, 1.0)
    t_apply = time.perf_counter() - t1
    d = al.diagnostics()
    big = [m for m in d["maps"] if m["d_source"] > 1024]
    return {"wall_s": wall, "cpu_s": cpu, "peak_gib": peak / 2**30, "apply_s": t_apply, **d["timings"],
            "cpu": al.info.get("cpu_timings", {}),
            "maps": len(d["maps"]), "big_maps": len(big), "calib_images": d["calib_images"],
            "mean_residual_after": sum(m["residual_after"] for m in d["maps"]) / len(d["maps"])}


def run_polar(device: str, images: int, layers: int) -> dict:
    """Real cross-covariances of block 0 (768 x 896 and 3072 x 3584): eigh-based polar vs float64 SVD."""
    import transport.methods.theseus as th
    from transport.methods import TransportInputs
    from transport.core.procrustes import polar

    A, B = _models(1)
    captured = {}
    real = th.polar

    def capture(C, *a, **k):
        if C.shape[0] in (768, 3072) and C.shape[0] not in captured:
            captured[C.shape[0]] = C.clone()
        return real(C, *a, **k)

    th.polar = capture
    th.prepare(TransportInputs(A, B, _task(images, B.arch.image_size), seed=0, device=device),
               {"calib_size": images}, lambda f, m: None)
    th.polar = real
    rows = []
    for d_a, C in sorted(captured.items()):
        C = C.to(device)
        ref, _ = polar(C, "svd")
        ref = ref.double()
        obj = float((ref * C).sum())
        for mode in ("svd", "svd32", "eigh", "eigh32"):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            T, _ = polar(C, mode)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            T = T.double()
            rows.append({"map": f"{C.shape[0]}x{C.shape[1]}", "mode": mode, "seconds": dt,
                         "orth_err": float((T @ T.t() - torch.eye(d_a, dtype=T.dtype, device=T.device)).abs().max()),
                         "diff_vs_svd": float((T - ref).norm() / d_a ** 0.5),
                         "objective_loss": 1 - float((T * C).sum()) / obj})
    return {"rows": rows}


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_floors(device: str, images: int, layers: int) -> dict:
    """Unavoidable costs, each measured alone: bare forwards, one product and one polar factor per map."""
    import transport.methods.theseus as th
    from transport.core.forward import encode
    from transport.core.stems import preprocess
    from transport.methods import TransportInputs
    from transport.core.procrustes import polar

    L = layers or 12
    A1, B1 = _models(1)
    captured: dict[tuple, object] = {}
    real = th.polar

    def capture(C, *a, **k):
        captured.setdefault(tuple(C.shape), C.clone())
        return real(C, *a, **k)

    th.polar = capture
    al = th.prepare(TransportInputs(A1, B1, _task(images, B1.arch.image_size), seed=0, device=device),
                    {"calib_size": images}, lambda f, m: None)
    th.polar = real
    per_block = [m for m in al.diagnostics()["maps"] if m["layer"] == 0]
    outside = [m for m in al.diagnostics()["maps"] if m["layer"] != 0]
    shapes = [(m["d_source"], m["d_target"]) for m in per_block] * L + [(m["d_source"], m["d_target"]) for m in outside]
    big = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    small = (A1.arch.width, B1.arch.width)
    n_big = sum(1 for s in shapes if s == big)
    n_small = len(shapes) - n_big  # the few narrower maps (projection) are counted at the width's cost
    rows = images * B1.arch.tokens
    step = max(1, th.CHUNK_ROWS // max(A1.arch.tokens, B1.arch.tokens))  # the chunks prepare runs its forwards in
    out: dict = {"maps": len(shapes), "big": list(big), "small": list(small), "n_big": n_big, "n_small": n_small,
                 "rows": rows}
    g = torch.Generator().manual_seed(0)
    for key, (da, db) in (("big", big), ("small", small)):
        xa, xb = torch.randn(rows, da, generator=g).to(device), torch.randn(rows, db, generator=g).to(device)
        out[f"product_{key}"] = _best(lambda: (xa.t() @ xb, sync(device)), 3)
        C = captured[(da, db)].to(device)
        out[f"polar_{key}"] = _best(lambda: (polar(C), sync(device)), 2)
        del xa, xb
    Cb = captured[big].to(device).float()
    Gb = Cb @ Cb.t()
    out["eigh_big"] = _best(lambda: (torch.linalg.eigh(Gb), sync(device)), 2)
    del A1, B1, al, captured, Cb, Gb
    imgs = torch.rand(images, 3, 240, 240, generator=g)
    for key, name in (("forward_source", SOURCE), ("forward_target", TARGET)):
        M = random_model(name, 0, layers)
        x = preprocess(M.arch, imgs).to(device)
        p = {k: v.to(device) for k, v in M.params.items()}
        with torch.no_grad():
            out[key] = _best(lambda: ([encode(p, M.arch, x[i:i + step]) for i in range(0, images, step)],
                                      sync(device)), 1)
        del M, p
    out["sum"] = (out["forward_source"] + out["forward_target"] + n_big * (out["product_big"] + out["polar_big"])
                  + n_small * (out["product_small"] + out["polar_small"]))
    return out


def _child(args) -> dict:
    return run_child("bench.theseus", ["--worker", args.mode, "--device", args.device, "--threads", str(args.threads),
                                       "--images", str(args.images), "--layers", str(args.layers)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--layers", type=int, default=0, help="only the first L blocks (0: all 12)")
    p.add_argument("--polar", action="store_true", help="also compare polar-factor algorithms on real C")
    p.add_argument("--floors", action="store_true", help="also measure the unavoidable costs and their sum")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        fn = {"prepare": run_prepare, "polar": run_polar, "floors": run_floors}[args.worker]
        print(json.dumps(fn(args.device, args.images, args.layers)))
        return
    load0 = os.getloadavg()
    print(f"# Theseus prepare: random-init {SOURCE} -> {TARGET}, {args.images} calibration images, "
          f"device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"# load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cores")
    args.mode = "prepare"
    r = _child(args)
    c = r["cpu"]
    print("| layers | maps (m x m) | forward s | covariance s | polar s | prepare wall s | peak GiB | apply s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.layers or 12} | {r['maps']} ({r['big_maps']}) | {r['forward']:.1f} | {r['covariance']:.1f} | "
          f"{r['svd']:.1f} | {r['wall_s']:.1f} | {r['peak_gib']:.2f} | {r['apply_s']:.1f} |")
    print(f"| process CPU s | | {c.get('forward', 0):.1f} | {c.get('covariance', 0):.1f} | {c.get('svd', 0):.1f} | "
          f"{r['cpu_s']:.1f} | | |")
    if args.polar:
        args.mode = "polar"
        rows = _child(args)["rows"]
        print("\n| map (block 0) | polar via | seconds | max |T T^T - I| | ||T - T_svd||_F / sqrt(d_A) | "
              "1 - tr(T^T C) / tr(T_svd^T C) |")
        print("|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['map']} | {x['mode']} | {x['seconds']:.2f} | {x['orth_err']:.1e} | {x['diff_vs_svd']:.1e} | "
                  f"{x['objective_loss']:.1e} |")
    if args.floors:
        args.mode = "floors"
        f = _child(args)
        (ba, bb), (sa, sb) = f["big"], f["small"]
        print(f"\n| floor ({f['rows']} rows per map) | count | each s | total s |")
        print("|---|---|---|---|")
        print(f"| bare forward (no recording), {SOURCE} | 1 | {f['forward_source']:.1f} | {f['forward_source']:.1f} |")
        print(f"| bare forward (no recording), {TARGET} | 1 | {f['forward_target']:.1f} | {f['forward_target']:.1f} |")
        for key, (da, db) in (("big", (ba, bb)), ("small", (sa, sb))):
            n = f[f"n_{key}"]
            print(f"| cross product X_A^T X_B, {da} x {db} | {n} | {f[f'product_{key}']:.3f} | "
                  f"{n * f[f'product_{key}']:.1f} |")
            print(f"| polar factor, {da} x {db} | {n} | {f[f'polar_{key}']:.3f} | {n * f[f'polar_{key}']:.1f} |")
        print(f"| (of which the float32 eigh of the {ba} x {ba} Gram matrix) | {f['n_big']} | {f['eigh_big']:.2f} | "
              f"{f['n_big'] * f['eigh_big']:.1f} |")
        print(f"| **sum of floors** | | | **{f['sum']:.1f}** (prepare measured: {r['wall_s']:.1f}) |")
    load1 = os.getloadavg()
    print(f"# load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
