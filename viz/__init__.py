"""Pure figure builders: a transfer result or a method's diagnostics in, a plotly Figure out.

They never load models or touch Streamlit, so they are tested on known inputs and reused by the app,
notebooks and reports. Heavy matrices are aggregated or downsampled before they reach a browser.
"""
from viz import export, gradfix, results, theseus, transfusion  # noqa: F401

__all__ = ["export", "gradfix", "results", "theseus", "transfusion"]
