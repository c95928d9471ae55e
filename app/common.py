"""Page pieces used by several pages: the setup line, a method's run controls, the result summary."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from app import logic, state, ui
from app.logic import Run, Setup
from transport.methods import MethodInfo


def need_setup() -> Setup:
    """The session's setup, or a notice and the end of the page."""
    setup = state.get_setup()
    if setup is None:
        st.info("Choose the models and the task in the sidebar first.")
        raise ui.Stop
    st.markdown(f"**Setup:** `{setup.label}` · device `{setup.device}`")
    return setup


def need_method(name: str) -> MethodInfo:
    info, why = logic.method_status(name)
    if info is None:
        ui.not_available(name, why)
        raise ui.Stop
    return info


def run_controls(setup: Setup, method: str, info: MethodInfo, key: str, label: Optional[str] = None,
                 hidden: tuple[str, ...] = (), shots_widget: bool = True) -> tuple[dict, int, bool]:
    """Parameters (typed from the method's defaults) and a Run button; returns (options, shots, pressed)."""
    with st.expander(f"{method} parameters", expanded=False):
        options = ui.option_widgets(method, info.spec, key, hidden)
        shots = 2
        if info.data == "labelled" and shots_widget:
            shots = int(st.number_input("K labelled samples per class (train split)", min_value=1, max_value=256,
                                        value=2, step=1, key=f"{key}-shots"))
    pressed = st.button(label or f"Run {method}", type="primary", key=f"{key}-run")
    return options, shots, pressed


def run_or_notice(setup: Setup, method: str, pressed: bool, options: dict, shots: int) -> Run:
    """Run when pressed; return this session's latest run of ``method`` on ``setup`` or end the page."""
    if pressed:
        state.execute(setup, method, options, shots)
    run = state.current_run(setup, method)
    if run is None:
        if not pressed:
            st.info(f"Press **Run {method}** to align this pair (cached: a second run on the same pair is instant).")
        raise ui.Stop
    return run


def summary(run: Run, per_row: int = 5) -> None:
    """One row (or rows of ``per_row``) of headline numbers for a run."""
    acc = run.result.accuracies
    m, z = acc.get(run.method), acc.get("zero_shot_target")
    n = acc.get("naive", acc.get("naive_resize"))
    prep = run.prepared
    items = [
        (f"{run.method}{' on ' + run.options['on'] if run.options.get('on') else ''} (test)",
         "-" if m is None else f"{100 * m:.1f}%",
         None if m is None or z is None else f"{100 * (m - z):+.1f} pts", "test accuracy after transport; the "
         "arrow compares it with the target's zero-shot accuracy"),
        ("zero-shot target", "-" if z is None else f"{100 * z:.1f}%", None, "the target before any transport"),
        ("naive", "-" if n is None else f"{100 * n:.1f}%", None, "theta_B + alpha * tau without alignment "
         "(across widths: tau zero-padded / truncated to the target's shapes)"),
        ("alpha", f"{run.result.alpha:.2f}", None, "picked on the validation split" if run.result.sweep else
         "fixed by you"),
        ("prepare", "cached" if prep.cache_hit else f"{prep.seconds:.1f} s", None,
         f"the expensive alignment step; the whole run took {run.seconds:.1f} s"),
    ]
    for i in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for c, (label, value, delta, help_) in zip(cols, items[i:i + per_row]):
            c.metric(label, value, delta, help=help_)
