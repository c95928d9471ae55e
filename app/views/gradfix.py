"""GradFix page: where tau's signs agree with the target's own few-shot gradient vote."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from app import common, logic, state, ui
from transport.core.evaluate import is_text
from transport.core.layout import param_axes
from transport.zoo import ordering
from viz import gradfix as vg


def _has(run, row: str, block: str) -> bool:
    layer = -1 if row == "global" else int(row)
    return any(p.layer == layer and p.block == block for p in param_axes(run.arch).values())

def oracle_note(run, oracle: dict) -> str:
    """One sentence: how often the vote has the oracle sign on this run."""
    return (f"On this pair the K = {run.shots} vote agrees with the oracle sign sign(tau_B) on "
            f"{100 * oracle['agreement_total']:.0f}% of the voted entries (50% = chance).")


def paper_ordering(run) -> Optional[dict]:
    """naive, few-shot fine-tuning of the target, GradFix and the oracle mask on this run's shots (alpha and the
    fine-tuning's choices on validation); None when a row cannot exist (no oracle, no naive sum, a text task, or
    GradFix on another method's output). Measured once per run."""
    acc = run.result.accuracies
    if (run.loaded.oracle is None or run.options.get("on") or "naive" not in acc or is_text(run.loaded.task)
            or run.result.sweep is None):
        return None
    if "paper_ordering" not in run.memo:
        with st.spinner("Fine-tuning the target on the same shots (the paper's few-shot baseline)..."):
            run.memo["paper_ordering"] = ordering.measure(
                run.loaded.target, run.loaded.task, run.shots, run.setup.seed, list(run.result.sweep.alphas),
                {"oracle mask": run.apply(1.0, variant="oracle")}, {"naive": acc["naive"], "GradFix": acc["gradfix"]},
                run.setup.device)
    return run.memo["paper_ordering"]


def ordering_note(m: dict, oracle: dict) -> str:
    """The paper's ordering on this run (``paper_ordering``) in one sentence: why it fails (measured), or that
    it holds."""
    failed = ordering.note(m, oracle["agreement_total"])
    if failed is not None:
        return failed
    return (f"On this pair the paper's ordering holds at K = {m['K']}: " + " < ".join(
        f"{ordering.LABELS[k]} {100 * m[k]:.1f}%" for k in ordering.ORDERING) + ".")


st.title("GradFix: keep the part of tau the target agrees with")
st.caption("On a few labelled examples, each weight of the target votes whether it should go up or down. GradFix "
           "keeps only the entries of tau whose sign matches that vote, so the update starts downhill for the "
           "target.")

