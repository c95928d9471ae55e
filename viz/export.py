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


def accuracies_csv(accuracies: Mapping[str, float], alpha: float | None = None, method: str = "") -> bytes:
    """The accuracy table as CSV: model, key, test accuracy (%) [, method, alpha]."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "key", "test_accuracy_percent", "method", "alpha"])
    for r in accuracy_rows(accuracies):
        w.writerow([r["model"], r["key"], r["test accuracy (%)"], method, "" if alpha is None else alpha])
    return buf.getvalue().encode("utf-8")
