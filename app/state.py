"""Per-session state (the user's setup and runs, in ``st.session_state``) and the process-wide cache.

Two browser sessions share only read-only cached objects (models, tasks, alignments keyed by content);
their selections and results are their own.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import streamlit as st

from app import jobs, logic, ui
from app.logic import ModelRef, Run, Setup

MODEL_KINDS = ("demo zoo", "open_clip", "Hugging Face", "local file", "upload")
TV_KIND = "task-vector file"
CHECKPOINT_TYPES = ["safetensors", "pt", "pth", "bin", "ckpt"]


@st.cache_resource(show_spinner=False)
def shared_cache() -> logic.MemoryCache:
    """Models, tasks and prepared alignments, shared by all sessions of this server (content-keyed)."""
    return logic.MemoryCache(max_items=24)


# ----------------------------------------------------------------------------------------------
# the demo zoo
# ----------------------------------------------------------------------------------------------
def zoo_module():
    """The demo zoo's store (:mod:`transport.zoo`)."""
    from transport import zoo

    return zoo


def zoo_ready() -> bool:
    z = zoo_module()
    return z is not None and z.is_built()


@st.cache_data(show_spinner=False, ttl=30)
def zoo_lists() -> dict:
    """Names, pairs, tasks and seeds of the built zoo (re-read every 30 s, so a rebuild shows up)."""
    z = zoo_module()
    return {"models": [(e.ref, e.name, e.seed, e.kind, e.description) for e in z.list_models()],
            "pairs": [(p.key, p.source, p.target, p.title, p.expected) for p in z.pairs()],
            "tasks": list(z.tasks()), "seeds": list(z.seeds())}


def build_zoo(on_progress) -> None:
    """Build the demo zoo, reporting (fraction, message) to ``on_progress``."""
    from transport.zoo.builder import build

    on_progress(0.0, "building the demo zoo (a few minutes)")
    build(progress=False, on_progress=on_progress)


def build_zoo_button() -> None:
    """When the zoo is missing: a button that builds it with a progress bar."""
    z = zoo_module()
    if z is None:
        st.sidebar.warning("This installation has no demo zoo; pick custom models.")
        return
    st.sidebar.warning("The demo zoo is not built yet (the README's launch command builds it first).")
    if st.sidebar.button("Build the demo zoo", key="build-zoo"):
        bar = st.sidebar.progress(0.0, "building the demo zoo")
        with ui.guarded():
            build_zoo(lambda f, m: bar.progress(min(1.0, max(0.0, float(f))), m))
            zoo_lists.clear()
            st.rerun()


# ----------------------------------------------------------------------------------------------
# pickers
# ----------------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def open_clip_vit_models() -> list[str]:
    import open_clip

    return [m for m in open_clip.list_models() if m.startswith("ViT-")]


@st.cache_data(show_spinner=False)
def open_clip_tags(arch: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(arch))


def _upload(label: str, key: str) -> Optional[str]:
    f = st.file_uploader(label, type=CHECKPOINT_TYPES, key=f"{key}-upload")
    if f is None:
        return None
    saved = st.session_state.setdefault("uploads", {})  # file id -> path: hash and write each upload once
    if f.file_id not in saved:
        saved[f.file_id] = str(logic.save_upload(f.name, f.getvalue()))
    return saved[f.file_id]


def model_picker(label: str, key: str, allow_task_vector: bool = False, zoo_default: str = "") -> Optional[ModelRef]:
    """Choose a model from the zoo, open_clip's registry, a Hugging Face id/dir, a path or an upload."""
    kinds = list(MODEL_KINDS) + ([TV_KIND] if allow_task_vector else [])
    if not zoo_ready():
        kinds.remove("demo zoo")
    kind = st.selectbox(f"{label}: from", kinds, key=f"{key}-kind")
    if kind == "demo zoo":
        models = zoo_lists()["models"]
        refs = [m[0] for m in models]
        about = {m[0]: m[4] for m in models}
        idx = refs.index(zoo_default) if zoo_default in refs else 0
        ref = st.selectbox(label, refs, index=idx, key=f"{key}-zoo", help="NAME+TASK = fine-tuned; @SEED = zoo seed")
        st.caption(about.get(ref, ""))
        return ModelRef("zoo:" + ref)
    if kind == "open_clip":
        archs = open_clip_vit_models()
        arch = st.selectbox(f"{label}: architecture", archs,
                            index=archs.index("ViT-B-16") if "ViT-B-16" in archs else 0, key=f"{key}-oc-arch")
        tags = ["none (random init)"] + open_clip_tags(arch)
        tag = st.selectbox(f"{label}: pretrained tag", tags, key=f"{key}-oc-tag")
        return ModelRef(f"open_clip:{arch}:{'none' if tag.startswith('none') else tag}")
    if kind == "Hugging Face":
        ref = st.text_input(f"{label}: Hugging Face id or local directory", key=f"{key}-hf",
                            placeholder="openai/clip-vit-base-patch16")
        if not ref.strip():
            return None
        ref = ref.strip()
        from pathlib import Path

        return ModelRef(ref if Path(ref).is_dir() else f"hf:{ref.removeprefix('hf:')}")
    arch = ""
    if kind in ("local file", TV_KIND):
        path = st.text_input(f"{label}: file path" + (" or LoRA adapter directory" if kind == TV_KIND else ""),
                             key=f"{key}-path", placeholder="/path/to/model.safetensors" if kind != TV_KIND else
                             "/path/to/task_vector.safetensors or /path/to/peft_adapter/").strip()
    else:
        path = _upload(f"{label}: upload a checkpoint", key) or ""
    if kind != TV_KIND:
        arch = st.text_input(f"{label}: architecture (only if the file does not record it)", key=f"{key}-arch",
                             placeholder="open_clip:ViT-B-16 or zoo:A").strip()
    if not path:
        return None
    return ModelRef(path, arch=arch, task_vector=(kind == TV_KIND))


