"""Command line: ``python -m transport run|zoo|methods`` (a stable contract: tests and users rely on it).

``run`` transports tau = source_ft - source_pre onto the target with a method and writes ``DIR/task_vector.safetensors``
(the transported tau at alpha = 1 in the TARGET's own parameter names and shapes, loadable with plain safetensors)
and ``DIR/report.json``. Every bad input exits with code 2 and one line ``error: ...`` on stderr; anything
unexpected (a bug) exits with code 1 and one line ``error: unexpected TYPE: MESSAGE (traceback saved to
FILE)``. Warnings are one line each, ``warning: ...``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from transport import __version__
from transport.errors import NotImplementedYet, TransportError, warn
from transport.textfile import is_text_data
from transport.outdir import RUN_FORMAT, check_out_dir, check_writable, write_atomically

EXIT_OK, EXIT_UNEXPECTED, EXIT_ERROR = 0, 1, 2



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
            kwargs["type"] = lambda t, n=name: _parse_value(n, t, False)
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
    ft.add_argument("--source-ft", metavar="REF", help="source fine-tuned model (tau = source_ft - source_pre) or a "
                    "PEFT LoRA adapter directory of --source-pre (--out then holds the target's adapter)")
    ft.add_argument("--task-vector", metavar="FILE", help="a saved task vector (or LoRA adapter) instead of --source-ft")
    r.add_argument("--adapter-rank", metavar="R", help="LoRA input: rank of updates a method made dense (gradfix), "
                   "re-factorised by truncated SVD: same (the source's; default), full (exact) or N")
    r.add_argument("--dense-task-vector", action="store_true", help="LoRA input: also write task_vector.safetensors")
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
    data.add_argument("--data", metavar="DIR|FILE", help="an ImageFolder (one sub-folder per class), a folder of "
                      "images without classes (naive, transfusion, theseus), or for a language model texts: "
                      "FILE.jsonl / FILE.csv, a 'text' and an optional 'label' column (see the README)")
    r.add_argument("--template", metavar="TEXT", help="prompt of a labelled text file, ending where the label word "
                   "is scored (default: '{text}\\nLabel: {label}')")
    r.add_argument("--shots", type=int, default=2, metavar="K", help="labelled samples per class (gradfix)")
    alpha = r.add_mutually_exclusive_group()
    alpha.add_argument("--alpha", type=float, metavar="A", help="fixed scaling (default: chosen on validation)")
    alpha.add_argument("--alpha-grid", metavar="LO:HI:N", help="grid for choosing alpha on the validation split")
    r.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    r.add_argument("--seed", type=int, default=0, metavar="S", help="seed for shots, random inits and methods")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty)")
    r.add_argument("--force", action="store_true", help="replace an output directory an earlier run wrote")
    r.add_argument("--trust-pickle", action="store_true", help="allow loading pickled whole modules (runs code)")
    r.add_argument("--full-model-names", action="store_true",
                   help="open_clip targets: write task_vector.safetensors under the whole CLIP model's names "
                        "(visual.*, for model.load_state_dict) instead of the image tower's (model.visual)")
    r.add_argument("--tower-only", action="store_true",
                   help="towers that differ only in their output projection: move the tower alone (the projection's "
                        "update is left at zero, or dropped when the target has none; the report names what)")
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
def _check_run_args(args: argparse.Namespace) -> Optional[list[float]]:
    """Checks that need nothing loaded; returns the alpha grid."""
    from transport.data import MAX_SEED
    from transport.lora_run import cli_check
    from transport.core.evaluate import FLOAT32_MAX, parse_alpha_grid

    if args.shots < 1:
        raise TransportError(f"--shots must be >= 1, got {args.shots}")
    if not 0 <= args.seed <= MAX_SEED:
        raise TransportError(f"--seed must be in 0..{MAX_SEED} (2**63 - 1), got {args.seed}")
    grid = parse_alpha_grid(args.alpha_grid) if args.alpha_grid else None
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise TransportError(f"--alpha must be a finite number, got {args.alpha}")
    for flag, values in (("--alpha", [args.alpha] if args.alpha is not None else []), ("--alpha-grid", grid or [])):
        big = [a for a in values if abs(a) > FLOAT32_MAX]
        if big:
            raise TransportError(f"{flag}: {big[0]:g} is outside float32's range (largest {FLOAT32_MAX:.4g})")
    if grid is not None and not args.task and not args.data:
        raise TransportError("--alpha-grid chooses alpha on a validation split: give --task or --data with classes")
    if args.template is not None and not (args.data and is_text_data(args.data)):
        raise TransportError("--template is the prompt of a labelled text file: give --data FILE.jsonl or FILE.csv")
    cli_check(args)  # the LoRA adapter flags (transport.lora_run)
    return grid


def _input_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Every file or folder the run reads (and the cache it writes), by the flag that names it."""
    from transport.cache import cache_root

    out: dict[str, Path] = {}
    for flag in ("source_pre", "source_ft", "task_vector", "target", "oracle", "arch", "target_arch", "data"):
        ref = getattr(args, flag, None)
        if not ref:
            continue
        if ref.startswith("zoo:"):
            from transport.zoo import zoo_root

            out["the demo zoo"] = zoo_root()
        elif not ref.startswith(("open_clip:", "hf:")) and Path(ref).exists():
            out["--" + flag.replace("_", "-")] = Path(ref)
    out["the cache directory"] = cache_root()
    return out


