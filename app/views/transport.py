"""Transport page: pick a method, run it on the sidebar's setup, read the accuracies, move alpha, export."""
from __future__ import annotations

import streamlit as st

from app import analysis, common, examples, logic, state, ui
from transport.methods import METHOD_NAMES
from transport.sources import scaling_metadata, task_vector_bytes
from viz import export, results

st.title("Transport a task vector")
st.caption("A task vector tau = theta_ft - theta_pre is what fine-tuning changed. Transport moves it from the "
           "source model onto a different target model; a method decides how, and alpha how much of it to add.")

with ui.guarded():
    setup = common.need_setup()
    built = logic.built_methods()
    pf = common.checks(setup)
    default = next((m for m in ("transfusion", "theseus", "gradfix", "naive") if m in built and pf.applies(m)),
                   next((m for m in METHOD_NAMES if m in built), METHOD_NAMES[0]))

    def _name(n: str) -> str:
        return f"{n} (not available yet)" if n not in built else n if pf.applies(n) else f"{n} (does not apply)"

    left, right = st.columns([1, 2])
    with left:
        method = st.selectbox("Method", METHOD_NAMES, index=METHOD_NAMES.index(default), key="tp-method",
                              format_func=_name)
        info = common.need_method(method)
        st.caption(info.summary)
        with st.expander("Which methods apply to this pair", expanded=not pf.applies(method)):
            common.applicability(pf)
        alpha_mode = st.radio("alpha", ["choose on validation", "fixed"], horizontal=True, key="tp-alpha-mode")
        fixed = None
        if alpha_mode == "fixed":
            fixed = float(st.number_input("fixed alpha", value=1.0, step=0.1, key="tp-alpha-fixed"))
        options, shots, pressed = common.run_controls(setup, method, info, "tp", label="Run transport")
    with right:
        if pressed and state.execute(setup, method, options, shots, alpha=fixed) is not None:
            st.rerun()  # redraw with the button disabled and the indicator running
        run = state.current_run(setup, method)
        if run is None:
            if not state.job_running():
                st.info("Press **Run transport**. The first run on a pair aligns it (seconds on the demo zoo); "
                        "later runs and every slider reuse the cached alignment.")
            raise ui.Stop
        common.summary(run, per_row=3)
        acc = run.result.accuracies
        st.subheader("Accuracy")
        ui.accuracy_table(acc, f"tp-{run.id}")
        st.caption("Test accuracy of the target before transport (zero-shot), after adding the untouched tau "
                   "(naive), after the method, and of the source fine-tuned model and the oracle (the target "
                   "fine-tuned on the task itself) as ceilings.")

    sweep = run.result.sweep
    grid = list(sweep.alphas) if sweep else [round(0.05 * i, 2) for i in range(41)]
    st.subheader("Move alpha")
    alpha = st.select_slider("alpha (re-applies the cached alignment; no re-alignment)", options=grid,
                             value=min(grid, key=lambda a: abs(a - run.result.alpha)), key=f"tp-alpha-{run.id}")
    delta, val_acc = logic.accuracy_at_alpha(run, float(alpha), "val")
    peek = st.checkbox("also measure test accuracy at this alpha", key=f"tp-peek-{run.id}",
                       help="alpha is chosen on the validation split; picking it by looking at test accuracy "
                            "would overstate the result, so test is measured only on request")
    c1, c2, c3 = st.columns(3)
    c1.metric(f"validation accuracy at alpha = {alpha:.2f}", f"{100 * val_acc:.1f}%")
    test_acc = None
    if peek:
        _, test_acc = logic.accuracy_at_alpha(run, float(alpha), "test")
        common.gain_metric(c2, f"test accuracy at alpha = {alpha:.2f}", test_acc, acc.get("zero_shot_target"), run,
                           "The change is against the target's zero-shot test accuracy.",
                           analysis.correct_at(run, float(alpha)), analysis.correct(run, "zero_shot_target"))
    c3.metric("||alpha * transported tau||", f"{delta.norm():.3g}")
    sweeps = run.sweeps()
    fig = results.alpha_curves(sweeps, chosen={run.method: float(alpha)},
                               picked=run.result.alpha if sweep else None)
    ui.figure(fig, f"tp-alpha-{run.id}", "Validation accuracy of the target with alpha times the transported task "
              "vector added (alpha = 0 is the untouched target). The star is your slider; the dotted line is "
              "the alpha picked on validation.", filename=f"alpha-{run.method}")
    ui.figure(results.accuracy_bars(acc), f"tp-bars-{run.id}", "The accuracy table as bars: the method should "
              "sit between the target zero-shot floor and the fine-tuned ceilings.", filename=f"accuracy-{run.method}")

    examples.section(run)

    st.subheader("Export")
    e1, e2, e3 = st.columns(3)
    e1.download_button("transported tau (.safetensors)",
                       data=lambda: task_vector_bytes(run.apply(1.0), **scaling_metadata(float(alpha)),
                                                      method=run.method, target=run.loaded.target.ref),
                       help=f"the transported tau at alpha = 1 (unscaled): use theta_target + {alpha:.2f} x this file",
                       file_name=f"tau-{run.method}-alpha{alpha:.2f}.safetensors",
                       mime="application/octet-stream", on_click="ignore", key=f"dl-tau-{run.id}")
    report = {**run.result.report(), "app_alpha": float(alpha), "app_val_accuracy_at_alpha": val_acc,
              "app_test_accuracy_at_alpha": test_acc}
    e2.download_button("report (.json)", data=export.report_json(report), file_name=f"report-{run.method}.json",
                       mime="application/json", on_click="ignore", key=f"dl-json-{run.id}")
    e3.download_button("accuracies (.csv)", data=export.accuracies_csv(acc, run.result.alpha, run.method,
                                                                       alphas=examples.row_alphas(run)),
                       file_name=f"accuracies-{run.method}.csv", mime="text/csv", on_click="ignore",
                       key=f"dl-csv-{run.id}")
    st.caption("The task vector file holds alpha times the transported tau in the target family's own tensor "
               "names, so theta_B + file is a standard model of that family. Figures: HTML buttons under each "
               "figure; " + ui.PNG_HINT)
