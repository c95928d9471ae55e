"""GradFix ``prepare`` cost vs the bare forward + backward pass it needs.

Random-init ViT-B-16 visual tower (open_clip config), 10 classes x K = 2 = 20 random 224px images,
a random normalised 10-way head. Each measurement runs in its own process so peak memory (RSS on
CPU, allocated memory on CUDA) belongs to that measurement alone.

    python -m bench.gradfix [--device cpu|cuda] [--threads N] [--micro-batch 0 2 4] [--repeat 1] [--load N]

``--load N`` measures everything twice: idle, then while N busy-loop processes (each pinned to one core,
the last cores first) share the machine; the bench starts and stops them and prints both tables and the
loaded / idle ratios.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import cpu_seconds, peak_bytes, reset_peak, run_child


def _setup(arch_name: str, classes: int, shots: int, device: str):
    from transport.families.open_clip import build_open_clip_tower, open_clip_arch
    from transport.sources import to_canonical
    from transport.data import Task
    from transport.core.heads import Classifier
    from transport.core.model import Model

    arch = open_clip_arch(arch_name)
    torch.manual_seed(0)
    tower = build_open_clip_tower(arch)
    params = {k: v.detach().float().clone() for k, v in to_canonical(tower.state_dict(), arch).items()}
    del tower
    g = torch.Generator().manual_seed(1)
    head = Classifier(torch.nn.functional.normalize(torch.randn(classes, arch.feature_dim, generator=g), dim=-1),
                      normalize=True, logit_scale=100.0, classnames=[f"class{i}" for i in range(classes)])
    n = classes * shots
    x = torch.rand(n, 3, arch.image_size, arch.image_size, generator=g)
    y = torch.arange(classes).repeat(shots)
    task = Task("random", list(head.classnames), {"train": (x, y), "val": (x[:1], y[:1]), "test": (x[:1], y[:1])})
    return arch, Model(arch, params, f"random:{arch_name}", head=head), task





def worker(mode: str, arch_name: str, classes: int, shots: int, device: str, micro_batch: int) -> dict:
    from transport.core.stems import preprocess
    from transport.core.losses import task_loss
    from transport.methods import TransportInputs
    from transport.methods.gradfix import prepare

    arch, model, task = _setup(arch_name, classes, shots, device)
    gc.collect()
    reset_peak(device)
    base = peak_bytes(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if mode == "bare":  # one batched forward + backward of the same samples, gradients kept (what an optimizer needs)
        x, y = task.shots(shots, 0)
        loss_fn, _ = task_loss(model, task, device)
        p = {k: v.to(device).requires_grad_(True) for k, v in model.params.items()}
        loss = loss_fn(p, preprocess(arch, x.to(device)), y.to(device)).mean()
        grads = torch.autograd.grad(loss, list(p.values()))
        float(grads[0].sum())
        extra = {}
    else:
        al = prepare(TransportInputs(model, model, task, shots, 0, device), {"micro_batch": micro_batch})
        extra = {"micro_batch_used": al.micro_batch, "n": al.n_samples}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak_bytes(device),
            "base_bytes": base, **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[0], help="0 = automatic")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--load", type=int, default=0, help="also measure under N pinned busy-loop processes")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        mode, mb = a.worker.split(":")
        print(json.dumps(worker(mode, a.arch, a.classes, a.shots, a.device, int(mb))))
        return
    if a.load:
        idle = _measure(a)
        procs = _start_load(a.load)
        try:
            time.sleep(1.0)
            loaded = _measure(a)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        _print(a, idle, "idle")
        _print(a, loaded, f"{a.load} busy-loop process(es) pinned to one core each")
        print(f"\n{'loaded / idle':<22}{'wall':>8}{'cpu':>8}")
        for r0, r1 in zip(idle, loaded):
            print(f"{_name(r0):<22}{r1['seconds'] / r0['seconds']:>8.2f}{r1['cpu_seconds'] / r0['cpu_seconds']:>8.2f}")
        return
    _print(a, _measure(a), f"load average at start {os.getloadavg()[0]:.1f}")


def _start_load(n: int) -> list:
    """n busy-loop processes, each pinned to one core (the last cores first) where the OS allows it."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = []
    for k in range(n):
        pin = f"import os; os.sched_setaffinity(0, {{{cores[-1 - k % len(cores)]}}})\n" if cores else ""
        procs.append(subprocess.Popen([sys.executable, "-c", pin + "while True:\n    pass"]))
    return procs


def _name(r: dict) -> str:
    return "bare fwd+bwd (batch)" if r["mode"] == "bare" else \
        f"prepare mb={r['micro_batch_used']}" + (" (auto)" if r["requested_mb"] == 0 else "")


def _measure(a) -> list:
    runs = [("bare", 0)] + [("prepare", mb) for mb in a.micro_batch]
    rows = []
    for _ in range(a.repeat):
        for mode, mb in runs:
            r = run_child("bench.gradfix", ["--worker", f"{mode}:{mb}", "--arch", a.arch, "--classes", str(a.classes),
                                            "--shots", str(a.shots), "--device", a.device, "--threads", str(a.threads)])
            rows.append({**r, "requested_mb": mb})
    return rows


def _print(a, rows: list, condition: str) -> None:
    bare = min(r["seconds"] for r in rows if r["mode"] == "bare")
    bare_cpu = min(r["cpu_seconds"] for r in rows if r["mode"] == "bare")
    print(f"\nGradFix prepare vs bare forward+backward: {a.arch}, {a.classes} classes x K={a.shots} "
          f"= {a.classes * a.shots} images, device {a.device}, threads {a.threads or torch.get_num_threads()}, "
          f"{condition}")
    print(f"{'run':<22}{'wall s':>8}{'x bare':>8}{'cpu s':>8}{'x bare':>8}{'peak GiB':>10}{'base GiB':>10}")
    for r in rows:
        print(f"{_name(r):<22}{r['seconds']:>8.2f}{r['seconds'] / bare:>8.2f}{r['cpu_seconds']:>8.2f}"
              f"{r['cpu_seconds'] / bare_cpu:>8.2f}{r['peak_bytes'] / 2**30:>10.2f}{r['base_bytes'] / 2**30:>10.2f}")
    print("wall: elapsed; cpu: process user+system time (robust when other work shares the CPU); peak: the "
          "process's peak RSS during the run (cpu) or peak allocated memory (cuda); base: resident before the run")


if __name__ == "__main__":
    main()
