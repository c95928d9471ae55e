"""The Streamlit app, page by page, on the test zoo (streamlit.testing AppTest: no browser).

Every page loads without exception, runs a transfer, reacts to its sliders by re-applying the cached
alignment (checked against an independent computation), and shows bad input as one st.error line.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from app import logic
from transport.data import digits_task
from transport.core.evaluate import accuracy
from transport.methods import get_method
from transport.errors import NotImplementedYet

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
GRID = "0:2:5"  # a 5-point alpha grid keeps every run a few seconds


@pytest.fixture(scope="session")
def zoo_dir(request) -> Path:
    """The session's test zoo (conftest's ``tiny_zoo``); ``TRANSPORT_TEST_ZOO_DIR`` may name a built one."""
    from transport import zoo

    given = os.environ.get("TRANSPORT_TEST_ZOO_DIR")
    if given and zoo.is_built(given):
        return Path(given)
    return Path(request.getfixturevalue("tiny_zoo"))


@pytest.fixture
def app(zoo_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSPORT_ZOO_DIR", str(zoo_dir))
    monkeypatch.setenv("TRANSPORT_APP_DIR", str(tmp_path / "app-out"))
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    assert not at.exception
    at.text_input(key="setup-grid").set_value(GRID)
    at.run()
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def arr(x) -> np.ndarray:
    """A plotly JSON array: a plain list, or the typed-array form {'dtype', 'bdata', 'shape'}."""
    if isinstance(x, dict) and "bdata" in x:
        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
        shape = x.get("shape")
        if shape:
            a = a.reshape([int(v) for v in str(shape).split(",")] if isinstance(shape, str) else shape)
        return a
    return np.asarray(x, dtype=float)


def titles(at: AppTest) -> list[str]:
    return [((f.get("layout") or {}).get("title") or {}).get("text", "") for f in charts(at)]


def metric(at: AppTest, label_start: str) -> str:
    hits = [m.value for m in at.metric if m.label.startswith(label_start)]
    assert hits, f"no metric '{label_start}' in {[m.label for m in at.metric]}"
    return hits[0]


def ok(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def the_run(at: AppTest, method: str) -> logic.Run:
    runs = at.session_state["runs"]
    hits = [r for k, r in runs.items() if k.endswith(":" + method)]
    assert hits, f"no {method} run in the session"
    return hits[-1]


def built(method: str) -> bool:
    try:
        get_method(method)
        return True
    except NotImplementedYet:
        return False


def pick_pair(at: AppTest, key: str, task: str = "rot90") -> None:
    at.radio(key="setup-pair").set_value(key)
    at.selectbox(key="setup-task").set_value(task)
    at.run()


def wait(at: AppTest, timeout: float = 240) -> AppTest:
    """Let this session's background transfer finish, then redraw the page."""
    job = at.session_state["job"] if "job" in at.session_state else None
    if job is not None:
        assert job.join(timeout), "the background transfer did not finish in time"
    return at.run()


def press(at: AppTest, key: str, timeout: float = 240) -> AppTest:
    """Click a Run button and wait for the transfer it starts (runs go to a background thread)."""
    at.button(key=key).click().run()
    return wait(at, timeout)