def _load_target_side(ref: str, arch, args: argparse.Namespace):
    """The target (or oracle): a file without a recorded architecture is told the flag that applies to it."""
    from transport.sources import load_model

    try:
        return load_model(ref, arch, args.trust_pickle, args.seed)
    except TransportError as e:
        if "pass --arch" not in str(e):
            raise
        raise TransportError(str(e).replace("pass --arch", "pass --target-arch (or --arch, which sets the source's "
                                            "and the target's)", 1)) from None


def _load_models(args: argparse.Namespace):
    """source_pre, source_ft, target, oracle (checked against each other)."""
    from transport.core.layout import same_shapes
    from transport.core.task_vector import TaskVector
    from transport.lora_run import cli_source
    from transport.sources import family_shapes, load_model, load_task_vector, parse_arch

    src_arch = parse_arch(args.arch) if args.arch else None
    tgt_arch = parse_arch(args.target_arch) if args.target_arch else src_arch
    source_pre = load_model(args.source_pre, src_arch, args.trust_pickle, args.seed)
    source_ft = cli_source(args, source_pre)  # a LoRA adapter directory, else None
    if source_ft is None and args.task_vector:
        tau = load_task_vector(args.task_vector, src_arch or source_pre.arch, args.trust_pickle)
        if not same_shapes(tau.arch, source_pre.arch):
            raise TransportError(f"{args.task_vector}: the task vector is for {tau.arch.name}, "
                                 f"{args.source_pre} is {source_pre.arch.name} (shapes differ)")
        if tau.absent:
            print(f"note: {args.task_vector}: {len(tau.absent)} of the {len(family_shapes(tau.arch))} tensors of "
                  f"{tau.arch.name} are absent from the task vector and read as zero (e.g. {tau.absent[0]})",
                  file=sys.stderr)
        tau = TaskVector(source_pre.arch, tau.tensors, tau.meta)
        source_ft = source_pre.with_params(tau.apply_to(source_pre.params, 1.0), ref=args.task_vector)
    elif source_ft is None:
        source_ft = load_model(args.source_ft, src_arch, args.trust_pickle, args.seed)
    target = _load_target_side(args.target, tgt_arch, args)
    oracle = _load_target_side(args.oracle, tgt_arch, args) if args.oracle else None
    if not same_shapes(source_pre.arch, source_ft.arch):
        raise TransportError(f"{source_ft.ref} does not have the architecture of {source_pre.ref} "
                             f"({source_ft.arch.name} vs {source_pre.arch.name})")
    if oracle is not None and not same_shapes(oracle.arch, target.arch):
        raise TransportError(f"{oracle.ref} does not have the architecture of the target {target.ref}")
    for a, b in ((source_pre, source_ft), (target, oracle)):
        if b is not None and (a.arch.act, a.arch.mean, a.arch.std) != (b.arch.act, b.arch.mean, b.arch.std):
            # same shapes but another activation or normalisation: usually a wrong --arch (e.g. a QuickGELU tag)
            warn(f"{b.ref} runs as {b.arch.name} (act {b.arch.act}) but {a.ref} as {a.arch.name} "
                 f"(act {a.arch.act}); pass the matching --arch if they are the same model")
    from transport.core.vocab import describe, to_target_vocabulary

    source_pre, source_ft, vocabulary = to_target_vocabulary(source_pre, source_ft, target)  # a new release's tokens
    if vocabulary is not None:
        print(f"note: {describe(vocabulary)}", file=sys.stderr)
    return source_pre, source_ft, target, oracle


