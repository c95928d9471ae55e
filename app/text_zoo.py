"""The text zoo in the sidebar: its pairs next to the vision zoo's, and its background build's progress."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from app.logic import ModelRef, Setup
from transport.zoo import text_store

MODE = "text zoo pair"


def ready() -> bool:
    return text_store.is_built()


def build_status() -> Optional[tuple[float, str]]:
    """(fraction, message) while a build writes its progress into the zoo directory, else None."""
    marker = text_store.text_zoo_root() / ".zoo-building"
    try:
        first = marker.read_text().split("\n", 1)[0]
        frac, _, msg = first.partition(" ")
        return max(0.0, min(1.0, float(frac))), msg
    except (OSError, ValueError):
        return None


def sidebar_status() -> None:
    """A progress bar while the text zoo is being built in the background (the vision zoo is usable meanwhile)."""
    if ready():
        return
    status = build_status()
    if status is not None:
        st.sidebar.progress(status[0], f"text zoo: {status[1] or 'building'} (its pairs appear when done)")
    else:
        st.sidebar.caption("The text zoo is not built (`python -m transport.zoo.text_build` builds it).")


@st.cache_data(show_spinner=False, ttl=30)
def lists() -> dict:
    return {"pairs": [(p.key, p.source, p.target, p.title, p.expected) for p in text_store.pairs()],
            "tasks": text_store.tasks(), "seeds": text_store.seeds(),
            "task_files": {t: str(text_store.task_file(t)) for t in text_store.tasks()}}


def pick_pair() -> Setup:
    """A text zoo pair, task and seed: the setup (task = the task's JSON Lines file)."""
    li = lists()
    by_key = {p[0]: p for p in li["pairs"]}
    key = st.radio("Pair", list(by_key), format_func=lambda k: by_key[k][3], key="setup-text-pair")
    _, source, target, _, _ = by_key[key]
    task = st.selectbox("Task", li["tasks"], key="setup-text-task")
    seed = st.selectbox("Zoo seed", li["seeds"], key="setup-text-seed")
    st.caption(f"{source} -> {target}: {by_key[key][4]}")
    p = text_store.PREFIX
    return Setup(ModelRef(f"{p}{source}@{seed}"), ModelRef(f"{p}{source}+{task}@{seed}"),
                 ModelRef(f"{p}{target}@{seed}"), li["task_files"][task],
                 ModelRef(f"{p}{target}+{task}@{seed}"), seed=int(seed), pair=f"text:{key}")


__all__ = ["MODE", "ready", "build_status", "sidebar_status", "lists", "pick_pair"]
