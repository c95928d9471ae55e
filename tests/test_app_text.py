"""The explorer with the text zoo (Streamlit's AppTest, no browser): its pairs in the sidebar, a text pair's
setup, the build progress of a text zoo still training, and the Prompt page's computation."""
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")


def test_sidebar_offers_text_zoo_pairs(tiny_text_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPORT_ZOO_DIR", str(tmp_path / "no-vision-zoo"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert at.radio(key="setup-mode").options == ["text zoo pair", "custom models"]
    from transport.zoo import text_store

    assert at.radio(key="setup-text-pair").options == [p.title for p in text_store.pairs()]
    assert any("What to expect on the text pair control" in i.value for i in at.info)


def test_build_progress_is_read_from_the_marker(tmp_path, monkeypatch):
    from app import text_zoo
    from transport.zoo.text_build import _marker_progress

    monkeypatch.setenv("TRANSPORT_TEXT_ZOO_DIR", str(tmp_path))
    assert text_zoo.build_status() is None
    (tmp_path / ".zoo-building").write_text("incomplete\n")
    report = _marker_progress(tmp_path, None)
    report(0.25, "building the text (full) zoo: 25/100 steps")
    assert text_zoo.build_status() == (0.25, "building the text (full) zoo: 25/100 steps")
    report(0.255, "not reported: under one percent later")
    assert text_zoo.build_status()[0] == 0.25


def test_prompt_report_compares_versions(tiny_text_zoo):
    from transport.core.symmetry import apply_permutation
    from transport.core.task_vector import TaskVector
    from transport.errors import TransportError
    from transport.prompt import prompt_report
    from transport.sources import load_model
    from transport.zoo import text_store

    A, A_ft, B = (load_model(f"zoo:text/{n}") for n in ("A", "A+codeprose", "B_control"))
    tau = TaskVector.from_models(A.params, A_ft.params, A.arch).tensors
    moved = TaskVector(B.arch, apply_permutation(tau, text_store.true_permutation("B_control"), A.arch))
    versions = {"zero_shot_target": (B, B.params), "true_map": (B, moved.apply_to(B.params, 1.0)),
                "source_finetuned": (A_ft, A_ft.params)}
    ids = A.tokenizer(["Label: code", "Label: prose"], add_special_tokens=False)["input_ids"]
    label_ids = torch.tensor([ids[0][-4], ids[1][-5]])  # " c", " p"
    rep = prompt_report(versions, B.tokenizer, "x = f(y)\nLabel:", "source_finetuned", label_ids, ["code", "prose"],
                        new_tokens=4)
    assert "".join(rep.tokens) == "x = f(y)\nLabel:"
    # the true map is the source's function: no divergence anywhere, same label, same continuation
    assert max(rep.divergence["true_map"]) < 1e-6 and rep.divergence["source_finetuned"] == [0.0] * len(rep.tokens)
    assert rep.labels["true_map"]["code"] == pytest.approx(rep.labels["source_finetuned"]["code"], abs=1e-5)
    assert rep.continuation["true_map"] == rep.continuation["source_finetuned"]
    assert max(rep.divergence["zero_shot_target"]) > 1e-3
    with pytest.raises(TransportError, match="type a prompt first"):
        prompt_report(versions, B.tokenizer, "", "source_finetuned")


def test_transfusion_and_theseus_pages_on_a_text_pair(tiny_text_zoo, tmp_path, monkeypatch):
    """TransFusion draws the query heads inside each matched key/value group (the alignment's own order); the
    Theseus page words its captions for texts and tokens, not images and class tokens."""
    import numpy as np

    from test_app import arr, charts, ok, press, the_run
    from transport.zoo import text_store
    from viz.transfusion import permutation_matrix

    monkeypatch.setenv("TRANSPORT_ZOO_DIR", str(tmp_path / "no-vision-zoo"))
    monkeypatch.setenv("TRANSPORT_APP_DIR", str(tmp_path / "app-out"))
    at = AppTest.from_file(APP, default_timeout=240).run()
    ok(at)
    at.text_input(key="setup-grid").set_value("0:2:5").run()
    at.radio(key="setup-text-pair").set_value("control").run()
    at.switch_page("views/transfusion.py").run()
    ok(at)
    press(at, "tf-run")
    ok(at)
    run = the_run(at, "transfusion")
    arch = run.loaded.target.arch
    assert arch.group_size > 1
    true = text_store.true_permutation("B_control", tiny_text_zoo)
    for layer in range(arch.layers):
        if layer:
            at.slider(key=f"tf-layer-{run.id}").set_value(layer).run()
            ok(at)
        fig = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith(f"Layer {layer}: query heads"))
        z = arr(next(t for t in fig["data"] if t["type"] == "heatmap")["z"]).reshape(arch.heads, arch.heads)
        hp = run.prepared.alignment.perms[f"heads:{layer}"]
        want = permutation_matrix(hp.query_heads().reshape(-1).tolist())
        assert np.array_equal(z, want), (layer, z, want)
        # the control pair's hidden shuffle is recovered: the drawn query heads are the true ones
        assert np.array_equal(z, permutation_matrix(true[f"heads:{layer}"].query_heads().reshape(-1).tolist()))

    at.switch_page("views/theseus.py").run()
    ok(at)
    press(at, "th-run")
    ok(at)
    said = " ".join(c.value for c in at.caption)
    assert "one text's activation at the last token of its prompt" in said
    assert "image" not in said.replace("images; texts on language models", "") and "class token" not in said
    assert "source -> target, same text" in [t.get("name") for f in charts(at) for t in f["data"]]
