"""Debug a transfer: transport only some layers to see which carry the gain and which destroy it."""
from __future__ import annotations

import streamlit as st

from app import common, logic, state, ui
from viz import results

st.title("Debug a transfer")
st.caption("When a transfer fails, it rarely fails everywhere. Here the transported task vector is added to the "
           "target one layer range at a time, so you see where the accuracy is made and where it is lost.")

with ui.guarded():
    setup = common.need_setup()
    have = state.runs_for(setup)
    built = logic.built_methods()
    if not have:
        method = st.selectbox("Method", built, index=built.index("transfusion") if "transfusion" in built else 0,
                              key="dbg-method")
        info = common.need_method(method)
        options, shots, pressed = common.run_controls(setup, method, info, "dbg")
        run = common.run_or_notice(setup, method, pressed, options, shots)
    else:
        names = list(have)
        method = st.selectbox("Transfer to debug (runs of this session on this setup)", names, key="dbg-run")
        run = have[method]
    common.summary(run)
    st.caption("The summary above is on the test split; everything below is measured on the split chosen here.")
    split = st.radio("Measure on", ["val", "test"], horizontal=True, key="dbg-split",
                     format_func=lambda s: {"val": "validation", "test": "test"}[s])
    alpha = float(st.number_input("alpha", value=float(run.result.alpha), step=0.1, key=f"dbg-alpha-{run.id}"))

    L = run.arch.layers
    st.subheader("Transport only a range of layers")
    c1, c2 = st.columns([3, 1])
    first, last = c1.slider("Layers transported", 0, L - 1, (0, L - 1), key=f"dbg-range-{run.id}") if L > 1 \
        else (0, 0)
    with_global = c2.checkbox("+ global tensors", value=True, key=f"dbg-global-{run.id}",
                              help="embeddings, final LayerNorm and projection (they belong to no layer)")
    acc_range = logic.range_accuracy(run, first, last, alpha, with_global, split)
    abl = logic.layer_ablation(run, alpha, split)
    where = {"val": "validation", "test": "test"}[split]
    m1, m2, m3 = st.columns(3)
    common.gain_metric(m1, f"layers {first}..{last}{' + global' if with_global else ''} ({where})", acc_range,
                       abl["zero_shot"], run, "Only these layers' part of the transported task vector added; the "
                       "change is against no layer at all.")
    m2.metric(f"all layers ({where})", f"{100 * abl['full']:.1f}%")
    m3.metric(f"no layer (target zero-shot, {where})", f"{100 * abl['zero_shot']:.1f}%",
              help="measured on the split chosen above; the summary's 'zero-shot target' is on test")

    st.subheader("One layer at a time")
    ui.figure(results.layer_ablation_figure(abl["layers"], abl["only"], abl["without"], abl["full"],
                                            abl["zero_shot"], "validation" if split == "val" else "test"),
              f"dbg-abl-{run.id}-{split}-{alpha:.3g}",
              "Blue: only this layer's part of the transported task vector is added. Orange: every layer but this "
              "one. A layer whose removal drops the accuracy carries the transfer; one whose removal raises it is "
              "where the transfer goes wrong.", filename=f"ablation-{run.method}")
    # per-layer norms compare across widths too (same depth, layer by layer)
    norms = {"source tau": run.loaded.tau.per_layer_norms(), run.method: run.result.transported.per_layer_norms()}
    ui.figure(results.layer_norms_figure(norms), f"dbg-norms-{run.id}",
              "Size of the update per layer before transport (source tau) and after (transported, alpha = 1): a "
              "layer where the method cut much of tau away is a suspect.", filename=f"norms-{run.method}")
