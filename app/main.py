"""Task-transport explorer: ``streamlit run app/main.py``.

Pick a pair and a task in the sidebar (the demo zoo by default), run a method, and see the alignment
behind the result. Pages are thin: figures come from :mod:`viz`, computations from :mod:`app.logic`.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st
import torch

from app import common, state, ui

HERE = Path(__file__).parent

st.set_page_config(page_title="Task transport explorer", page_icon=":material/swap_horiz:", layout="wide")
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

PAGES = [
    st.Page(str(HERE / "views" / "transport.py"), title="Transport", icon=":material/swap_horiz:", default=True),
    st.Page(str(HERE / "views" / "transfusion.py"), title="TransFusion", icon=":material/shuffle:"),
    st.Page(str(HERE / "views" / "gradfix.py"), title="GradFix", icon=":material/exposure:"),
    st.Page(str(HERE / "views" / "theseus.py"), title="Theseus", icon=":material/open_in_full:"),
    st.Page(str(HERE / "views" / "prompt.py"), title="Prompt", icon=":material/keyboard:"),
    st.Page(str(HERE / "views" / "compare.py"), title="Compare", icon=":material/compare_arrows:"),
    st.Page(str(HERE / "views" / "debug.py"), title="Debug a transfer", icon=":material/bug_report:"),
]

page = st.navigation(PAGES)
state.harvest()  # a transfer that finished while the user was elsewhere lands in this session's runs
state.set_setup(None)
with ui.guarded():
    state.set_setup(state.sidebar_setup())
ui.presentation_css()
common.sidebar_job_status()
page.run()