# ----------------------------------------------------------------------------------------------
def test_transport_page_runs_and_alpha_reapplies(app):
    at = app
    ok(at)
    assert any("Run transport" in i.value for i in at.info)
    pick_pair(at, "next")
    at.selectbox(key="tp-method").set_value("transfusion").run()
    order = at.selectbox(key="tp-transfusion-order")  # options are data: the declared choices, default first
    assert (order.value, list(order.options)) == ("auto", ["auto", "random", "chain"])
    press(at, "tp-run")
    ok(at)
    run = the_run(at, "transfusion")
    d = run.prepared.alignment.diagnostics()
    assert run.prepared.options["order"] == "auto" and d["order_option"] == "auto"
    assert d["order"] == ("chain" if d["match_confidence"]["value"] > d["match_confidence"]["threshold"] else "random")
    acc = run.result.accuracies
    assert metric(at, "transfusion (test)") == f"{100 * acc['transfusion']:.1f}%"
    table = at.dataframe[0].value
    assert list(table["model"]) == ["target zero-shot", "naive (theta_B + alpha tau)", "TransFusion",
                                    "source fine-tuned", "source zero-shot", "oracle (target fine-tuned)"]
    assert run.result.sweep.alphas == [0.0, 0.5, 1.0, 1.5, 2.0]
    prepared = run.prepared

    new_alpha = 0.5 if run.result.alpha != 0.5 else 1.5
    at.select_slider(key=f"tp-alpha-{run.id}").set_value(new_alpha).run()
    ok(at)
    # independent evaluations of theta_B + alpha * pi(tau)
    target, task = run.loaded.target, digits_task("rot90")
    moved = run.result.transported.apply_to(target.params, new_alpha)
    assert metric(at, f"validation accuracy at alpha = {new_alpha:.2f}") == \
        f"{100 * accuracy(target, task, 'val', moved):.1f}%"
    assert not [m for m in at.metric if m.label.startswith("test accuracy at alpha")]  # test only on request
    at.checkbox(key=f"tp-peek-{run.id}").check().run()
    ok(at)
    assert metric(at, f"test accuracy at alpha = {new_alpha:.2f}") == \
        f"{100 * accuracy(target, task, 'test', moved):.1f}%"
    assert the_run(at, "transfusion").prepared is prepared  # re-applied, never re-prepared
    star = [t for f in charts(at) for t in f["data"] if (t.get("marker") or {}).get("symbol") == "star"]
    assert star and star[0]["x"] == [new_alpha]
    labels = {b.label for b in at.get("download_button")}
    assert {"transported tau (.safetensors)", "report (.json)", "accuracies (.csv)", "HTML"} <= labels


def test_method_not_available_notice(app, monkeypatch):
    """A method whose module is not built shows a notice on its pages, never a figure."""
    real = logic.get_method

    def fake(name):
        if name == "theseus":
            raise NotImplementedYet("method 'theseus' is not implemented yet")
        return real(name)

    monkeypatch.setattr(logic, "get_method", fake)
    at = app
    assert "theseus" not in logic.built_methods()
    at.selectbox(key="tp-method").set_value("theseus").run()
    ok(at)
    assert any("not available yet" in i.value for i in at.info)
    assert not charts(at)
    at.switch_page("views/theseus.py").run()
    ok(at)
    assert any("**theseus** is not available yet" in i.value for i in at.info)
    assert not charts(at) and not [b for b in at.button if b.key == "th-run"]
    at.switch_page("views/compare.py").run()
    ok(at)
    assert any("Not available yet: theseus" in i.value for i in at.info)
    assert "theseus" not in at.multiselect(key="cmp-methods").options


def test_transfusion_page_layer_and_head_pair(app):
    if not built("transfusion"):
        pytest.skip("transfusion not built")
    at = app
    pick_pair(at, "next")
    at.switch_page("views/transfusion.py").run()
    ok(at)
    press(at, "tf-run")
    ok(at)
    run = the_run(at, "transfusion")
    diag = run.result.diagnostics
    assert any(t.startswith("Layer 0: head assignment") for t in titles(at))
    at.slider(key=f"tf-layer-{run.id}").set_value(1).run()
    ok(at)
    fig = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("Layer 1: head assignment"))
    marks = next(t for t in fig["data"] if t["type"] == "scatter")
    assert marks["x"] == diag["layers"][1]["head_perm"]
    perm = diag["layers"][1]["head_perm"]
    at.selectbox(key=f"tf-head-{run.id}").set_value(2).run()
    ok(at)
    assert any(t.startswith(f"Within-head permutation: target head 2 <- source head {perm[2]}") for t in titles(at))
    assert any(t == "Distance from identity" for t in titles(at))


