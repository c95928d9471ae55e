"""Command line: ``python -m transport run|zoo|methods`` (a stable contract: tests and users rely on it).

``run`` transports tau = source_ft - source_pre onto the target with a method and writes ``DIR/task_vector.safetensors``
(the transported tau at alpha = 1 in the TARGET's own parameter names and shapes, loadable with plain safetensors)
and ``DIR/report.json``. Every bad input exits with code 2 and one line ``error: ...`` on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from transport import __version__
from transport.errors import NotImplementedYet, TransportError

EXIT_OK, EXIT_ERROR = 0, 2



def method_flags() -> dict[str, list]:
    """Option name -> [(method, Option)] for every option a registered method gives its own flag."""
    from transport.methods import available_methods, get_method

    out: dict[str, list] = {}
    for name in available_methods():
        for o in get_method(name).spec:
            if o.flag:
                out.setdefault(o.name, []).append((name, o))
    return out


def _add_method_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per flagged option, typed and constrained by its declaration (shared across methods)."""
    for name, decl in method_flags().items():
        o = decl[0][1]
        kwargs: dict[str, Any] = {"help": "; ".join(f"{m}: {d.help}" for m, d in decl)}
        if o.choices is not None:
            kwargs["choices"] = list(o.choices)
        elif isinstance(o.default, bool):
            kwargs["type"] = lambda t: _parse_value(name, t, False)
        elif isinstance(o.default, (int, float)):
            kwargs.update(type=type(o.default), metavar="N")
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one TransportError line instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TransportError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m transport", description="Move task vectors between pretrained vision transformers.")
    p.add_argument("--version", action="version", version=f"transport {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="{run,zoo,methods}")

    r = sub.add_parser("run", help="transport a task vector onto a target model and write it with a report",
                       description="Transport tau = source_ft - source_pre onto --target. REF is a checkpoint file, "
                                   "a Hugging Face directory, open_clip:ARCH:TAG, hf:ORG/NAME or zoo:NAME.")
    r.add_argument("--source-pre", required=True, metavar="REF", help="source pretrained model (theta_A)")
    ft = r.add_mutually_exclusive_group(required=True)
    ft.add_argument("--source-ft", metavar="REF", help="source fine-tuned model (tau = source_ft - source_pre)")
    ft.add_argument("--task-vector", metavar="FILE", help="a saved task vector instead of --source-ft")
    r.add_argument("--target", required=True, metavar="REF", help="target pretrained model (theta_B)")
    r.add_argument("--arch", metavar="ARCH", help="architecture of references that do not say it "
                   "(open_clip:ViT-B-16, hf:ORG/NAME, zoo:NAME, or a model file that records it); "
                   "also the target's unless --target-arch")
    r.add_argument("--target-arch", metavar="ARCH", help="the target's architecture when it differs (cross-width)")
    r.add_argument("--oracle", metavar="REF", help="the target fine-tuned on the task (reported as the upper bound)")
    r.add_argument("--method", required=True, help="naive | transfusion | gradfix | theseus")
    r.add_argument("--on", metavar="METHOD", help="compose: apply --method to the task vector METHOD transported "
                   "(e.g. --method gradfix --on transfusion)")
    data = r.add_mutually_exclusive_group()
    data.add_argument("--task", metavar="NAME", help="a built-in task (digits, rot90, invert, hflip, ...)")
    data.add_argument("--data", metavar="DIR", help="an ImageFolder (one sub-folder per class)")
    r.add_argument("--shots", type=int, default=2, metavar="K", help="labelled samples per class (gradfix)")
    alpha = r.add_mutually_exclusive_group()
    alpha.add_argument("--alpha", type=float, metavar="A", help="fixed scaling (default: chosen on validation)")
    alpha.add_argument("--alpha-grid", metavar="LO:HI:N", help="grid for choosing alpha on the validation split")
    r.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    r.add_argument("--seed", type=int, default=0, metavar="S", help="seed for shots, random inits and methods")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty)")
    r.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    r.add_argument("--trust-pickle", action="store_true", help="allow loading pickled whole modules (runs code)")
    r.add_argument("--no-cache", action="store_true", help="recompute the alignment even if it is cached")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any option the method declares")
    _add_method_flags(r.add_argument_group("method options (passed only to methods that declare them)"))

    z = sub.add_parser("zoo", help="build or list the built-in demo zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser, metavar="{build,list}")
    zb = zsub.add_parser("build", help="train the demo zoo (deterministic, cached outside the repository)")
    zb.add_argument("--variant", choices=["full", "test"], default="full")
    zb.add_argument("--seeds", type=int, nargs="+", metavar="S", help="seeds to build (default: the variant's)")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    zb.add_argument("--root", metavar="DIR", help="zoo directory (default: the data dir or $TRANSPORT_ZOO_DIR)")
    zl = zsub.add_parser("list", help="list the zoo's models")
    zl.add_argument("--root", metavar="DIR", help="zoo directory")

    sub.add_parser("methods", help="list transport methods, their data needs and options")
    return p


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _parse_value(key: str, text: str, default: Any) -> Any:
    """``--option KEY=VALUE``: VALUE parsed as the type of the method's default for KEY."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return json.loads(text)
    except ValueError:
        if default is None or isinstance(default, (list, dict)):
            return text
        raise TransportError(f"--option {key}={text}: expected a {type(default).__name__}") from None


def collect_options(args: argparse.Namespace, declared: dict[str, Any], method: str) -> dict[str, Any]:
    """Options for ``method`` from its dedicated flags and ``--option``; undeclared ones are an error."""
    out: dict[str, Any] = {}
    known = ", ".join(declared) or "none"
    for name in method_flags():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in declared:
            raise TransportError(f"--{name.replace('_', '-')} is not an option of method {method} (its options: {known})")
        out[name] = value
    for item in args.option or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TransportError(f"--option expects KEY=VALUE, got '{item}'")
        if key not in declared:
            raise TransportError(f"--option {key}: not an option of method {method} (its options: {known})")
        out[key] = _parse_value(key, text, declared[key])
    return out


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TransportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TransportError(f"{out}: output directory exists and is not empty (use --force to replace it)")


def write_atomically(out: Path, force: bool, writer: Callable[[Path], None]) -> None:
    """Fill a temp dir next to ``out`` with ``writer``, then rename it into place (no partial ``out`` ever)."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Optional[Path] = None
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the directory private; results are ordinary files
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        check_out_dir(out, force)  # it may have appeared while we were computing
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the previous results back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


class _Bar:
    """tqdm bar driven by the pipeline's progress callback (fraction in [0, 1], phase message)."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is None:
            return
        n = int(round(1000 * min(max(float(fraction), 0.0), 1.0)))
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        self.bar.set_description_str(message[:60], refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _json_safe(obj: Any) -> Any:
    """NaN/Inf -> None so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from transport.core.evaluate import parse_alpha_grid
    from transport.core.layout import same_shapes
    from transport.core.task_vector import TaskVector
    from transport.data import load_image_folder, load_task
    from transport.methods import TransportInputs, check_compatible, get_method, resolve_device
    from transport.pipeline import transfer
    from transport.sources import load_model, load_task_vector, parse_arch, save_task_vector

    out = Path(args.out)
    check_out_dir(out, args.force)
    info = get_method(args.method)
    base_info = get_method(args.on) if args.on else None
    options = collect_options(args, info.options, info.name)
    if args.shots < 1:
        raise TransportError(f"--shots must be >= 1, got {args.shots}")
    grid = parse_alpha_grid(args.alpha_grid) if args.alpha_grid else None
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise TransportError(f"--alpha must be a finite number, got {args.alpha}")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    src_arch = parse_arch(args.arch) if args.arch else None
    tgt_arch = parse_arch(args.target_arch) if args.target_arch else src_arch
    source_pre = load_model(args.source_pre, src_arch, args.trust_pickle, args.seed)
    if args.task_vector:
        tau = load_task_vector(args.task_vector, src_arch)
        if not same_shapes(tau.arch, source_pre.arch):
            raise TransportError(f"{args.task_vector}: the task vector is for {tau.arch.name}, "
                                 f"{args.source_pre} is {source_pre.arch.name} (shapes differ)")
        tau = TaskVector(source_pre.arch, tau.tensors, tau.meta)
        source_ft = source_pre.with_params(tau.apply_to(source_pre.params, 1.0), ref=args.task_vector)
    else:
        source_ft = load_model(args.source_ft, src_arch, args.trust_pickle, args.seed)
    target = load_model(args.target, tgt_arch, args.trust_pickle, args.seed)
    oracle = load_model(args.oracle, tgt_arch, args.trust_pickle, args.seed) if args.oracle else None
    if not same_shapes(source_pre.arch, source_ft.arch):
        raise TransportError(f"{source_ft.ref} does not have the architecture of {source_pre.ref} "
                             f"({source_ft.arch.name} vs {source_pre.arch.name})")
    if oracle is not None and not same_shapes(oracle.arch, target.arch):
        raise TransportError(f"{oracle.ref} does not have the architecture of the target {target.ref}")
    for a, b in ((source_pre, source_ft), (target, oracle)):
        if b is not None and (a.arch.act, a.arch.mean, a.arch.std) != (b.arch.act, b.arch.mean, b.arch.std):
            # same shapes but another activation or normalisation: usually a wrong --arch (e.g. a QuickGELU tag)
            print(f"warning: {b.ref} runs as {b.arch.name} (act {b.arch.act}) but {a.ref} as {a.arch.name} "
                  f"(act {a.arch.act}); pass the matching --arch if they are the same model", file=sys.stderr)
    if options.get("variant") == "oracle":
        if oracle is None:
            raise TransportError("--variant oracle needs --oracle REF (the target fine-tuned on the task)")
        if "oracle_tau" not in info.options:
            raise TransportError(f"--variant oracle: {info.name} takes no oracle task vector (no 'oracle_tau' option)")
        options["oracle_tau"] = TaskVector.from_models(target.params, oracle.params, target.arch)

    task = None
    if args.task:
        task = load_task(args.task, image_size=target.arch.image_size, seed=args.seed)
    elif args.data:
        task = load_image_folder(args.data, image_size=target.arch.image_size, seed=args.seed)
    # Fail before any long computation: architecture, data needs, heads to evaluate with.
    for m in (info, base_info):
        if m is not None:
            check_compatible(m, TransportInputs(source_pre, target, task, args.shots, args.seed, device))
    if task is not None:
        for model in (target, source_pre, source_ft) + ((oracle,) if oracle is not None else ()):
            model.classifier(task.classnames)

    bar = _Bar(enabled=not args.no_progress)
    try:
        result = transfer(source_pre, source_ft, target, info.name, task=task, options=options, alpha=args.alpha,
                          alpha_grid=grid, shots=args.shots, seed=args.seed, device=device, oracle=oracle,
                          progress=bar, use_cache=not args.no_cache, evaluate=task is not None,
                          on=base_info.name if base_info else None)
    finally:
        bar.close()

    transported = result.transported
    if not same_shapes(transported.arch, target.arch):
        raise TransportError(f"{info.name} returned a task vector for {transported.arch.name}, "
                             f"not for the target {target.arch.name}")
    # Canonical tensors are family-free: save them under the TARGET's own names and shapes.
    transported = TaskVector(target.arch, transported.tensors, transported.meta)
    report = result.report()
    report["options"] = {k: v for k, v in report["options"].items() if k != "oracle_tau"}
    report["inputs"].update({"source_pre_arch": source_pre.arch.name, "target_arch": target.arch.name,
                             "oracle": args.oracle or "", "data": args.data or "", "device": device})
    report["alpha_source"] = "fixed" if args.alpha is not None else ("validation" if task is not None else "default")
    report["command"] = ["python", "-m", "transport", *argv]
    meta = {"format": "transport.task_vector", "source_pre": args.source_pre,
            "source_ft": args.source_ft or f"task_vector:{args.task_vector}", "target": args.target,
            "method": info.name + (f" on {base_info.name}" if base_info else ""),
            "options": json.dumps(_json_safe(report["options"]), sort_keys=True),
            "alpha": repr(float(result.alpha)), "task": (args.task or args.data or ""),
            "source_arch": source_pre.arch.to_json()}

    def writer(tmp: Path) -> None:
        save_task_vector(transported, tmp / "task_vector.safetensors", **meta)
        (tmp / "report.json").write_text(json.dumps(_json_safe(report), indent=2, sort_keys=True) + "\n")

    write_atomically(out, args.force, writer)
    _print_summary(result, out)
    return EXIT_OK


def _print_summary(result: Any, out: Path) -> None:
    print(f"method {result.method}: alpha = {result.alpha:g}"
          + (" (chosen on validation)" if result.sweep is not None else ""))
    for name, acc in result.accuracies.items():
        print(f"  {name:<20} {100 * acc:6.2f}%" if isinstance(acc, float) and math.isfinite(acc) else f"  {name:<20} n/a")
    print(f"wrote {out / 'task_vector.safetensors'} and {out / 'report.json'}")


def cmd_zoo(args: argparse.Namespace) -> int:
    from transport import zoo

    if args.zoo_command == "build":
        from transport.zoo.builder import build, format_table

        info = build(root=args.root, variant=args.variant, seeds=args.seeds, force=args.force, progress=True)
        if info.get("skipped"):  # a fresh build prints its own summary and table
            print(f"zoo already built ({info.get('build_seconds', '?')} s to build); --force rebuilds")
            if info.get("table"):
                print(format_table(info["table"]))
        return EXIT_OK
    entries = zoo.list_models(root=args.root)
    rows = [("reference", "kind", "task", "arch", "description")]
    rows += [(f"zoo:{getattr(e, 'ref', e.name)}", str(e.kind), str(e.task or "-"), str(e.arch), str(e.description))
             for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    from transport.methods import METHOD_NAMES, get_method

    for name in METHOD_NAMES:
        try:
            info = get_method(name)
        except NotImplementedYet:
            print(f"{name:<12} not implemented yet")
            continue
        opts = ", ".join(f"{o.name}={o.default!r}" + (" (apply)" if o.apply_only else "")
                         for o in info.spec if not o.hidden) or "none"
        arch = "same architecture" if info.same_arch else "any widths"
        print(f"{name:<12} {info.summary}\n{'':<12} needs: {info.data} data, {arch}; options: {opts}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or unavailable method, one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args, argv)
        if args.command == "zoo":
            return cmd_zoo(args)
        return cmd_methods(args)
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "collect_options", "write_atomically", "method_flags"]
