"""Theseus page: do the source's activations, rotated by the Procrustes map, land on the target's?"""
from __future__ import annotations

import streamlit as st

from app import common, ui
from transport.core.evaluate import is_text
from viz import theseus as vth

st.title("Theseus: mapping activations across models (and widths)")
st.caption("Theseus shows both pretrained models the same inputs (images; texts on language models, every real "
           "token one row) and finds, for every layer, the rotation T that best lines up the source's activations "
           "X_A with the target's X_B (a Procrustes problem). The same rotations carry tau into the target, even "
           "when the target is wider.")

with ui.guarded():
    setup = common.need_setup()
    info = common.need_method("theseus")
    options, shots, pressed = common.run_controls(setup, "theseus", info, "th")
    run = common.run_or_notice(setup, "theseus", pressed, options, shots)
    common.summary(run)
    text = is_text(run.loaded.task)  # a language model: texts and tokens, no class token
    diag = run.result.diagnostics or run.prepared.alignment.diagnostics()
    alignment = run.prepared.alignment

    ui.figure(vth.procrustes_residual(diag), f"th-res-{run.id}",
              "How far the mapped source activations are from the target's, relative to their size, per activation "
              "space: grey before alignment (the source copied as is, zero-padded or cut to the target width), "
              "green after the map. Lower is better. The space names are explained below the chart.",
              filename="theseus-residual")
    with st.expander("What the space names mean (res:2m, ctx:1, ...)"):
        items = [f"`{k}`: {v}" for k, v in vth.space_legend(text).items()]
        half = (len(items) + 1) // 2
        left, right = st.columns(2)
        left.markdown("  \n".join(items[:half]))
        right.markdown("  \n".join(items[half:]))
        st.caption("L is the block index, counted from 0: res:2m is the output of block 2.")

    samples = getattr(alignment, "pca_sample", None) or {}
    spaces = [m["space"] for m in diag.get("maps") or [] if m["space"] in samples] or list(samples)
    if not spaces:
        st.info("This alignment holds no activation sample to draw.")
        raise ui.Stop
    st.subheader("Activations before and after the map")
    c1, c2 = st.columns([3, 1])
    # the deepest space by default: at res:0 the class token (a prompt's last token) is the same for every sample
    space = c1.selectbox("Activation space (layer)", spaces, index=len(spaces) - 1, key=f"th-space-{run.id}",
                         format_func=lambda sp: f"{sp}: {vth.describe_space(sp, text)}")
    dims = c2.radio("PCA", [2, 3], horizontal=True, format_func=lambda d: f"{d}-D", key=f"th-dims-{run.id}")
    sample = samples[space]
    mapped = alignment.mapped_sample(space)
    if float(sample["target"].float().std(0).max()) < 1e-6:
        st.caption(f"At {space} every text gives the same activation (the embedding of the prompt's last token, "
                   "the same token in every prompt, before any attention has read the text), so all points "
                   "coincide; pick a deeper layer." if text else
                   f"At {space} every image gives the same activation (the class token before any attention has "
                   "seen the image), so all points coincide; pick a deeper layer.")
    before = alignment.naive_sample(space) if hasattr(alignment, "naive_sample") else None
    ui.figure(vth.pca_figure(sample["target"], sample["source"], mapped, sample.get("labels"),
                             run.loaded.task.classnames, dims=int(dims), space=space, before=before,
                             sample="text" if text else "image"),
              f"th-pca-{run.id}-{space}-{dims}", vth.pca_caption(len(sample["target"]), text),
              filename=f"theseus-pca-{space}")
    c1, c2 = st.columns(2)
    with c1:
        ui.figure(vth.singular_values(diag, space), f"th-sv-{run.id}-{space}",
                  "Singular values of the cross-covariance between the two models' activations in this space; a "
                  "steep drop means only a few directions are shared.", filename=f"theseus-sv-{space}")
    with c2:
        ui.figure(vth.update_norms(diag), f"th-norms-{run.id}",
                  "Size of each weight update before (source) and after the map (target). A rotation keeps "
                  "sizes, so points near the diagonal are expected; below it, part of the update was cut off.",
                  filename="theseus-update-norms")
    zeroed = diag.get("zeroed") or []
    if zeroed:
        st.caption("Not transported (set to zero, their spaces cannot be mapped): " + ", ".join(zeroed))
