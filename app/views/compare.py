"""Compare page: every available method on the same pair and task, side by side."""
from __future__ import annotations

import math

import streamlit as st

from app import common, examples, logic, state, ui
from app.logic import ZERO_TAU
from transport.methods import METHOD_NAMES
from viz import export, results
from viz.common import label_of, ordered

st.title("Compare methods")
st.caption("All methods on the same pair and task: their accuracies, their accuracy-vs-alpha curves, and whether "
           "they move the target in the same direction (cosine between their transported task vectors per layer).")

with ui.guarded():
    setup = common.need_setup()
    built = logic.built_methods()
    missing = [m for m in METHOD_NAMES if m not in built]
    if missing:
        st.info("Not available yet: " + ", ".join(missing) + " (nothing is shown for them).")
    pf = common.checks(setup)
    usable = [m for m in built if pf.applies(m)]
    common.applicability(pf, built)
    chosen = st.multiselect("Methods (those that apply to this pair)", usable, default=usable, key="cmp-methods")
    shots = int(st.number_input("K labelled samples per class (methods that need labels)", 1, 256, 2, key="cmp-k"))
    busy = state.job_running()
    blocked = ZERO_TAU if pf.tau_zero else ""
    if blocked:
        st.warning(blocked, icon=":material/block:")
    pressed = st.button("Run the selected methods", type="primary", key="cmp-run", disabled=busy or bool(blocked))
    common.job_panel("cmp")
    if pressed and not busy and not blocked:
        have = state.runs_for(setup)
        todo = [m for m in chosen if not (m in have and have[m].shots == shots)]
        if todo and state.execute_many(setup, todo, {}, shots, label="compare: " + ", ".join(todo)) is not None:
            st.rerun()
    runs = {m: r for m, r in state.runs_for(setup).items() if m in chosen}
    if not runs:
        if not state.job_running():
            st.info("Press **Run the selected methods** (or run methods on the other pages; they show up here).")
        raise ui.Stop

    # one table: the shared rows once, then each method at its own alpha
    table: dict[str, float] = {}
    for r in runs.values():
        for k, v in r.result.accuracies.items():
            table.setdefault(k, v)
        table[r.method] = r.result.accuracies.get(r.method, float("nan"))
    alphas: dict[str, float] = {}
    for r in runs.values():
        for k, a in examples.row_alphas(r).items():
            alphas.setdefault(k, a)
    rows = []
    for k in ordered(table):
        v = table[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        prep = runs[k].prepared if k in runs else None
        rows.append({"model": label_of(k), "test accuracy (%)": round(100 * v, 1),
                     "alpha": f"{alphas[k]:.2f}" if k in alphas else "0.00" if k == "zero_shot_target"
                     else export.NO_TASK_VECTOR.get(k, "n/a"),
                     "prepare": "-" if prep is None else ("cached" if prep.cache_hit else f"{prep.seconds:.1f} s")})
        if any(r.loaded.adapter is not None for r in runs.values()):  # a LoRA adapter source: the rank kept
            rows[-1]["LoRA rank kept"] = logic.rank_kept(runs[k]) if k in runs else "-"
    st.dataframe(rows, hide_index=True, key="cmp-table", width="content", column_config=ui.PERCENT_COLUMNS)
    st.caption("Each method (and naive) at the alpha it picked on the validation split; the other rows are the same "
               "for all methods (target zero-shot floor, source fine-tuned and oracle ceilings).")
    st.download_button("table (.csv)", data=export.accuracies_csv(table, alphas=alphas), file_name="compare.csv",
                       mime="text/csv", on_click="ignore", key="cmp-dl-csv")

    sweeps: dict = {}
    for r in runs.values():
        for k, v in r.sweeps().items():
            sweeps.setdefault(k, v)
    ui.figure(results.alpha_curves(sweeps), "cmp-alpha",
              "Validation accuracy against alpha for every method on one plot; stars mark the alpha each method "
              "picked. A curve that peaks higher and stays high over a wider range of alpha is a more reliable "
              "transfer.", filename="compare-alpha")
    taus = {m: r.result.transported for m, r in runs.items()}
    ui.figure(results.layer_cosine_figure(results.layer_cosines(taus)), "cmp-cos",
              "Cosine between two methods' transported task vectors, layer by layer: 1 = they change the target "
              "in the same direction, 0 = unrelated changes.", filename="compare-cosine")
    ui.figure(results.layer_norms_figure({m: t.per_layer_norms() for m, t in taus.items()}), "cmp-norms",
              "How large each method's update is per layer (at alpha = 1); masking or cutting dimensions shrinks "
              "it.", filename="compare-norms")
