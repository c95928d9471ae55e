"""Page piece: which test examples a run changes, per-class accuracy and a confusion matrix per model."""
from __future__ import annotations

import streamlit as st

from app import analysis, ui
from app.logic import Run
from viz import examples as vx

SHOWN = 24  # examples in the grid


def row_alphas(run: Run) -> dict[str, float]:
    """The alpha behind each transported row of the run's accuracy table (method, naive, zero-padded naive)."""
    res = run.result
    out = {run.method: res.alpha}
    if "naive" in res.accuracies and run.method != "naive":
        out["naive"] = res.naive_sweep.best_alpha if res.naive_sweep is not None else res.alpha
    if "naive_resize" in res.accuracies:
        sw = run.baselines.get("naive_resize")
        out["naive_resize"] = sw.best_alpha if sw is not None else res.alpha
    return out


def section(run: Run) -> None:
    """The 'which examples flip' grid, per-class accuracy of every model, one model's confusion matrix."""
    st.subheader("Which examples flip")
    task = run.loaded.task
    preds = analysis.model_predictions(run)
    x, y = task.split("test")
    c1, c2 = st.columns([3, 1])
    kinds = list(vx.FLIP_KINDS) if "naive" in preds and run.method != "naive" else ["changed", "all"]
    kind = c1.radio("Show", kinds, horizontal=True, key=f"ex-kind-{run.id}", format_func=lambda k: vx.FLIP_KINDS[k])
    idx = vx.flip_indices(y, preds, run.method, kind)
    c2.metric("test examples of this kind", f"{len(idx)} of {len(y)}")
    big = ui.presenting()  # for a projector: fewer, larger tiles with larger captions
    shown = SHOWN // 2 if big else SHOWN
    if getattr(task, "kind", "image") == "text":  # texts: a table of the prompts and every model's label word
        tok, names = run.loaded.target.tokenizer, task.classnames
        rows = [{"text": tok.decode(x.ids[i][x.mask[i]].tolist()) if tok is not None else str(x.ids[i].tolist()),
                 "true": names[int(y[i])], **{k: names[int(p[i])] for k, p in preds.items()}} for i in idx[:shown]]
        st.dataframe(rows, hide_index=True)
        st.caption("Test prompts (the task's template applied) with the true label word and every model's "
                   "predicted label word at the alphas of the accuracy table.")
    else:
        ui.figure(vx.flip_grid(x, y, preds, idx[:shown], task.classnames, cols=6 if big else 8,
                               font=17 if big else 11,
                               title=f"{vx.FLIP_KINDS[kind].capitalize()}: {min(shown, len(idx))} of {len(idx)}"),
                  f"ex-grid-{run.id}-{kind}",
                  "Test inputs as the models see them (the task's transform applied). Under each: its true class, "
                  "then every model's prediction, green when right, red when wrong. target = zero-shot, naive = "
                  "theta_B + alpha tau, then the method and the oracle at the alphas of the accuracy table.",
                  filename=f"flips-{run.method}-{kind}")
    keys = {"target": "zero_shot_target", "naive": "naive"}
    ui.figure(vx.per_class_accuracy(y, preds, task.classnames, keys), f"ex-class-{run.id}",
              "Test accuracy of every model on each class: a transfer can help some classes and hurt others "
              "while the average barely moves.", filename=f"per-class-{run.method}")
    who = st.radio("Confusion matrix of", list(preds), horizontal=True, key=f"ex-conf-{run.id}",
                   index=list(preds).index(run.method))
    ui.figure(vx.confusion_figure(y, preds[who], task.classnames, who), f"ex-conf-{run.id}-{who}",
              "Rows: the true class; columns: the predicted class; each row shows where that class's test "
              "images went (the diagonal = right).", filename=f"confusion-{who}")
