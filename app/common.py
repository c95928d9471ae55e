"""Page pieces used by several pages: the setup and expectation lines, a method's run controls with the
background job's progress, and the result summary."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from app import analysis, jobs, logic, state, ui
from app.analysis import Preflight
from app.logic import Run, Setup
from transport.methods import METHOD_NAMES, MethodInfo

POLL_S = 1.0  # how often a running job's indicator refreshes (seconds)


def need_setup() -> Setup:
    """The session's setup, or a notice and the end of the page. Opens the page with what to expect."""
    setup = state.get_setup()
    if setup is None:
        st.info("Choose the models and the task in the sidebar first.")
        raise ui.Stop
    st.markdown(f"**Setup:** `{setup.label}` · device `{setup.device}`")
    line = analysis.expectation(setup)
    if line:
        st.info(line, icon=":material/lightbulb:")
    return setup


def need_method(name: str) -> MethodInfo:
    info, why = logic.method_status(name)
    if info is None:
        ui.not_available(name, why)
        raise ui.Stop
    return info


def checks(setup: Setup) -> Preflight:
    """What applies to this setup, known before running (loads the models once; cached)."""
    with st.spinner("loading the models to check what applies"):
        return analysis.preflight(setup, state.shared_cache())


def applicability(pf: Preflight, methods: Optional[list[str]] = None) -> None:
    """One line per method: applies to this pair, or why not (shown before anything runs)."""
    built = logic.built_methods()
    lines = []
    for m in methods or [m for m in METHOD_NAMES if m in built]:
        why = pf.why_not.get(m, "")
        if not why:
            lines.append(f"- **{m}**: applies to this pair")
        elif m == "naive" and pf.cross_width:
            lines.append(f"- **{m}**: does not apply (shapes differ: theta_B + alpha tau does not exist); the "
                         "zero-padded baseline *naive (tau zero-padded / truncated)* stands in for it")
        else:
            lines.append(f"- **{m}**: does not apply: {why}")
    st.markdown("\n".join(lines))


def run_controls(setup: Setup, method: str, info: MethodInfo, key: str, label: Optional[str] = None,
                 hidden: tuple[str, ...] = (), shots_widget: bool = True) -> tuple[dict, int, bool]:
    """Parameters (typed from the method's defaults), whether the method applies, and a Run button (disabled
    while this session runs a transfer, or when the method cannot run); returns (options, shots, pressed)."""
    pf = checks(setup)
    with st.expander(f"{method} parameters", expanded=False):
        options = ui.option_widgets(method, info.spec, key, hidden)
        shots = 2
        if info.data == "labelled" and shots_widget:
            shots = int(st.number_input("K labelled samples per class (train split)", min_value=1, max_value=256,
                                        value=2, step=1, key=f"{key}-shots"))
    blocker = pf.blocker(method)
    if blocker:
        st.warning(f"**{method}** cannot run on this setup: {blocker}", icon=":material/block:")
    busy = state.job_running()
    pressed = st.button(label or f"Run {method}", type="primary", key=f"{key}-run", disabled=busy or bool(blocker),
                        help="a transfer is running in this session (see below)" if busy else None)
    job_panel(key)
    return options, shots, bool(pressed and not busy and not blocker)


@st.fragment(run_every=POLL_S)
def _poll_panel(key: str) -> None:
    job = state.current_job()
    if job is None:
        return
    s = job.status()
    if not s.running:
        st.rerun()  # the whole page: the result (or the error) replaces the indicator
    st.progress(min(1.0, max(0.0, s.fraction)), text=jobs.describe(s))
    if job.cancel_requested:
        st.caption("cancelling: the transfer stops at its next progress report")
    elif st.button("Cancel", key=f"{key}-cancel", icon=":material/cancel:"):
        job.cancel()


def job_panel(key: str) -> None:
    """Right under the Run button: a running job's phase, elapsed time, estimate and a Cancel button (it
    refreshes itself); once it ended, how it ended if it failed or was cancelled."""
    job = state.current_job()
    if job is None:
        return
    if job.state == "running":
        _poll_panel(key)
        return
    s = job.status()
    if s.state == "failed":
        st.error(s.error)
    elif s.state == "cancelled":
        st.info(jobs.describe(s) + ". Nothing was stored; press Run to start again.")


@st.fragment(run_every=POLL_S)
def _poll_sidebar() -> None:
    job = state.current_job()
    if job is None:
        return
    s = job.status()
    if not s.running:
        st.rerun()
    st.progress(min(1.0, max(0.0, s.fraction)), text=f"running: {jobs.describe(s)}")