def task_picker(key: str = "task") -> Optional[str]:
    kind = st.radio("Task", ["built-in", "ImageFolder directory", "text file"], horizontal=True, key=f"{key}-kind")
    if kind == "built-in":
        names = zoo_lists()["tasks"] if zoo_ready() else logic.builtin_task_names()
        return st.selectbox("Built-in task", names, key=f"{key}-name")
    if kind == "text file":  # for language models: read with the target's tokenizer
        path = st.text_input("Text file (.jsonl / .csv with a 'text' and an optional 'label' column)",
                             key=f"{key}-textfile").strip()
        return path or None
    path = st.text_input("ImageFolder directory (one sub-folder per class)", key=f"{key}-dir").strip()
    return path or None


def devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sidebar_setup() -> Optional[Setup]:
    """The transfer question, chosen in the sidebar (shared by every page of this session)."""
    sb = st.sidebar
    sb.toggle("Presentation mode", key="present",
              help="larger fonts, thicker lines and higher contrast in every figure and on the page, for a projector")
    sb.header("Transfer setup")
    ready = zoo_ready()
    if not ready:
        build_zoo_button()
    from app import text_zoo

    text_zoo.sidebar_status()
    modes = (["demo zoo pair"] if ready else []) + ([text_zoo.MODE] if text_zoo.ready() else []) + ["custom models"]
    with sb:
        mode = st.radio("Models", modes, horizontal=True, key="setup-mode")
        setup = text_zoo.pick_pair() if mode == text_zoo.MODE else _pick_setup(mode)
        with st.expander("Evaluation"):
            device = st.selectbox("Device", devices(), key="setup-device")
            grid = st.text_input("alpha grid LO:HI:N (empty: 0 to 2 in steps of 0.1)", key="setup-grid").strip()
            if grid:
                from transport.core.evaluate import parse_alpha_grid

                parse_alpha_grid(grid)  # a bad grid is reported here, once
            tower_only = st.checkbox("Move the tower alone (output projections differ)", key="setup-tower-only",
                                     help="for source and target towers that differ only in their output "
                                          "projection: tau moves over every tensor both share, the projection's "
                                          "update is left at zero (dropped when the target has none)")
        if setup is None:
            return None
        return replace(setup, device=device, alpha_grid=grid, tower_only=tower_only)


def _pick_setup(mode: str) -> Optional[Setup]:
    """The models and task: a zoo pair (pickers read the zoo's own lists) or any custom references."""
    if mode == "demo zoo pair":
        lists = zoo_lists()
        pairs = lists["pairs"]
        by_key = {p[0]: p for p in pairs}
        # a radio, not a select box: the pair titles wrap in the narrow sidebar instead of being cut off
        key = st.radio("Pair", list(by_key), format_func=lambda k: by_key[k][3], key="setup-pair")
        _, source, target, title, expected = by_key[key]
        task = st.selectbox("Task", lists["tasks"], key="setup-task")
        seed = st.selectbox("Zoo seed", lists["seeds"], key="setup-seed")
        st.caption(f"{source} -> {target} (what to expect: at the top of every page)")
        refs = {m[0] for m in lists["models"]}
        sfx = f"@{seed}"
        oracle = f"{target}+{task}{sfx}"
        return Setup(ModelRef(f"zoo:{source}{sfx}"), ModelRef(f"zoo:{source}+{task}{sfx}"),
                     ModelRef(f"zoo:{target}{sfx}"), task,
                     ModelRef(f"zoo:{oracle}") if oracle in refs else None, seed=int(seed), pair=key)
    src = model_picker("Source pretrained (theta_A)", "src")
    ft = model_picker("Source fine-tuned (theta_A + tau)", "ft", allow_task_vector=True)
    tgt = model_picker("Target pretrained (theta_B)", "tgt")
    with st.expander("Oracle (target fine-tuned on the task; optional)"):
        use_oracle = st.checkbox("I have one", key="oracle-on")
        oracle_ref = model_picker("Oracle", "oracle") if use_oracle else None
    task = task_picker()
    seed = int(st.number_input("Seed (shots, calibration)", value=0, min_value=0, step=1, key="setup-seed-c"))
    missing = [n for n, r in (("source pretrained", src), ("source fine-tuned", ft), ("target", tgt),
                              ("task", task)) if not r]
    if missing:
        st.info("Still to choose: " + ", ".join(missing))
        return None
    return Setup(src, ft, tgt, task, oracle_ref, seed=seed)