with ui.guarded():
    setup = common.need_setup()
    info = common.need_method("gradfix")
    options, _, pressed = common.run_controls(setup, "gradfix", info, "gf", hidden=("variant",),
                                                 shots_widget=False)
    prev = state.current_run(setup, "gradfix")
    bases = ["tau"] + (["transfusion"] if "transfusion" in logic.built_methods() else [])
    base = st.radio("Mask what", bases, horizontal=True, key="gf-on",
                    format_func=lambda b: "the source's tau" if b == "tau" else "TransFusion's pi(tau)",
                    help="GradFix can mask another method's transported task vector: the vote is the same, "
                         "tau is first permuted onto the target")
    if base != "tau":
        options = {**options, "on": base}
    shots = st.slider("K: labelled samples per class used for the vote", 1, 16,
                      value=prev.shots if prev else 2, key="gf-k")
    # once a vote exists, moving K or the masked vector re-runs it (each choice is cached separately)
    auto = prev is not None and not pressed and (shots != prev.shots or prev.options.get("on") != options.get("on"))
    if auto:
        options = {**{k: v for k, v in prev.options.items() if k != "on"},
                   **{k: v for k, v in options.items() if k != "variant"}}
    run = common.run_or_notice(setup, "gradfix", pressed, options, shots, auto=auto)
    if run.shots != shots or run.options.get("on") != options.get("on"):
        st.caption(f"Showing the run with K = {run.shots}" + (f" on {run.options['on']}" if run.options.get("on")
                   else "") + " until the requested one is done (or press Run gradfix).")
    common.summary(run)

    variants = [v for v in ui.option_choices("gradfix").get("variant", ("normal",))
                if v != "oracle" or run.loaded.oracle is not None]
    variant = st.radio("Mask variant (re-applies the cached vote)", variants, horizontal=True, key=f"gf-var-{run.id}",
                       help="normal: keep agreeing entries; force: |tau| with the vote's sign; random: a random "
                            "mask with the same keep-rate (control); oracle: signs of the target's own fine-tune")
    delta, acc_v = logic.accuracy_at_alpha(run, run.result.alpha, "test", variant=variant)
    st.metric(f"test accuracy, variant {variant}, alpha = {run.result.alpha:.2f}", f"{100 * acc_v:.1f}%")
    diag = logic.diagnostics(run, variant=variant)

    st.subheader("Sign agreement per layer and block")
    stat = st.radio("Show", list(vg.STATS), horizontal=True, key=f"gf-stat-{run.id}",
                    format_func=lambda s: vg.STATS[s])
    oracle = logic.oracle_agreement(run)
    where = st.columns(2) if oracle is not None else [st.container()]
    with where[0]:
        event = ui.figure(vg.agreement_heatmap(diag, stat), f"gf-heat-{run.id}-{stat}-{variant}",
                          "Each cell is one weight block of one layer. " + vg.AGREEMENT_DEFINITION[0].upper() +
                          vg.AGREEMENT_DEFINITION[1:] +
                          " Keep-rate = share of tau the mask keeps. Click a cell to drill into it below.",
                          filename=f"gradfix-{stat}", clickable=True)
    if oracle is not None:
        with where[1]:
            ui.figure(vg.oracle_heatmap(oracle), f"gf-oracle-{run.id}",
                      "Why the mask works or not: " + vg.ORACLE_DEFINITION + " The oracle is "
                      f"{run.loaded.oracle.ref}, the target fine-tuned on the task.", filename="gradfix-oracle")
        m = paper_ordering(run)
        if m is None or ordering.ordered(m):  # a failed ordering's sentence carries the share itself
            st.markdown(oracle_note(run, oracle))
        if m is not None:
            st.markdown(ordering_note(m, oracle))

    st.subheader("Drill into one weight matrix")
    rows, cols, _, _ = vg.block_table(diag, "agreement")
    points = list(getattr(getattr(event, "selection", None), "points", None) or [])
    if points:  # a click on a cell picks its layer and block (once per new click)
        click = (str(points[0].get("y")), str(points[0].get("x")))
        if st.session_state.get(f"gf-click-{run.id}") != click and click[0] in rows and click[1] in cols:
            st.session_state[f"gf-click-{run.id}"] = click
            st.session_state[f"gf-row-{run.id}"], st.session_state[f"gf-col-{run.id}"] = click
    c1, c2, c3 = st.columns(3)
    row = c1.selectbox("Layer", rows, key=f"gf-row-{run.id}")
    col = c2.selectbox("Block", [c for c in cols if _has(run, row, c)], key=f"gf-col-{run.id}")
    layer = -1 if row == "global" else int(row)
    names = [k for k, p in param_axes(run.arch).items() if p.layer == layer and p.block == col
             and k in run.prepared.alignment.counts]
    names.sort(key=lambda k: (param_axes(run.arch)[k].is_bias, k))
    if names:
        name = c3.selectbox("Tensor", names, key=f"gf-tensor-{run.id}")
        entries = run.prepared.alignment.entry_map(name, run.loaded.tau, diag.get("vote"))
        ui.figure(vg.entry_map_image(entries, name), f"gf-entry-{run.id}-{name}",
                  "Every entry of this tensor: blue where tau's sign agrees with the vote (kept), red where it "
                  "disagrees (dropped), grey where the vote is tied; the title counts them as the heatmap does. "
                  "Large matrices are averaged over tiles; a vector (bias, LayerNorm) is one strip.",
                  filename=f"gradfix-entries-{name}")
    else:
        st.info("No vote for this block (the loss does not reach it).")

    c1, c2 = st.columns(2)
    with c1:
        ui.figure(vg.margin_histogram(diag), f"gf-margin-{run.id}",
                  "How unanimous the K samples were per entry: at 1 every sample wanted the same direction, near 0 "
                  "the vote was split and its sign is noise.", filename="gradfix-margin")
    with c2:
        ui.figure(vg.keep_rate_per_layer(diag), f"gf-keep-{run.id}-{variant}",
                  "Per layer: how much of tau survives the mask, and the first-order change of the target's "
                  "loss along the masked update (negative = the loss goes down).", filename="gradfix-keep-rate")

