"""TransFusion page: which head, neuron and residual unit of the source corresponds to which of the target."""
from __future__ import annotations

import streamlit as st

from app import analysis, common, ui
from viz import transfusion as vt

st.title("TransFusion: permuting tau onto the target")
st.caption("Two independently trained transformers can compute the same thing with their heads and neurons in a "
           "different order. TransFusion finds that order (a permutation per layer) from the two pretrained "
           "models alone, and re-orders tau the same way before adding it to the target.")

with ui.guarded():
    setup = common.need_setup()
    info = common.need_method("transfusion")
    options, shots, pressed = common.run_controls(setup, "transfusion", info, "tf")
    run = common.run_or_notice(setup, "transfusion", pressed, options, shots)
    common.summary(run)
    diag = run.result.diagnostics or run.prepared.alignment.diagnostics()
    layers = diag.get("layers") or []
    if not layers:
        st.warning("This alignment carries no per-layer diagnostics.")
        raise ui.Stop

    st.subheader("Head assignment per layer")
    n = len(layers)
    layer = st.slider("Layer", 0, n - 1, 0, key=f"tf-layer-{run.id}") if n > 1 else 0
    lay = layers[layer]
    ui.figure(vt.head_permutation(lay), f"tf-heads-{run.id}-{layer}",
              "Each cell compares a target head (row) with a source head (column) by the singular values of "
              "their Q, K, V, O weights; red squares are the chosen one-to-one matching. The bars (a fixed 0-1 "
              "scale, comparable across pairs) are margin / (margin + chosen cost), the margin being how much "
              "worse the best alternative assignment is: 1 = exact and unique, near 0 = a toss-up.",
              filename=f"transfusion-heads-layer{layer}")
    if int(diag.get("group_size") or 1) > 1:
        st.subheader("Query heads inside the matched key/value groups")
        ui.figure(vt.query_head_permutation(lay), f"tf-query-{run.id}-{layer}",
                  "Under grouped-query attention the unit matched above is a key/value group. Inside a matched "
                  "pair of groups (blue outlines) each target query head (row) takes one source query head "
                  "(column, red): a query head never leaves its group.", filename=f"transfusion-query-heads-l{layer}")

    st.subheader("Inside one matched head")
    perm = lay["head_perm"]
    head = st.selectbox("Head pair", list(range(len(perm))), key=f"tf-head-{run.id}",
                        format_func=lambda i: f"target head {i} <- source head {perm[i]}")
    ui.figure(vt.within_head_permutation(lay["within_head_perms"][head], head, perm[head]),
              f"tf-within-{run.id}-{layer}-{head}",
              "Inside a matched pair of heads, the dimensions can also be re-ordered (one order shared by Q, K, V "
              "and O). Dots on the dotted diagonal stay in place.", filename=f"transfusion-within-l{layer}-h{head}")

    recovery = analysis.recovery_for(run)
    if recovery is not None:
        st.subheader("Recovered permutation vs the hidden shuffle")
        ui.figure(vt.recovery_figure(recovery), f"tf-recovery-{run.id}",
                  f"The zoo made {setup.target.short} by shuffling the units of a model that shares A's basis, and "
                  "kept the shuffle. Each bar: the share of units where the permutation TransFusion found from the "
                  "weights alone equals that hidden shuffle (100 % = recovered exactly).",
                  filename="transfusion-recovery")

    c1, c2 = st.columns(2)
    with c1:
        ui.figure(vt.permutation_distance(diag), f"tf-dist-{run.id}",
                  "How far each permutation is from doing nothing: 0% means the two models already agree on "
                  "that order, 100% means every unit moved.", filename="transfusion-distance")
    with c2:
        activation = diag.get("matching") == "activation"
        ui.figure(vt.objective_per_sweep(diag), f"tf-obj-{run.id}",
                  "Activation matching solves every permutation once from activation correlations: no sweeps."
                  if activation else "Weight matching improves the permutations one at a time; the total "
                  "similarity should rise and flatten when it has converged.", filename="transfusion-objective")
