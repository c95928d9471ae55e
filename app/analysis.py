"""What the pages say beyond a run's numbers, without Streamlit: checks before running, whether a gain is
more than noise, what to expect on a zoo pair, the recovered permutation against the hidden shuffle, and
every model's predictions on the test split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from app.logic import (ZERO_TAU, DEFAULT_CACHE, MemoryCache, Run, Setup, incompatibility, load_setup,
                       METHOD_NAMES)
from transport.core.layout import same_shapes

NO_GAIN = "no gain (within seed spread)"
NO_GAIN_SAMPLING = "no gain (within sampling noise)"
SHUFFLED = ("B_control", "B_next")  # zoo targets made by a known shuffle of a same-width model


# ----------------------------------------------------------------------------------------------
# before running
# ----------------------------------------------------------------------------------------------
@dataclass
class Preflight:
    """What can be said about a setup before anything runs: a zero tau, and per method whether it applies."""

    tau_zero: bool
    why_not: dict[str, str]  # method -> '' when it applies to this pair, else the one-line reason
    cross_width: bool  # shapes differ: naive addition is replaced by the zero-padded baseline

    def applies(self, method: str) -> bool:
        return not self.why_not.get(method, "")

    def blocker(self, method: str) -> str:
        """'' when ``method`` can run now, else why not (a zero tau first: no method can run then)."""
        return ZERO_TAU if self.tau_zero else self.why_not.get(method, "")


def preflight(setup: Setup, cache: MemoryCache = DEFAULT_CACHE) -> Preflight:
    """Load the setup (cached) and check every method against it, before the user presses Run."""
    loaded = load_setup(setup, cache)
    return Preflight(loaded.tau_is_zero, {m: incompatibility(m, loaded) for m in METHOD_NAMES},
                     not same_shapes(loaded.source_pre.arch, loaded.target.arch))


# ----------------------------------------------------------------------------------------------
# is a gain more than noise?
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseBand:
    """How large a change of test accuracy (fraction, not %) is still noise, and where that comes from."""

    width: float
    kind: str  # 'seed spread' | 'sampling noise'
    detail: str

    @property
    def no_gain(self) -> str:
        return NO_GAIN if self.kind == "seed spread" else NO_GAIN_SAMPLING


def seed_band(rows: list[dict], pair: str, task: str) -> Optional[NoiseBand]:
    """The zoo's seed spread for ``pair`` on ``task`` from its per-seed phenomenon rows.

    width = the larger of (a) how far apart the seeds put the target's zero-shot accuracy (max - min) and
    (b) the largest move of naive addition (tau is meaningless to the target; alpha is still picked on
    validation) away from zero-shot on one seed: what a transfer that carries nothing shows.
    None with fewer than two seeds.
    """
    mine = [r for r in rows if r.get("pair") == pair and r.get("task") == task]
    if len({r.get("seed") for r in mine}) < 2:  # one seed says nothing about the spread over seeds
        return None
    zs = [float(r["zero_shot_target"]) for r in mine]
    null = [abs(float(r["naive"]) - float(r["zero_shot_target"])) for r in mine if r.get("naive") is not None]
    spread = max(zs) - min(zs)
    width = max([spread] + null)
    parts = [f"{len(mine)} zoo seeds: target zero-shot {100 * min(zs):.1f}-{100 * max(zs):.1f} %"]
    if null:
        parts.append(f"naive addition moves it by up to {100 * max(null):.1f} pts")
    return NoiseBand(width, "seed spread", "; ".join(parts))


def sampling_band(correct_m, correct_z) -> NoiseBand:
    """Two standard errors of the paired difference of two accuracies on the same test images.

    correct_m / correct_z: per image 1 if the model was right (bool or 0/1 tensors of one length).
    """
    d = torch.as_tensor(correct_m).double() - torch.as_tensor(correct_z).double()
    n = len(d)
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return NoiseBand(2.0 * se, "sampling noise", f"2 standard errors of the paired difference on {n} test images")


def noise_band(run: Run, correct_m=None, correct_z=None) -> NoiseBand:
    """The zoo's seed spread (zoo pairs built with several seeds) and the test split's paired sampling noise
    (when the per-image outcomes are given), added in quadrature: two independent sources of noise on one
    change of accuracy. Labelled 'seed spread' whenever the zoo's seeds are part of it."""
    bands = []
    if run.setup.pair.startswith("text:"):  # a text zoo pair: its own table, the task named by its file
        from pathlib import Path

        from transport.zoo import text_store

        # naive addition carries real signal on texts (token rows are never shuffled), so only the seeds'
        # zero-shot spread is the null band here
        rows = [{**r, "naive": None} for r in text_store.phenomenon_table()]
        band = seed_band(rows, run.setup.pair[5:], Path(run.setup.task).stem)
        if band is not None:
            bands.append(band)
    elif run.setup.pair:
        z = _zoo()
        if z is not None:
            band = seed_band(z.phenomenon_table(), run.setup.pair, run.setup.task)
            if band is not None:
                bands.append(band)
    if correct_m is not None and correct_z is not None:
        bands.append(sampling_band(correct_m, correct_z))
    if not bands:
        return NoiseBand(0.0, "none", "no noise estimate for this measurement")
    if len(bands) == 1:
        return bands[0]
    width = math.sqrt(sum(b.width ** 2 for b in bands))
    detail = " and ".join(f"{b.kind} +-{100 * b.width:.1f} pts ({b.detail})" for b in bands)
    return NoiseBand(width, bands[0].kind, f"{detail}, added in quadrature")


