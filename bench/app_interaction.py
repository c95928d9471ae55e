"""Server time of the explorer's slider interactions once a transfer is prepared (target: < 300 ms each).

Each row is what one widget change costs the server after the first run: the cached re-apply (the
method's ``apply``, never its ``prepare``), any accuracy it shows, the figure build and the figure's
JSON serialisation (what Streamlit sends to the browser). The first run itself is timed too, cold
(empty caches) and warm (alignment from the on-disk cache).

    python -m bench.app_interaction [--pair next] [--task rot90] [--repeat 7] [--threads 2]

Uses the demo zoo in ``$TRANSPORT_ZOO_DIR`` (default location) and builds the small test zoo into a
temporary directory when none is built.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import plotly.io as pio
import torch
from transport.zoo.builder import build as build_zoo
from transport.core.layout import same_shapes


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) wall time in ms over ``repeat`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts), max(ts)


def _ship(fig) -> int:
    """Serialise a figure the way Streamlit does before sending it; returns the payload size."""
    return len(pio.to_json(fig, validate=False))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default=None, help="zoo pair key (default: the first same-width and cross-width ones)")
    ap.add_argument("--task", default=None, help="zoo task (default: the zoo's first)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the zoo's models are tiny)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transport import zoo

    # the user's zoo, found before the alignment cache moves to a temp dir (the zoo lives under the cache root)
    os.environ.setdefault("TRANSPORT_ZOO_DIR", str(zoo.zoo_root()))
    os.environ.setdefault("TRANSPORT_CACHE_DIR", tempfile.mkdtemp(prefix="bench-app-cache-"))
    if not zoo.is_built():
        os.environ["TRANSPORT_ZOO_DIR"] = tempfile.mkdtemp(prefix="bench-app-zoo-")
        print(f"building the test zoo into {os.environ['TRANSPORT_ZOO_DIR']} ...", flush=True)
        build_zoo(variant="test")

    from app import logic
    from transport.core.layout import param_axes
    from viz import gradfix as vg
    from viz import results
    from viz import theseus as vth
    from viz import transfusion as vt

    pairs = zoo.pairs()
    task = args.task or zoo.tasks()[0]
    seed = zoo.seeds()[0]
    rows: list[tuple[str, str, float, float, str]] = []

    def setup_of(pair) -> logic.Setup:
        s = f"@{seed}"
        return logic.Setup(logic.ModelRef(f"zoo:{pair.source}{s}"), logic.ModelRef(f"zoo:{pair.source}+{task}{s}"),
                           logic.ModelRef(f"zoo:{pair.target}{s}"), task,
                           logic.ModelRef(f"zoo:{pair.target}+{task}{s}"), seed=seed)

    def pick(pred) -> object:
        if args.pair:
            return next(p for p in pairs if p.key == args.pair)
        return next(p for p in pairs if pred(p))

    cache = logic.MemoryCache()
    same = pick(lambda p: p.key == "next")
    cross = next((p for p in pairs if p.key == "wide_grown"), None)
    methods = logic.built_methods()
    runs = {}
    for m in methods:
        pair = cross if (m == "theseus" and cross is not None and not args.pair) else same
        setup = setup_of(pair)
        t0 = time.perf_counter()
        runs[m] = logic.run_transfer(setup, m, cache=cache)
        cold = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        logic.run_transfer(setup, m, cache=logic.MemoryCache())  # alignment from the on-disk cache
        warm = 1000 * (time.perf_counter() - t0)
        grid = len(runs[m].result.sweep.alphas) if runs[m].result.sweep else 0
        rows.append(("Run button", f"{m} on {pair.key}: first run (prepare + evaluation)", cold, float("nan"),
                     f"{grid}-point alpha sweep(s) included"))
        rows.append(("Run button", f"{m} on {pair.key}: again, alignment from disk cache", warm, float("nan"), ""))

    def add(page: str, what: str, fn: Callable[[], object], note: str = "") -> None:
        med, worst = _time(fn, args.repeat)
        rows.append((page, what, med, worst, note))

    for m, run in runs.items():
        alpha = run.result.alpha

        n_val = len(run.loaded.task.split("val")[1])
        n_test = len(run.loaded.task.split("test")[1])
        grid = run.result.sweep.alphas
        other = next(a for a in grid if a != run.result.alpha)

        def alpha_move(run=run, a=other) -> None:
            _, acc = logic.accuracy_at_alpha(run, a, "val")  # a grid point: read from the sweep
            _ship(results.alpha_curves(run.sweeps(), {run.method: a}, picked=run.result.alpha))

        add("Transport", f"alpha slider ({m}): apply + val accuracy + curve", alpha_move,
            "val accuracy read from the run's sweep")

        def alpha_peek(run=run, a=other) -> None:
            run.memo.clear()  # first visit of this alpha: evaluate
            logic.accuracy_at_alpha(run, a, "test")
            _ship(results.alpha_curves(run.sweeps(), {run.method: a}, picked=run.result.alpha))

        add("Transport", f"alpha slider + 'test accuracy' box ({m}), new alpha", alpha_peek,
            f"one evaluation, {n_test} test images")
        add("Transport", f"alpha slider + 'test accuracy' box ({m}), alpha seen before",
            lambda run=run, a=other: (logic.accuracy_at_alpha(run, a, "test"),
                                      _ship(results.alpha_curves(run.sweeps(), {run.method: a}))))

        def range_move(run=run, alpha=alpha) -> None:
            run.memo.clear()  # a range not seen before
            L = run.arch.layers
            logic.range_accuracy(run, 0, max(0, L // 2 - 1), alpha, True, "val")

        add("Debug", f"layer-range slider ({m}): new range", range_move, f"one evaluation, {n_val} val images")
        run.ablation.clear()
        t0 = time.perf_counter()
        abl = logic.layer_ablation(run, alpha, "val")
        rows.append(("Debug", f"ablation chart ({m}), first time", 1000 * (time.perf_counter() - t0),
                     float("nan"), f"{2 * len(abl['layers']) + 2} evaluations, then cached per run"))
        add("Debug", f"ablation chart ({m}), cached + figure",
            lambda run=run, alpha=alpha: _ship(results.layer_ablation_figure(
                **{k: v for k, v in logic.layer_ablation(run, alpha, "val").items()
                   if k in ("layers", "only", "without", "full", "zero_shot")})))

    if "transfusion" in runs:
        run = runs["transfusion"]
        diag = run.result.diagnostics
        L = len(diag["layers"])
        state = {"l": 0}

        def layer_move() -> None:
            state["l"] = (state["l"] + 1) % L
            lay = diag["layers"][state["l"]]
            _ship(vt.head_permutation(lay))
            _ship(vt.within_head_permutation(lay["within_head_perms"][0], 0, lay["head_perm"][0]))

        add("TransFusion", "layer slider: head + within-head figures", layer_move)
        add("TransFusion", "distance + objective figures",
            lambda: (_ship(vt.permutation_distance(diag)), _ship(vt.objective_per_sweep(diag))))

    if "gradfix" in runs:
        run = runs["gradfix"]
        variants = ["normal", "random"]
        st = {"i": 0}

        def variant_move() -> None:
            st["i"] += 1
            v = variants[st["i"] % 2]
            run.memo.clear()  # as on a first switch to this variant
            logic.accuracy_at_alpha(run, run.result.alpha, "test", variant=v)
            d = logic.diagnostics(run, variant=v)
            _ship(vg.agreement_heatmap(d))
            _ship(vg.keep_rate_per_layer(d))

        add("GradFix", "variant switch: apply + test accuracy + heatmap + keep-rate", variant_move,
            "first switch to a variant (one evaluation); later switches reuse it")
        names = [k for k, p in param_axes(run.arch).items() if p.block == "fc1" and not p.is_bias]
        add("GradFix", f"cell select: entry map + image ({names[0]})",
            lambda: _ship(vg.entry_map_image(run.prepared.alignment.entry_map(names[0], run.loaded.tau), names[0])))
        history = logic.RunHistory()
        for k in (run.shots, run.shots + 1):  # two K values visited once
            history.get_or_run(run.setup, "gradfix", run.options, k, cache=cache)
        add("GradFix", "K slider back to a K seen before (session's run history)",
            lambda: history.get_or_run(run.setup, "gradfix", run.options, run.shots, cache=cache))

    if "theseus" in runs:
        run = runs["theseus"]
        al = run.prepared.alignment
        spaces = list(getattr(al, "pca_sample", {}) or {})
        if spaces:
            st2 = {"i": 0}

            def space_move() -> None:
                st2["i"] = (st2["i"] + 1) % len(spaces)
                sp = spaces[st2["i"]]
                s = al.pca_sample[sp]
                _ship(vth.pca_figure(s["target"], s["source"], al.mapped_sample(sp), s["labels"], dims=2, space=sp))

            add("Theseus", "layer select: mapped sample + PCA figure (2-D)", space_move)

    if len(runs) > 1:
        taus = {m: r.result.transported for m, r in runs.items() if same_shapes(r.arch, runs[methods[0]].arch)}
        add("Compare", "cosine per layer + figure",
            lambda: _ship(results.layer_cosine_figure(results.layer_cosines(taus))))

    print(f"\ntorch threads: {args.threads}; repeat: {args.repeat}; zoo: {zoo.zoo_root()}; task: {task}\n")
    w = max(len(r[1]) for r in rows)
    print(f"{'page':<12} {'interaction':<{w}} {'median ms':>10} {'max ms':>8}  {'< 300 ms':>8}  note")
    for page, what, med, worst, note in rows:
        ok = "" if page == "Run button" or "first time" in what else ("yes" if med < 300 else "NO")
        mx = "" if worst != worst else f"{worst:.1f}"  # NaN: a single timing
        print(f"{page:<12} {what:<{w}} {med:>10.1f} {mx:>8}  {ok:>8}  {note}")


if __name__ == "__main__":
    main()