def test_gradfix_page_k_variant_and_drill_down(app):
    if not built("gradfix"):
        pytest.skip("gradfix not built")
    at = app
    pick_pair(at, "indep")
    at.switch_page("views/gradfix.py").run()
    ok(at)
    press(at, "gf-run")
    ok(at)
    run = the_run(at, "gradfix")
    assert run.shots == 2
    heat = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("Sign agreement"))
    from viz.gradfix import block_table

    rows, cols, val, _ = block_table(logic.diagnostics(run, variant="normal"))
    assert heat["data"][0]["y"] == rows and heat["data"][0]["x"] == cols
    assert np.allclose(arr(heat["data"][0]["z"]), val, equal_nan=True)

    before = metric(at, "test accuracy, variant normal")
    at.radio(key=f"gf-var-{run.id}").set_value("random").run()
    ok(at)
    _, acc_random = logic.accuracy_at_alpha(run, run.result.alpha, "test", variant="random")
    assert metric(at, "test accuracy, variant random") == f"{100 * acc_random:.1f}%"
    assert before  # the normal variant was shown before the switch

    at.selectbox(key=f"gf-row-{run.id}").set_value("1").run()
    at.selectbox(key=f"gf-col-{run.id}").set_value("fc1").run()
    ok(at)
    assert any(t.startswith("blocks.1.mlp.fc1.weight (") for t in titles(at))

    at.slider(key="gf-k").set_value(1).run()  # a new K re-runs the vote (in the background)
    wait(at)
    ok(at)
    assert the_run(at, "gradfix").shots == 1
    at.slider(key="gf-k").set_value(2).run()  # back to K = 2: the session's earlier run, not a new one
    wait(at)
    ok(at)
    assert the_run(at, "gradfix") is run

    if built("transfusion"):  # mask TransFusion's pi(tau) instead of tau: the same vote, a permuted tau
        at.radio(key="gf-on").set_value("transfusion").run()
        wait(at)
        ok(at)
        comp = the_run(at, "gradfix")
        assert comp is not run and comp.options["on"] == "transfusion" and comp.base.method.name == "transfusion"
        from transport.methods import transfusion

        pi_tau = transfusion.apply(comp.base.alignment, comp.loaded.tau)
        want = get_method("gradfix").apply(comp.prepared.alignment, pi_tau, 1.0, {})
        assert comp.apply(1.0).allclose(want, atol=1e-7)
        assert comp.result.transported.allclose(want, atol=1e-7)
        at.radio(key="gf-on").set_value("tau").run()  # back: the earlier run again
        wait(at)
        ok(at)
        assert the_run(at, "gradfix") is run


def test_theseus_page(app):
    at = app
    if not built("theseus"):
        at.switch_page("views/theseus.py").run()
        ok(at)
        assert any("not available yet" in i.value for i in at.info)
        assert not charts(at)
        return
    pick_pair(at, "wide_grown")
    at.switch_page("views/theseus.py").run()
    press(at, "th-run")
    ok(at)
    run = the_run(at, "theseus")
    pca = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("PCA of activations"))
    space = at.selectbox(key=f"th-space-{run.id}").value
    labels = run.prepared.alignment.pca_sample[space]["labels"]
    n_classes = 1 if labels is None else len(set(labels.tolist()))
    assert n_classes == len(run.loaded.task.classnames)  # a display sample stratified by class: every class
    assert len(pca["data"]) == 2 * (1 + 2 * n_classes)  # per panel: source -> target segments, models x classes
    segs = [t for t in pca["data"] if t.get("mode") == "lines"]
    assert len(segs) == 2 and len(segs[1]["x"]) == 3 * len(labels)  # one segment per display image
    # the space names are explained on the page
    legend = " ".join(m.value for m in at.markdown)
    assert "`res:Lm`: residual stream after block L's MLP" in legend and "`ctx:L`" in legend
    at.radio(key=f"th-dims-{run.id}").set_value(3).run()
    ok(at)
    pca = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("PCA of activations"))
    assert all(t["type"] == "scatter3d" for t in pca["data"])
    # the options name each space and say what it is ("res:1m: residual stream after block 1's MLP ...")
    spaces = [o.split(": ", 1)[0] for o in at.selectbox(key=f"th-space-{run.id}").options]
    assert at.selectbox(key=f"th-space-{run.id}").value == spaces[-1]  # the deepest space first
    at.selectbox(key=f"th-space-{run.id}").set_value(spaces[1]).run()
    ok(at)
    assert f"PCA of activations at {spaces[1]}: target (o) vs source (x)" in titles(at)
    # the right panel draws X_A T from the alignment's own map
    pca = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("PCA of activations"))
    assert all(t["type"] == "scatter3d" for t in pca["data"])


def test_compare_page(app):
    at = app
    pick_pair(at, "control")
    at.switch_page("views/compare.py").run()
    ok(at)
    press(at, "cmp-run")
    assert not at.exception
    table = at.dataframe[0].value
    methods = [m for m in logic.built_methods()]
    for m in methods:  # every built method that fits a same-width pair has a row
        if m == "theseus" or m == "naive":
            continue
        assert any(m.lower() in str(x).lower() for x in table["model"]), m
    cos = next(f for f in charts(at) if f["layout"]["title"]["text"].startswith("Agreement between methods"))
    runs = {k.split(":")[-1] for k in at.session_state["runs"]}
    assert len(cos["data"]) == len(runs) * (len(runs) - 1) // 2