def gain(delta: float, band: NoiseBand) -> tuple[str, str]:
    """(text, colour) of a metric delta: within the band -> the band's 'no gain' text in grey; with no noise
    estimate at all, the plain change in grey (never a green claim)."""
    if band.kind == "none":
        return f"{100 * delta:+.1f} pts", "off"
    if abs(delta) <= band.width:
        return band.no_gain, "off"
    return f"{100 * delta:+.1f} pts", "normal"


def correct_at(run: Run, alpha: float):
    """Per test image, whether theta_B + alpha * (transported tau) is right (cached on the run)."""
    from transport.core.evaluate import predictions

    key = ("correct", round(float(alpha), 9))
    if key not in run.memo:
        t, task = run.loaded.target, run.loaded.task
        pred = predictions(t, task, "test", run.apply(float(alpha)).apply_to(t.params, 1.0), device=run.setup.device)
        run.memo[key] = pred == task.split("test")[1]
    return run.memo[key]


def correct(run: Run, key: str):
    """Per test image, whether the accuracy row ``key`` of the run was right (None if not recorded)."""
    pred = run.result.test_predictions.get(key)
    return None if pred is None else pred == run.loaded.task.split("test")[1]


def expectation(setup: Optional[Setup]) -> str:
    """The one line a page opens with: what an honest outcome on this zoo pair looks like."""
    if setup is None:
        return ""
    if not setup.pair:
        return ("Custom models: no known outcome. Compare the method with the naive row and the target's "
                "zero-shot floor; a gain inside the sampling noise is no gain.")
    if setup.pair.startswith("text:"):  # a text zoo pair
        from transport.zoo import text_store

        found = next((p for p in text_store.pairs() if f"text:{p.key}" == setup.pair), None)
        return "" if found is None else f"What to expect on the text pair {found.key}: {found.expected}"
    z = _zoo()
    found = next((p for p in (z.pairs() if z else []) if p.key == setup.pair), None)
    return "" if found is None else f"What to expect on {found.key}: {found.expected}"


def _zoo():
    from transport import zoo

    return zoo


# ----------------------------------------------------------------------------------------------
# the recovered permutation against the hidden shuffle
# ----------------------------------------------------------------------------------------------
def hidden_shuffle_target(setup: Setup) -> str:
    """The zoo name (with seed) of a target made by a known shuffle, else ''."""
    ref = setup.target.ref
    if not ref.startswith("zoo:") or setup.pair not in ("control", "next"):
        return ""
    name = ref[4:]
    return name if name.partition("@")[0] in SHUFFLED else ""


