"""Prompt page (language models): type a text, see side by side what the target zero-shot, naive addition,
each transported task vector of this session, the source fine-tuned and the oracle predict for it."""
from __future__ import annotations

import streamlit as st

from app import common, logic, state, ui
from transport.core.layout import same_shapes
from transport.core.task_vector import TaskVector
from transport.core.vocab import to_target_vocabulary
from transport.errors import TransportError
from transport.prompt import prompt_report
from viz import text as vtext
from viz.common import label_of

st.title("Prompt")
st.caption("Type a text and compare, side by side, what each version of the target predicts next: the label word of "
           "the task, the most likely next tokens, a greedy continuation, and token by token where a version's "
           "prediction differs from the reference.")


def versions(loaded, runs) -> dict:
    """name -> (model, params): the target zero-shot, naive and every run's transported tau at its alpha, the
    source fine-tuned (in the target's vocabulary) and the oracle."""
    t = loaded.target
    out = {"zero_shot_target": (t, t.params)}
    pre, ft, vocab = to_target_vocabulary(loaded.source_pre, loaded.source_ft, t)
    naive_alpha = next((r.result.naive_sweep.best_alpha for r in runs.values() if r.result.naive_sweep), 1.0)
    if same_shapes(pre.arch, t.arch):
        tau = TaskVector.from_models(pre.params, ft.params, pre.arch)
        out["naive"] = (t, TaskVector(t.arch, tau.tensors).apply_to(t.params, naive_alpha))
    for name, run in runs.items():
        out[name] = (t, run.result.transported.apply_to(t.params, run.result.alpha))
    if same_shapes(ft.arch, t.arch) or ft.arch.vocab_size == t.arch.vocab_size:
        out["source_finetuned"] = (ft, ft.params)
    if loaded.oracle is not None:
        out["oracle"] = (loaded.oracle, loaded.oracle.params)
    return out


with ui.guarded():
    setup = common.need_setup()
    loaded = logic.load_setup(setup, state.shared_cache())
    t = loaded.target
    if t.arch.stem != "tokens" or t.arch.readout != "lm":
        st.info(f"The prompt box is for language models; the target {t.ref} reads images ({t.arch.name}). Pick a "
                "text zoo pair (or Hugging Face decoders with a text file) in the sidebar.")
        raise ui.Stop
    if t.tokenizer is None:
        st.warning(f"{t.ref} has no tokenizer: typed text cannot be read (a model directory needs tokenizer files).")
        raise ui.Stop
    runs = state.runs_for(setup)
    if not runs:
        st.info("No method has run on this setup in this session yet: the versions below are the target, naive "
                "addition (alpha 1), the source fine-tuned and the oracle. Run methods on the Transport or Compare "
                "page and they appear here with the alpha chosen on validation.")
    task = loaded.task
    x, _ = task.split("test")
    example = t.tokenizer.decode(x.ids[0][x.mask[0]].tolist()) if len(x) else ""
    text = st.text_area("Prompt", value=example, key=f"prompt-text-{setup.signature()}", height=110,
                        help="prefilled with the first test text of the task, in the task's template")
    vs = versions(loaded, runs)
    c1, c2 = st.columns([2, 1])
    reference = c1.selectbox("Reference (what the colouring compares with)", list(vs), index=0, key="prompt-ref",
                             format_func=label_of)
    new_tokens = int(c2.number_input("Tokens to generate", 1, 64, 16, key="prompt-n"))
    try:
        report = prompt_report(vs, t.tokenizer, text, reference,
                               task.label_ids if task.labelled else None, task.classnames or None,
                               new_tokens=new_tokens)
    except TransportError as e:
        st.error(str(e))
        raise ui.Stop
    if report.labels:
        cols = st.columns(len(report.labels))
        for col, name in zip(cols, report.labels):
            col.metric(name.replace("_", " "), report.predicted(name) or "-",
                       help=f"{100 * max(report.labels[name].values()):.0f}% over the label words")
    ui.figure(vtext.label_figure(report), f"prompt-labels-{setup.signature()}",
              "Each version's probability of each label word after the prompt (renormalised over the label words; "
              "the task's accuracy counts the largest).", filename="prompt-labels")
    ui.figure(vtext.divergence_figure(report), f"prompt-kl-{setup.signature()}",
              "Token-level colouring: after each prompt token, how far the version's next-token distribution is from "
              "the reference's (KL divergence, nats). White: the same prediction there.", filename="prompt-kl")
    ui.figure(vtext.next_token_figure(report), f"prompt-next-{setup.signature()}",
              "The most likely next tokens of each version (· is a space, \\n a line break).", filename="prompt-next")
    ui.figure(vtext.continuation_figure(report), f"prompt-cont-{setup.signature()}",
              "Greedy continuation of each version; orange cells differ from the reference's token at that "
              "position.", filename="prompt-continuation")