def sidebar_job_status() -> None:
    """On every page: a running transfer's progress, or how the last one ended (it is kept across pages)."""
    job = state.current_job()
    if job is None:
        return
    with st.sidebar:
        if job.state == "running":
            _poll_sidebar()
        else:
            s = job.status()
            text = jobs.describe(s)
            if s.state == "done":
                st.success(text + ". Its results are on the method's page.", icon=":material/check_circle:")
            elif s.state == "failed":
                st.caption(text)
            else:
                st.caption(text)


def run_or_notice(setup: Setup, method: str, pressed: bool, options: dict, shots: int,
                  auto: bool = False) -> Run:
    """Start a run when pressed (in the background); return this session's latest run of ``method`` on
    ``setup`` or end the page with a notice."""
    if pressed or auto:
        if state.execute(setup, method, options, shots, auto=auto and not pressed) is not None:
            st.rerun()  # redraw with the button disabled and the indicator running
    run = state.current_run(setup, method)
    if run is None:
        if not state.job_running():
            st.info(f"Press **Run {method}** to align this pair (cached: a second run on the same pair is instant).")
        raise ui.Stop
    return run


TIMING_LABELS = (("load", "loading"), ("prepare", "prepare"), ("apply", "apply"), ("sweep", "alpha sweep"),
                 ("evaluate", "test evaluation"))


def timing_line(run: Run) -> str:
    """Where the run's time went, e.g. 'loading 0.1 s · prepare 9.8 s · alpha sweep 4.2 s · ...'."""
    t = run.timings or {}
    if not t:
        return ""
    parts = [f"{label} {t.get(k, 0.0):.1f} s" for k, label in TIMING_LABELS if k in t]
    return "Where the time went: " + " · ".join(parts) + f" (total {t.get('total', run.seconds):.1f} s)"


def gain_metric(col, label: str, value: Optional[float], zero: Optional[float], run: Run, help_: str,
                correct_m=None, correct_z=None) -> None:
    """A metric with its change from zero-shot; a change inside the noise band (the zoo's seed spread and the
    test split's paired sampling noise, in quadrature) reads 'no gain', in grey."""
    if value is None or zero is None:
        col.metric(label, "-" if value is None else f"{100 * value:.1f}%", None, help=help_)
        return
    band = analysis.noise_band(run, correct_m, correct_z)
    text, color = analysis.gain(value - zero, band)
    why = ("no noise estimate for this measurement" if band.kind == "none"
           else f"noise band +-{100 * band.width:.1f} pts ({band.kind}: {band.detail})")
    col.metric(label, f"{100 * value:.1f}%", text, delta_color=color, delta_arrow="off" if color == "off" else "auto",
               help=f"{help_} A change within the noise band is no gain: {why}.")


def summary(run: Run, per_row: int = 5) -> None:
    """One row (or rows of ``per_row``) of headline numbers for a run, and where its time went."""
    acc = run.result.accuracies
    m, z = acc.get(run.method), acc.get("zero_shot_target")
    n = acc.get("naive", acc.get("naive_resize"))
    prep = run.prepared
    head = f"{run.method}{' on ' + run.options['on'] if run.options.get('on') else ''} (test)"
    items = [
        ("zero-shot target", "-" if z is None else f"{100 * z:.1f}%", "the target before any transport"),
        ("naive", "-" if n is None else f"{100 * n:.1f}%", "theta_B + alpha * tau without alignment "
         "(across widths: tau zero-padded / truncated to the target's shapes)"),
        ("alpha", f"{run.result.alpha:.2f}", "picked on the validation split" if run.result.sweep else "fixed by you"),
        ("prepare", "cached" if prep.cache_hit else f"{prep.seconds:.1f} s",
         f"the expensive alignment step; the whole run took {run.seconds:.1f} s"),
    ]
    cells = [None] + items
    for i in range(0, len(cells), per_row):
        # the headline gets twice the width: its 'no gain (within seed spread)' must not be cut off
        cols = st.columns([2, 1.4] + [1] * (per_row - 2) if i == 0 and per_row >= 5 else per_row)
        for c, item in zip(cols, cells[i:i + per_row]):
            if item is None:
                gain_metric(c, head, m, z, run, "Test accuracy after transport; the change is against the target's "
                            "zero-shot accuracy.", analysis.correct(run, run.method),
                            analysis.correct(run, "zero_shot_target"))
            else:
                label, value, help_ = item
                c.metric(label, value, None, help=help_)
    line = timing_line(run)
    if line:
        st.caption(line)