def test_debug_page_range_and_ablation(app):
    at = app
    pick_pair(at, "next")
    at.switch_page("views/debug.py").run()
    ok(at)
    at.selectbox(key="dbg-method").set_value("transfusion" if built("transfusion") else "naive").run()
    press(at, "dbg-run")
    ok(at)
    run = next(iter(at.session_state["runs"].values()))
    L = run.arch.layers
    at.slider(key=f"dbg-range-{run.id}").set_value((0, 0)).run()
    ok(at)
    want = logic.range_accuracy(run, 0, 0, run.result.alpha, True, "val")
    assert metric(at, "layers 0..0 + global") == f"{100 * want:.1f}%"
    abl = next(f for f in charts(at) if f["layout"]["title"]["text"] == "Which layers carry the transfer")
    bars = [t for t in abl["data"] if t["type"] == "bar"]
    assert [t["x"] for t in bars] == [[str(i) for i in range(L)] + ["global"]] * 2
    table = logic.layer_ablation(run, run.result.alpha, "val")
    assert np.allclose(arr(bars[0]["y"]), [100 * v for v in table["only"]])


def _zoo_file(zoo_dir: Path, name: str) -> Path:
    from transport import zoo

    return zoo_dir / next(e["file"] for e in json.loads((zoo_dir / "manifest.json").read_text())["models"]
                          if e["entry"]["name"] == name) if zoo.is_built(zoo_dir) else Path()


def test_error_paths_show_one_line_and_session_survives(app, zoo_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    at = app
    # 1. architecture mismatch: TransFusion across widths is refused before Run, in one line
    pick_pair(at, "wide_grown")
    at.selectbox(key="tp-method").set_value("transfusion" if built("transfusion") else "naive").run()
    assert not at.exception and not at.error
    warn = [w.value for w in at.warning if "cannot run on this setup" in w.value]
    assert warn and "same architecture" in warn[0] and "\n" not in warn[0] and "Traceback" not in warn[0]
    assert at.button(key="tp-run").disabled

    # 2. a wrong file (not a checkpoint) uploaded as the source
    at.radio(key="setup-mode").set_value("custom models").run()
    at.selectbox(key="src-kind").set_value("upload").run()
    at.file_uploader(key="src-upload").upload("notes.safetensors", b"this is not a checkpoint at all", "text/plain")
    at.selectbox(key="ft-kind").set_value("demo zoo").run()
    at.selectbox(key="ft-zoo").set_value("A+rot90@0")
    at.selectbox(key="tgt-kind").set_value("demo zoo").run()
    at.selectbox(key="tgt-zoo").set_value("B_next@0")
    at.run()  # the page loads the inputs to check what applies: the bad file is reported before any Run
    assert not at.exception
    assert at.error and "notes.safetensors" in at.error[0].value and "not a readable" in at.error[0].value

    # 3. NaN weights in an uploaded checkpoint (a zoo file with one tensor poisoned)
    src = _zoo_file(zoo_dir, "A")
    with safe_open(str(src), framework="pt") as f:
        md = f.metadata()
    sd = load_file(str(src))
    k = next(k for k in sd if "conv1" in k or "positional" in k)
    sd[k] = torch.full_like(sd[k], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad), metadata=md)
    at.file_uploader(key="src-upload").clear().upload("nan.safetensors", bad.read_bytes())
    at.run()
    assert not at.exception
    assert at.error and "NaN or Inf" in at.error[0].value

    # 4. an empty ImageFolder directory as the task
    at.selectbox(key="src-kind").set_value("demo zoo").run()
    at.selectbox(key="src-zoo").set_value("A@0")
    at.radio(key="task-kind").set_value("ImageFolder directory").run()
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    at.text_input(key="task-dir").set_value(str(empty)).run()
    assert not at.exception
    assert at.error and "no class sub-folders found" in at.error[0].value

    # 5. a malformed alpha grid
    at.text_input(key="setup-grid").set_value("0 to 2").run()
    assert not at.exception
    assert at.error and "LO:HI:N" in at.error[0].value

    # the same session still works
    at.text_input(key="setup-grid").set_value(GRID)
    at.radio(key="setup-mode").set_value("demo zoo pair").run()
    pick_pair(at, "control")
    at.selectbox(key="tp-method").set_value("naive")
    press(at, "tp-run")
    ok(at)
    assert metric(at, "naive (test)")


