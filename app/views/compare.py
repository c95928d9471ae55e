"""Compare page: every available method on the same pair and task, side by side."""
from __future__ import annotations

import math

import streamlit as st

from app import common, logic, state, ui
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
    chosen = st.multiselect("Methods", built, default=built, key="cmp-methods")
    shots = int(st.number_input("K labelled samples per class (methods that need labels)", 1, 256, 2, key="cmp-k"))
    if st.button("Run the selected methods", type="primary", key="cmp-run"):
        have = state.runs_for(setup)
        loaded = logic.load_setup(setup, state.shared_cache())
        for m in chosen:
            why = logic.incompatibility(m, loaded)
            if why:
                st.warning(f"{m}: skipped: {why}")
                continue
            if m in have and have[m].shots == shots:
                continue
            state.execute(setup, m, {}, shots)
    runs = {m: r for m, r in state.runs_for(setup).items() if m in chosen}
    if not runs:
        st.info("Press **Run the selected methods** (or run methods on the other pages; they show up here).")
        raise ui.Stop

    # one table: the shared rows once, then each method at its own alpha
    table: dict[str, float] = {}
    for r in runs.values():
        for k, v in r.result.accuracies.items():
            table.setdefault(k, v)
        table[r.method] = r.result.accuracies.get(r.method, float("nan"))
    rows = []
    for k in ordered(table):
        v = table[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        alpha = runs[k].result.alpha if k in runs else None
        prep = runs[k].prepared if k in runs else None
        rows.append({"model": label_of(k), "test accuracy (%)": round(100 * v, 2),
                     "alpha": "" if alpha is None else f"{alpha:.2f}",
                     "prepare": "" if prep is None else ("cached" if prep.cache_hit else f"{prep.seconds:.2f} s")})
    st.dataframe(rows, hide_index=True, key="cmp-table", width="content")
    st.caption("Each method at the alpha it picked on the validation split; the other rows are the same for all "
               "methods (target zero-shot floor, source fine-tuned and oracle ceilings).")
    st.download_button("table (.csv)", data=export.accuracies_csv(table), file_name="compare.csv", mime="text/csv",
                       on_click="ignore", key="cmp-dl-csv")

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
