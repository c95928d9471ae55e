"""Bytes for downloads: a figure as standalone HTML, a result as JSON / CSV, a task vector as safetensors."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Mapping

import plotly.graph_objects as go

from viz.results import accuracy_rows

# PNG export happens in the browser (the camera button of plotly's modebar), so no image engine is needed.
PNG_CONFIG = {"displaylogo": False,
              "toImageButtonOptions": {"format": "png", "scale": 2, "filename": "figure"}}


def png_config(filename: str) -> dict:
    """plotly config whose modebar camera saves ``filename``.png at 2x resolution."""
    return {**PNG_CONFIG, "toImageButtonOptions": {**PNG_CONFIG["toImageButtonOptions"], "filename": filename}}


def figure_html(fig: go.Figure) -> bytes:
    """A standalone HTML page (plotly.js embedded, so it opens offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config=PNG_CONFIG).encode("utf-8")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/Inf -> None, tuples -> lists, numpy/torch scalars -> float."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def report_json(report: Mapping) -> bytes:
    """A transfer report (``TransferResult.report()``) as indented JSON."""
    return json.dumps(_clean(report), indent=2, default=str).encode("utf-8")


#: rows that add no task vector: the alpha column says so instead of staying empty
NO_TASK_VECTOR = {"zero_shot_target": "0", "source_finetuned": "n/a (own weights)",
                  "source_zero_shot": "n/a (own weights)", "oracle": "n/a (own weights)"}


def accuracies_csv(accuracies: Mapping[str, float], alpha: float | None = None, method: str = "",
                   alphas: Mapping[str, float] | None = None, methods: Mapping[str, str] | None = None) -> bytes:
    """The accuracy table as CSV: model, key, test accuracy (%), method, alpha; every cell filled.

    ``method`` / ``alpha``: the run the table comes from (alpha is then the alpha of that method's row);
    ``alphas``: per-row alphas (e.g. every method's own, naive's own); ``methods``: per-row run names
    (default: the row's own key for transported rows, ``shared`` for the rows that are the same for every
    method, or ``method`` when one run made the whole table).
    """
    alphas = dict(alphas or {})
    if alpha is not None and method:
        alphas.setdefault(method, alpha)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "key", "test_accuracy_percent", "method", "alpha"])
    for r in accuracy_rows(accuracies):
        k = r["key"]
        who = (methods or {}).get(k) or method or (k if k in alphas else "shared")
        a = alphas.get(k)
        a_txt = NO_TASK_VECTOR.get(k, "n/a") if a is None else f"{float(a):g}"
        w.writerow([r["model"], k, f"{r['test accuracy (%)']:.2f}", who, a_txt])
    return buf.getvalue().encode("utf-8")
