"""Helpers every benchmark shares: random-init towers, peak memory, CPU time, one process per measurement."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch


def random_model(arch_name: str, seed: int = 0, layers: int = 0):
    """A random-init open_clip visual tower as a canonical :class:`transport.core.model.Model` (float32)."""
    import dataclasses

    from transport.families.open_clip import build_open_clip_tower, open_clip_arch
    from transport.sources import to_canonical
    from transport.core.model import Model

    arch = open_clip_arch(arch_name)
    if layers:
        arch = dataclasses.replace(arch, layers=layers, name=f"{arch.name}[:{layers}]")
    torch.manual_seed(seed)
    tower = build_open_clip_tower(arch)
    params = {k: v.detach().float().clone() for k, v in to_canonical(tower.state_dict(), arch).items()}
    del tower
    return Model(arch, params, f"random:{arch_name}@{seed}")


def reset_peak(device: str) -> None:
    """Start a new high-water mark: CUDA peak stats, or the process's VmHWM (Linux: /proc/self/clear_refs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: str) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set since :func:`reset_peak`."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (robust when other work shares the CPU)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_child(module: str, args: list[str]) -> dict:
    """Run ``python -m module --worker ...`` in a fresh process; its last stdout line is a JSON result."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         env=os.environ.copy())
    if out.returncode != 0:
        raise SystemExit(f"{module} worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_line() -> str:
    a = os.getloadavg()
    return f"{a[0]:.2f} {a[1]:.2f} {a[2]:.2f} on {os.cpu_count()} cores"


def tuned(target, delta, task, grid: list[float], device: str = "cpu") -> tuple[float, float]:
    """Test accuracy of theta_B + alpha * delta with alpha chosen on the validation split: (accuracy, alpha)."""
    from transport.core.evaluate import accuracy, sweep_alpha

    sw = sweep_alpha(target, delta, task, grid, device)
    return accuracy(target, task, "test", delta.apply_to(target.params, sw.best_alpha), device=device), sw.best_alpha


def spread_cell(vals: list) -> str:
    """A percentage cell: the value, or mean (min..max) over seeds; '-' when nothing was measured."""
    import statistics

    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    return f"{100 * m:.1f}" if len(vals) == 1 else f"{100 * m:.1f} ({100 * min(vals):.1f}..{100 * max(vals):.1f})"


def require_zoo(root):
    """Exit with a one-line message unless the demo zoo is built at ``root`` (None: the default place)."""
    from transport import zoo

    if not zoo.is_built(root):
        raise SystemExit(f"the demo zoo is not built at {root or zoo.zoo_root()}; run `python -m transport zoo build` first")
