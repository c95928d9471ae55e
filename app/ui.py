"""Streamlit building blocks shared by the pages: error guard, figures with export, tables, option widgets."""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator, Optional

import plotly.graph_objects as go
import streamlit as st

from transport.errors import NotImplementedYet, TransportError
from viz import export
from viz.common import presentation
from viz.results import accuracy_rows

log = logging.getLogger("transport.app")

PNG_HINT = "PNG: use the camera icon in the chart's toolbar (top right of the chart)."


class Stop(Exception):
    """Raised by a page to end its own rendering quietly (after it showed an error or a notice)."""


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Show a TransportError as one ``st.error`` line (never a traceback); the session keeps working.

    Unexpected exceptions are logged with their traceback on the server and shown as one line too.
    Streamlit's own control-flow exceptions (rerun, stop) pass through.
    """
    try:
        yield
    except Stop:
        pass
    except NotImplementedYet as e:
        st.info(f"Not available yet: {e}")
    except TransportError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - the page must survive any failure of a computation
        if type(e).__module__.startswith("streamlit"):
            raise
        log.exception("unexpected error in the app")
        first = (str(e).splitlines() or [""])[0]
        st.error(f"Unexpected error ({type(e).__name__}): {first}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "figure"


def presenting() -> bool:
    """Presentation mode (the sidebar toggle): every figure and the page text drawn for a projector."""
    return bool(st.session_state.get("present", False))


PRESENTATION_CSS = """<style>
[data-testid="stMain"] { font-size: 1.25rem; }
[data-testid="stMain"] p, [data-testid="stMain"] li, [data-testid="stMain"] label { font-size: 1.2rem; }
[data-testid="stMain"] [data-testid="stCaptionContainer"] { font-size: 1.1rem; color: #1a1a1a; }
[data-testid="stMain"] [data-testid="stMetricValue"], [data-testid="stMain"] [data-testid="stMetricValue"] * {
  font-size: 2.8rem; }
[data-testid="stMetricLabel"] p { font-size: 1.2rem; color: #000000; }
[data-testid="stMain"] h1 { font-size: 3rem; }
</style>"""


def presentation_css() -> None:
    """Larger page text and metrics in presentation mode (figures get :func:`viz.common.presentation`)."""
    if presenting():
        st.html(PRESENTATION_CSS)


def figure(fig: go.Figure, key: str, caption: str, filename: Optional[str] = None, clickable: bool = False) -> Any:
    """Draw ``fig`` with a one-or-two-sentence caption, an HTML download and the modebar's PNG camera.

    ``clickable``: clicking a point reruns the page; the selection event is returned. In presentation mode
    the figure (and its HTML download) gets :func:`viz.common.presentation`.
    """
    if presenting():
        fig = presentation(fig)
    name = filename or slug(key)
    kwargs: dict[str, Any] = {"on_select": "rerun", "selection_mode": "points"} if clickable else {}
    event = st.plotly_chart(fig, key=f"fig-{key}", config=export.png_config(name), **kwargs)
    c1, c2 = st.columns([4, 1])
    c1.caption(f"{caption} {PNG_HINT}")
    c2.download_button("HTML", data=lambda f=fig: export.figure_html(f), file_name=f"{name}.html",
                       mime="text/html", key=f"dl-{key}", on_click="ignore", help="the figure as a standalone HTML page")
    return event if clickable else None


#: every table of the explorer shows accuracies with one decimal (as the metrics do), alphas with two
PERCENT_COLUMNS = {"test accuracy (%)": st.column_config.NumberColumn(format="%.1f"),
                   "validation accuracy (%)": st.column_config.NumberColumn(format="%.1f")}


def accuracy_table(accuracies: dict, key: str) -> None:
    rows = accuracy_rows(accuracies)
    if not rows:
        st.info("No accuracies (no task was evaluated).")
        return
    st.dataframe([{"model": r["model"], "test accuracy (%)": r["test accuracy (%)"]} for r in rows],
                 hide_index=True, key=f"tbl-{key}", width="content", column_config=PERCENT_COLUMNS)



def not_available(method: str, reason: str) -> None:
    st.info(f"**{method}** is not available yet: {reason}. This page lights up as soon as the method is built; "
            "nothing here is simulated.")


def option_widgets(method: str, spec: tuple, key: str, hidden: tuple[str, ...] = ()) -> dict:
    """One widget per option the method declares (typed, bounded and with choices from its declaration)."""
    out: dict[str, Any] = {}
    for o in spec:
        if o.hidden or o.name in hidden:
            continue
        k = f"{key}-{method}-{o.name}"
        label = o.name.replace("_", " ")
        default = o.default
        if o.choices is not None:
            opts = list(o.choices)
            out[o.name] = st.selectbox(label, opts, index=opts.index(default) if default in opts else 0, key=k,
                                       help=o.help)
        elif isinstance(default, bool):
            out[o.name] = st.checkbox(label, value=default, key=k, help=o.help)
        elif isinstance(default, int):
            lo = int(o.minimum) if o.minimum is not None else None
            hi = int(o.maximum) if o.maximum is not None else None
            out[o.name] = int(st.number_input(label, value=int(default), min_value=lo, max_value=hi, step=1, key=k,
                                              help=o.help))
        elif isinstance(default, float):
            out[o.name] = float(st.number_input(label, value=float(default), min_value=o.minimum,
                                                max_value=o.maximum, key=k, format="%.4g", help=o.help))
        elif isinstance(default, str):
            out[o.name] = st.text_input(label, value=default, key=k, help=o.help)
    return out


def option_choices(method: str) -> dict[str, tuple]:
    """Allowed values of a method's options that declare choices."""
    from transport.methods import get_method

    return {o.name: tuple(o.choices) for o in get_method(method).spec if o.choices is not None}