def permutation_recovery(perms: dict, true: dict, arch) -> dict:
    """Per layer, the share of units where TransFusion's permutation equals the hidden shuffle ``true``.

    Both follow one convention: new unit i = old unit p[i] (``index_select(axis, p)``), and B = true(A), so a
    perfect recovery is p == true for every space. Heads are compared by their key/value-group order and by
    the q/k and v/o dims they move.
    """
    def share(p, q) -> float:
        return float((torch.as_tensor(p).long() == torch.as_tensor(q).long()).float().mean())

    L = arch.layers
    groups: dict[str, list[float]] = {"res_attn": [], "res_mlp": [], "heads": [], "head_dims": [], "mlp": []}
    matched = total = 0
    for l in range(L):
        ph, th = perms[f"heads:{l}"], true[f"heads:{l}"]
        after = f"res:{l}m" if f"res:{l}m" in perms else "res:0"
        entries = {"res_attn": [(perms[f"res:{l}a"], true[f"res:{l}a"])],
                   "res_mlp": [(perms[after], true[after])],
                   "heads": [(ph.kv, th.kv)],
                   "head_dims": [(ph.index("k"), th.index("k")), (ph.index("v"), th.index("v"))],
                   "mlp": [(perms[f"mlp:{l}"], true[f"mlp:{l}"])]}
        for key, pairs in entries.items():
            s = sum(share(p, q) for p, q in pairs) / len(pairs)
            groups[key].append(s)
            if key != "heads":  # heads are counted through their dims
                n = len(pairs[0][0])
                matched += s * n
                total += n
    res0 = share(perms["res:0"], true["res:0"]) if "res:0" in perms else None
    if res0 is not None:
        matched += res0 * len(perms["res:0"])
        total += len(perms["res:0"])
    return {"layers": list(range(L)), "groups": groups, "res_0": res0, "overall": matched / max(1, total)}


def recovery_for(run: Run) -> Optional[dict]:
    """:func:`permutation_recovery` of a TransFusion run whose target has a known hidden shuffle, else None."""
    name = hidden_shuffle_target(run.setup)
    perms = getattr(run.prepared.alignment, "perms", None)
    z = _zoo()
    if run.setup.pair in ("text:control", "text:next") and perms is not None:  # the text zoo's hidden shuffle
        from transport.zoo import text_store

        name = run.setup.target.ref[len(text_store.PREFIX):]
        key = ("recovery", "text", name)
        if key not in run.memo:
            run.memo[key] = permutation_recovery(perms, text_store.true_permutation(name), run.arch)
        return run.memo[key]
    if not name or perms is None or z is None:
        return None
    key = ("recovery", name)
    if key not in run.memo:
        run.memo[key] = permutation_recovery(perms, z.true_permutation(name), run.arch)
    return run.memo[key]


# ----------------------------------------------------------------------------------------------
# predictions on the test split (which examples flip, per class)
# ----------------------------------------------------------------------------------------------
def model_predictions(run: Run) -> dict[str, torch.Tensor]:
    """Test-split predictions of the target (zero-shot), naive addition, the method and the oracle, each at
    the alpha its row of the accuracy table used; cached on the run."""
    from transport.core.evaluate import predictions

    if "predictions" in run.memo:
        return run.memo["predictions"]
    t, task, dev = run.loaded.target, run.loaded.task, run.setup.device
    res = run.result
    kept = res.test_predictions
    if "zero_shot_target" in kept and run.method in kept:  # recorded while the accuracies were measured
        out = {"target": kept["zero_shot_target"]}
        if "naive" in kept or "naive_resize" in kept:
            out["naive"] = kept.get("naive", kept.get("naive_resize"))
        out[run.method] = kept[run.method]
        if "oracle" in kept:
            out["oracle"] = kept["oracle"]
        run.memo["predictions"] = out
        return out
    out = {"target": predictions(t, task, "test", device=dev)}
    if "naive" in res.accuracies:
        a = res.naive_sweep.best_alpha if res.naive_sweep is not None else res.alpha
        out["naive"] = predictions(t, task, "test", run.loaded.tau.apply_to(t.params, a), device=dev)
    elif "naive_resize" in res.accuracies:
        from transport.methods.theseus import naive_resize

        sw = run.baselines.get("naive_resize")
        a = sw.best_alpha if sw is not None else res.alpha
        out["naive"] = predictions(t, task, "test", naive_resize(run.loaded.tau, t.arch).apply_to(t.params, a),
                                   device=dev)
    out[run.method] = predictions(t, task, "test", res.transported.apply_to(t.params, res.alpha), device=dev)
    if run.loaded.oracle is not None:
        out["oracle"] = predictions(run.loaded.oracle, task, "test", device=dev)
    run.memo["predictions"] = out
    return out