def _load_task(args: argparse.Namespace, target, models: list, infos: list, grid: Optional[list[float]]):
    """The task (labelled or not) with every head the evaluation needs checked now."""
    from transport.data import load_image_folder, load_task

    task = None
    text = bool(args.data) and is_text_data(args.data)
    if (args.task or args.data) and not text and target.arch.stem == "tokens":
        raise TransportError(f"{target.ref} reads token ids: give texts (--data FILE.jsonl or FILE.csv), not images")
    if args.task:
        task = load_task(args.task, image_size=target.arch.image_size, seed=args.seed)
    elif text:
        from transport.pipeline import load_text_task

        task = load_text_task(args.data, target, [m for m in models if m is not target], args.template, args.seed)
    elif args.data:
        task = load_image_folder(args.data, image_size=target.arch.image_size, seed=args.seed)
    if task is None:
        return None
    if not task.labelled:
        if grid is not None and not text:
            raise TransportError(f"--alpha-grid: {args.data} holds images without classes, so there is no "
                                 "validation accuracy to choose alpha on (give --alpha)")
        return task
    for model in models if not text else ():
        model.classifier(task.classnames)
    if any(m is not None and m.data == "labelled" for m in infos):
        counts = task.shot_counts(args.shots)
        short = {c: n for c, n in counts.items() if n < args.shots}
        if short:
            warn(f"--shots {args.shots}: the train split holds fewer {'texts' if text else 'images'} for "
                 f"{len(short)} of {len(counts)} classes; using {min(counts.values())}..{max(counts.values())} per "
                 "class (report.json: shots_per_class)")
    return task


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from transport import cache
    from transport.methods import TransportInputs, check_compatible, get_method, resolve_device
    from transport.core.task_vector import TaskVector
    from transport.lora_run import cli_transfer
    from transport.pipeline import transfer

    import torch

    out = Path(args.out)
    inputs = _input_paths(args)
    check_out_dir(out, args.force, inputs)
    check_writable(out)
    info = get_method(args.method)
    base_info = get_method(args.on) if args.on else None
    options = collect_options(args, info.options, info.name)
    grid = _check_run_args(args)
    device = resolve_device(args.device)
    use_cache = not args.no_cache
    if use_cache:
        problem = cache.writable()
        if problem is not None:
            warn(f"cache directory {cache.cache_root()} is not writable ({problem}); running without the cache")
            use_cache = False
    torch.manual_seed(args.seed)

    source_pre, source_ft, target, oracle = _load_models(args)
    from transport.sources import checkpoint_naming

    checkpoint_naming(target.arch, target.meta, args.full_model_names)  # a naming it cannot honour: before the work
    if options.get("variant") == "oracle":
        if oracle is None:
            raise TransportError("--variant oracle needs --oracle REF (the target fine-tuned on the task)")
        if "oracle_tau" not in info.options:
            raise TransportError(f"--variant oracle: {info.name} takes no oracle task vector (no 'oracle_tau' option)")
        options["oracle_tau"] = TaskVector.from_models(target.params, oracle.params, target.arch)
    models = [m for m in (target, source_pre, source_ft, oracle) if m is not None]
    task = _load_task(args, target, models, [info, base_info], grid)
    # Fail before any long computation: architecture, data needs, heads to evaluate with.
    moved = source_pre
    if args.tower_only:
        from transport.tower_only import tower_view
        moved = tower_view(source_pre, source_ft, target).source_pre
    for m in (info, base_info):
        if m is not None:
            check_compatible(m, TransportInputs(moved, target, task, args.shots, args.seed, device))
    if task is not None and not task.labelled and getattr(task, "kind", "image") == "text":
        print(f"note: {args.data} holds texts without labels: perplexity only"
              + ("" if args.alpha is not None else " (alpha chosen on the validation loss)"), file=sys.stderr)
    elif task is not None and not task.labelled:
        print(f"note: {args.data} holds images without classes: no accuracy table "
              f"(alpha = {args.alpha if args.alpha is not None else 1:g})", file=sys.stderr)

    bar = _Bar(enabled=not args.no_progress)
    try:
        result = cli_transfer(args, transfer)(source_pre, source_ft, target, info.name, task=task, options=options, alpha=args.alpha,
                          alpha_grid=grid, shots=args.shots, seed=args.seed, device=device, oracle=oracle,
                          progress=bar, use_cache=use_cache, evaluate=task is not None,
                          on=base_info.name if base_info else None, tower_only=args.tower_only)
    finally:
        bar.close()
    _write_run(args, argv, out, inputs, result, source_pre, target, info, base_info, task, device)
    return EXIT_OK