def test_sessions_do_not_share_selections(app, zoo_dir):
    a = app
    pick_pair(a, "indep")
    a.selectbox(key="tp-method").set_value("naive")
    press(a, "tp-run")
    ok(a)
    b = AppTest.from_file(APP, default_timeout=240).run()
    ok(b)
    assert b.radio(key="setup-pair").value == "control"  # b's own default, not a's choice
    assert not b.session_state["runs"] if "runs" in b.session_state else True
    assert any("Run transport" in i.value for i in b.info)


def test_missing_zoo_offers_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPORT_ZOO_DIR", str(tmp_path / "no-zoo"))
    monkeypatch.setenv("TRANSPORT_TEXT_ZOO_DIR", str(tmp_path / "no-text-zoo"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any("not built" in w.value for w in at.warning)
    assert any(b.label == "Build the demo zoo" for b in at.button)
    assert at.radio(key="setup-mode").options == ["custom models"]


# ----------------------------------------------------------------------------------------------
# app.logic without Streamlit
# ----------------------------------------------------------------------------------------------
def test_uploads_stay_in_the_app_dir_and_never_overwrite(tmp_path, monkeypatch):
    from transport.errors import TransportError

    monkeypatch.setenv("TRANSPORT_APP_DIR", str(tmp_path / "out"))
    a = logic.save_upload("../../model.safetensors", b"first")
    b = logic.save_upload("model.safetensors", b"second")
    again = logic.save_upload("model.safetensors", b"first")
    assert a == again and a != b
    assert a.name == b.name == "model.safetensors"
    for p in (a, b):
        assert p.resolve().is_relative_to((tmp_path / "out" / "uploads").resolve())
    assert a.read_bytes() == b"first" and b.read_bytes() == b"second"
    with pytest.raises(TransportError, match=r"^x\.pt: the uploaded file is empty$"):
        logic.save_upload("x.pt", b"")


def test_memory_cache_computes_once_under_concurrency():
    import threading

    cache = logic.MemoryCache(max_items=2)
    calls = []

    def make():
        calls.append(1)
        threading.Event().wait(0.05)
        return object()

    out = []
    threads = [threading.Thread(target=lambda: out.append(cache.get_or_make("k", make))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(o is out[0] for o in out)
    cache.get_or_make("a", object)
    cache.get_or_make("b", object)
    assert cache.get("k") is None  # least recently used dropped beyond max_items


def test_model_ref_key_follows_file_content(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"1")
    k1 = logic.ModelRef(str(f)).key()
    os.utime(f, ns=(1, 1))
    f.write_bytes(b"22")
    assert logic.ModelRef(str(f)).key() != k1


def test_gradfix_page_says_when_the_papers_ordering_fails_with_the_measured_share(app):
    if not built("gradfix"):
        pytest.skip("gradfix not built")
    from transport.zoo import ordering
    from transport.zoo.train import fewshot_finetune

    at = app
    pick_pair(at, "indep")
    at.switch_page("views/gradfix.py").run()
    press(at, "gf-run")
    ok(at)
    run = the_run(at, "gradfix")
    # the four rows measured again here, independently of the page
    task, B = run.loaded.task, run.loaded.target
    ft, _ = fewshot_finetune(B, task, run.shots, run.setup.seed)
    oracle_delta = get_method("gradfix").apply(run.prepared.alignment, run.loaded.tau, 1.0,
                                               {"variant": "oracle", "oracle_tau": logic.oracle_tau(run)})
    acc = {"naive": run.result.accuracies["naive"], "GradFix": run.result.accuracies["gradfix"],
           "few-shot FT": ft, "K": run.shots,
           "oracle mask": ordering.tuned_accuracy(B, oracle_delta, task, list(run.result.sweep.alphas))}
    share = logic.oracle_agreement(run)["agreement_total"]
    texts = [m.value for m in at.markdown]
    failed = [t for t in texts if "does not hold" in t]
    if ordering.ordered(acc):
        assert not failed and any(t.startswith("On this pair the paper's ordering holds") for t in texts)
    else:
        assert len(failed) == 1 and f"on only {100 * share:.0f}% of the voted entries" in failed[0]
        a, b = ordering.failures(acc)[0]
        assert f"{ordering.LABELS[b]} {100 * acc[b]:.1f}% is not above {ordering.LABELS[a]} {100 * acc[a]:.1f}%" \
            in failed[0]