# ----------------------------------------------------------------------------------------------
# runs of this session
# ----------------------------------------------------------------------------------------------
def runs() -> dict[str, Run]:
    """This session's runs: '<setup signature>:<method>' -> latest Run."""
    return st.session_state.setdefault("runs", {})


def run_key(setup: Setup, method: str) -> str:
    return f"{setup.signature()}:{method}"


def current_run(setup: Optional[Setup], method: str) -> Optional[Run]:
    if setup is None:
        return None
    return runs().get(run_key(setup, method))


def runs_for(setup: Optional[Setup]) -> dict[str, Run]:
    if setup is None:
        return {}
    sig = setup.signature() + ":"
    return {k[len(sig):]: r for k, r in runs().items() if k.startswith(sig)}


def history() -> logic.RunHistory:
    return st.session_state.setdefault("run-history", logic.RunHistory())


def current_job() -> Optional[jobs.Job]:
    """This session's latest background job (running or finished), if any."""
    return st.session_state.get("job")


def job_running() -> bool:
    job = current_job()
    return job is not None and job.state == "running"


def request_key(setup: Setup, methods: list[str], options: dict, shots: int, alpha: Optional[float]) -> str:
    return "|".join(logic.RunHistory.key(setup, m, {**logic.get_method(m).options, **options}, shots, alpha)
                    for m in methods)


def execute(setup: Setup, method: str, options: dict, shots: int, alpha: Optional[float] = None,
            auto: bool = False) -> Optional[jobs.Job]:
    """Start a transfer in the background (one job per session); the pages poll it. ``auto``: started by a
    widget change, not a button; then a request that just failed or was cancelled is not started again."""
    return execute_many(setup, [method], options, shots, alpha, auto, label=f"{method}")


def execute_many(setup: Setup, methods: list[str], options: dict, shots: int, alpha: Optional[float] = None,
                 auto: bool = False, label: str = "") -> Optional[jobs.Job]:
    """Run ``methods`` one after the other in one background job; their runs land in this session when done."""
    key = request_key(setup, methods, options, shots, alpha)
    last = current_job()
    if last is not None and (last.state == "running" or (auto and last.key == key and last.state != "done")):
        return None
    hist, cache = history(), shared_cache()
    known = [hist.lookup(setup, m, options, shots, alpha) for m in methods]
    if all(r is not None for r in known):  # this session ran exactly this before: show it again, no job
        for m, r in zip(methods, known):
            runs()[run_key(setup, m)] = r
            st.session_state["last-run"] = run_key(setup, m)
        return None

    def work(progress) -> list[tuple[str, Run]]:
        out = []
        for i, m in enumerate(methods):
            def sub(f: float, msg: str, i: int = i, m: str = m) -> None:
                progress((i + f) / len(methods), msg if len(methods) == 1 else f"{m} ({i + 1}/{len(methods)}): {msg}")
            out.append((run_key(setup, m), hist.get_or_run(setup, m, options, shots, alpha, progress=sub,
                                                           cache=cache)))
        return out

    job = jobs.Job(label or ", ".join(methods), work, key=key, meta={"setup": setup.signature(), "methods": methods})
    st.session_state["job"] = job.start()
    return job


def harvest() -> None:
    """Move a finished job's runs into this session's runs (on whichever page the user is now)."""
    job = current_job()
    if job is None or job.state == "running" or job.harvested:
        return
    job.harvested = True
    for key, run in job.result or []:
        runs()[key] = run
        st.session_state["last-run"] = key


def set_setup(setup: Optional[Setup]) -> None:
    st.session_state["setup"] = setup


def get_setup() -> Optional[Setup]:
    return st.session_state.get("setup")