def _write_run(args, argv, out: Path, inputs: dict[str, Path], result, source_pre, target, info, base_info,
               task, device: str) -> None:
    from transport.core.layout import same_shapes
    from transport.core.task_vector import TaskVector
    from transport.lora_run import cli_outputs, summary_lines
    from transport.sources import checkpoint_naming, save_task_vector, scaling_metadata

    transported = result.transported
    if not same_shapes(transported.arch, target.arch):
        raise TransportError(f"{info.name} returned a task vector for {transported.arch.name}, "
                             f"not for the target {target.arch.name}")
    # Canonical tensors are family-free: save them under the names the TARGET checkpoint's own class loads.
    transported = TaskVector(target.arch, transported.tensors, transported.meta)
    full_model = args.full_model_names
    naming = checkpoint_naming(target.arch, target.meta, full_model)
    report = {"format": RUN_FORMAT, **result.report()}
    report["options"] = {k: v for k, v in report["options"].items() if k != "oracle_tau"}
    report["inputs"].update({"source_pre_arch": source_pre.arch.name, "target_arch": target.arch.name,
                             "oracle": args.oracle or "", "data": args.data or "", "device": device})
    scored = task is not None and (task.labelled or getattr(task, "kind", "image") == "text")
    report["task_vector_names"] = naming
    report["alpha_source"] = "fixed" if args.alpha is not None else ("validation" if scored else "default")
    report["command"] = ["python", "-m", "transport", *argv]
    meta = {"format": "transport.task_vector", "source_pre": args.source_pre,
            "source_ft": args.source_ft or f"task_vector:{args.task_vector}", "target": args.target,
            "method": info.name + (f" on {base_info.name}" if base_info else ""),
            "options": json.dumps(_json_safe(report["options"]), sort_keys=True),
            **scaling_metadata(result.alpha), "task": (args.task or args.data or ""),
            "source_arch": source_pre.arch.to_json()}

    files, dense = cli_outputs(args, target, result.alpha, report, meta)  # a LoRA adapter for the target

    def writer(tmp: Path) -> None:
        if dense:
            save_task_vector(transported, tmp / "task_vector.safetensors", target.meta, full_model, **meta)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.json").write_text(json.dumps(_json_safe(report), indent=2, sort_keys=True) + "\n")

    write_atomically(out, args.force, writer, inputs)
    _print_summary(result, out, [*files, *(["task_vector.safetensors"] * dense)])
    print("\n".join([f"  tensor names: {naming}"] * dense + summary_lines(report.get("lora"), result.alpha)))


def _print_summary(result: Any, out: Path, written: Sequence[str] = ("task_vector.safetensors",)) -> None:
    print(f"method {result.method}: alpha = {result.alpha:g}"
          + (" (chosen on validation)" if result.sweep is not None else ""))
    if result.sweep is not None and len(result.sweep.tied) > 1:
        print(f"  alpha candidates tied on validation: {', '.join(f'{a:g}' for a in result.sweep.tied)}")
    if result.shots_per_class:
        counts = sorted(set(result.shots_per_class.values()))
        print(f"  labelled shots per class: {counts[0]}" + (f"..{counts[-1]}" if len(counts) > 1 else "")
              + f" (asked for {result.inputs.get('shots')})")
    for name, acc in result.accuracies.items():
        print(f"  {name:<20} {100 * acc:6.2f}%" if isinstance(acc, float) and math.isfinite(acc) else f"  {name:<20} n/a")
    for name, ppl in (result.perplexities or {}).items():
        print(f"  {name:<20} perplexity {ppl:.4g}" if math.isfinite(ppl) else f"  {name:<20} perplexity n/a")
    print(f"wrote {', '.join(str(out / n) for n in written)} and {out / 'report.json'}")
    if "task_vector.safetensors" in written:
        print(f"  the file holds the transported tau at alpha = 1: add {result.alpha:g} x this file to the target "
              f"(theta = theta_target + {result.alpha:g} * tau)")


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
    """Run the CLI; returns the exit code: 0 ok, 2 bad input or unavailable method (one line on stderr),
    1 an unexpected failure (one line naming the saved traceback), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
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
        except Exception as e:  # noqa: BLE001 - the one place a bug becomes a line a user can report
            saved = save_traceback(e, argv)
            text = " ".join(str(e).split())[:300]
            print(f"error: unexpected {type(e).__name__}: {text} (traceback saved to {saved})", file=sys.stderr)
            return EXIT_UNEXPECTED


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def save_traceback(e: BaseException, argv: Sequence[str]) -> str:
    """Write the traceback of ``e`` under the cache root's ``crashes/`` (else the temp dir); its path."""
    from transport.cache import cache_root

    text = (f"transport {__version__}\ncommand: python -m transport {' '.join(argv)}\n\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    name = f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for d in (cache_root() / "crashes", Path(tempfile.gettempdir()) / "task-transport-crashes"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
            return str(d / name)
        except OSError:
            continue
    return "nowhere: no writable directory"


__all__ = ["main", "build_parser", "collect_options", "check_out_dir", "check_writable", "write_atomically",
           "save_traceback", "method_flags", "RUN_FORMAT"]
