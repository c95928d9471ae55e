"""The command line contract: outputs, exact errors (exit code 2, one line), atomic writes, method options."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transport.methods as methods
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.sources import from_canonical, load_task_vector, save_task_vector, to_canonical
from transport.cli import collect_options, main
from transport.data import DIGIT_NAMES, digits_task, load_image_folder
from transport.core.evaluate import accuracy
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.stems import preprocess
from transport.files import read_safetensors_metadata
from transport.sources import load_model, save_model
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.sources import load_zoo_model

ARCH = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:cli-tiny")
WIDE = tiny_arch(width=64, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:cli-wide")
SHAPES = ["circle", "cross", "square"]
REPO = Path(__file__).resolve().parents[1]


def _params(arch, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    tower = build_open_clip_tower(arch)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return to_canonical(tower.state_dict(), arch)


def _head(classes: list[str], seed: int) -> Classifier:
    g = torch.Generator().manual_seed(seed)
    return Classifier(torch.randn(len(classes), 16, generator=g), normalize=True, logit_scale=10.0,
                      classnames=list(classes))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny open_clip towers saved as checkpoint files: A, A fine-tuned, B (same arch), W (wider), NaN-B;
    the same with a 3-class head for the ImageFolder; and a tiny ImageFolder."""
    from PIL import Image

    d = tmp_path_factory.mktemp("cli_models")
    out: dict[str, Path] = {}
    pre = _params(ARCH, 0)
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    b = _params(ARCH, 2)
    for classes, suffix in ((DIGIT_NAMES, ""), (SHAPES, "3")):
        head = _head(classes, 7)
        for name, params in (("A", pre), ("A_ft", ft), ("B", b)):
            out[name + suffix] = save_model(Model(ARCH, params, ref=name, head=head), d / f"{name}{suffix}.safetensors")
    out["W"] = save_model(Model(WIDE, _params(WIDE, 3), ref="W", head=_head(DIGIT_NAMES, 7)), d / "W.safetensors")
    nan = dict(b)
    nan["blocks.1.mlp.fc2.weight"] = nan["blocks.1.mlp.fc2.weight"].clone()
    nan["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    sd = {k: v.contiguous() for k, v in from_canonical(nan, ARCH).items()}
    save_file(sd, str(d / "B_nan.safetensors"), metadata={"arch": ARCH.to_json()})
    out["B_nan"] = d / "B_nan.safetensors"
    data = (d / "A.safetensors").read_bytes()
    (d / "A_cut.safetensors").write_bytes(data[: len(data) // 2])
    out["A_cut"] = d / "A_cut.safetensors"
    tower = build_open_clip_tower(ARCH)
    tower.load_state_dict(from_canonical(pre, ARCH))
    torch.save(tower, d / "A_module.pt")
    out["A_module"] = d / "A_module.pt"
    # ImageFolder: three classes of 12 noisy 12x12 shapes (resized to the target's 8x8 on load)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:12, :12]
    masks = {"circle": (yy - 5.5) ** 2 + (xx - 5.5) ** 2 < 16, "cross": (abs(yy - 5.5) < 1.5) | (abs(xx - 5.5) < 1.5),
             "square": (abs(yy - 5.5) < 4) & (abs(xx - 5.5) < 4)}
    root = d / "shapes"
    for c in SHAPES:
        (root / c).mkdir(parents=True)
        for i in range(12):
            img = np.clip(masks[c][..., None] * 200 + rng.normal(0, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    out["shapes"] = root
    (d / "empty_data").mkdir()
    out["empty_data"] = d / "empty_data"
    return out


def _run(args: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args] + ["--no-progress"] if args and args[0] == "run" else [str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _base(files, out, **over) -> list:
    args = {"--source-pre": files["A"], "--source-ft": files["A_ft"], "--target": files["B"], "--method": "naive",
            "--out": out}
    args.update(over)
    flat: list = ["run"]
    for k, v in args.items():
        if v is None:
            continue
        flat += [k] if v is True else [k, v]
    return flat


def _family_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_run_naive_on_a_task_writes_tau_and_report(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(_base(files, out, **{"--task": "rot90", "--alpha-grid": "0:1:3"}), capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "task_vector.safetensors"]
    pre, ft, tgt = (load_model(str(files[n])) for n in ("A", "A_ft", "B"))
    tau = TaskVector.from_models(pre.params, ft.params, ARCH)
    tensors, md = _family_tensors(out / "task_vector.safetensors")
    want = from_canonical(tau.tensors, ARCH)  # the target's own (open_clip) names, in_proj re-fused
    assert set(tensors) == set(want) and "transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert all(torch.equal(tensors[k], want[k]) for k in want)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "naive" and report["alpha"] in (0.0, 0.5, 1.0)
    assert report["alpha_sweep"]["alphas"] == [0.0, 0.5, 1.0] and report["alpha_source"] == "validation"
    assert report["inputs"]["target"] == str(files["B"]) and report["inputs"]["task"] == "rot90"
    assert md["method"] == "naive" and md["target"] == str(files["B"]) and md["source_pre"] == str(files["A"])
    assert float(md["alpha"]) == report["alpha"] and json.loads(md["options"]) == {}
    assert md["transport_version"] and json.loads(md["arch"])["width"] == 32
    task = digits_task("rot90")
    theta = tau.apply_to(tgt.params, report["alpha"])
    assert report["accuracies"]["naive"] == accuracy(tgt, task, "test", theta)
    assert report["accuracies"]["source_finetuned"] == accuracy(ft, task, "test")
    assert "wrote" in stdout and "naive" in stdout
    # the file adds onto a standard open_clip tower of the target: same function as theta_B + alpha * tau
    tower = build_open_clip_tower(ARCH).eval()
    target_sd = from_canonical(tgt.params, ARCH)
    tower.load_state_dict({k: v + report["alpha"] * tensors[k] for k, v in target_sd.items()})
    x = preprocess(ARCH, task.split("test")[0][:8])
    with torch.no_grad():
        assert torch.allclose(tower(x), encode(theta, ARCH, x), atol=1e-6)
    # the written file loads back as a TaskVector with its metadata
    back = load_task_vector(out / "task_vector.safetensors")
    assert back.allclose(tau) and back.meta["method"] == "naive"


def test_run_on_an_image_folder_with_fixed_alpha(files, tmp_path, capsys):
    out = tmp_path / "o"
    args = _base(files, out, **{"--source-pre": files["A3"], "--source-ft": files["A_ft3"], "--target": files["B3"],
                                "--data": files["shapes"], "--alpha": "0.5"})
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["alpha"] == 0.5 and report["alpha_sweep"] is None and report["alpha_source"] == "fixed"
    assert report["inputs"]["task"] == "shapes" and report["inputs"]["data"] == str(files["shapes"])
    task = load_image_folder(files["shapes"], image_size=8)
    tgt, pre, ft = (load_model(str(files[n])) for n in ("B3", "A3", "A_ft3"))
    theta = TaskVector.from_models(pre.params, ft.params, ARCH).apply_to(tgt.params, 0.5)
    assert report["accuracies"]["naive"] == accuracy(tgt, task, "test", theta)
    assert _family_tensors(out / "task_vector.safetensors")[1]["alpha"] == "0.5"


def test_task_vector_file_instead_of_source_ft(files, tmp_path, capsys):
    pre, ft = load_model(str(files["A"])), load_model(str(files["A_ft"]))
    tau_file = save_task_vector(TaskVector.from_models(pre.params, ft.params, ARCH), tmp_path / "tau.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(_base(files, a, **{"--alpha": "1"}), capsys)[0] == 0
    assert _run(_base(files, b, **{"--alpha": "1", "--source-ft": None, "--task-vector": tau_file}), capsys)[0] == 0
    ta, _ = _family_tensors(a / "task_vector.safetensors")
    tb, md = _family_tensors(b / "task_vector.safetensors")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-7, rtol=0) for k in ta)
    assert md["source_ft"] == f"task_vector:{tau_file}"


def test_refuses_a_non_empty_out_dir_unless_forced(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old results")
    rc, _, err = _run(_base(files, out), capsys)
    assert rc == 2
    assert err == f"error: {out}: output directory exists and is not empty (use --force to replace it)\n"
    assert (out / "keep.txt").read_text() == "old results"
    # --force replaces only what this tool wrote: a user's directory is refused, byte for byte kept
    rc, _, err = _run(_base(files, out, **{"--force": True}), capsys)
    assert rc == 2 and err == (f"error: {out}: --force replaces only an output directory this tool wrote (with its "
                               "report.json); this one is not (it holds keep.txt)\n")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "old results"
    run = tmp_path / "run"
    assert _run(_base(files, run), capsys)[0] == 0
    assert json.loads((run / "report.json").read_text())["format"] == "transport.run"
    rc, _, err = _run(_base(files, run, **{"--force": True, "--alpha": "0.5"}), capsys)
    assert rc == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["report.json", "task_vector.safetensors"]
    assert json.loads((run / "report.json").read_text())["alpha"] == 0.5
    (run / "notes.md").write_text("my notes")  # a user file inside an earlier run's directory
    rc, _, err = _run(_base(files, run, **{"--force": True}), capsys)
    assert rc == 2 and err == f"error: {run}: --force would delete files this tool did not write: notes.md; move them first\n"
    assert (run / "notes.md").read_text() == "my notes"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(_base(files, empty), capsys)[0] == 0  # an existing empty directory is fine
    (tmp_path / "afile").write_text("x")
    rc, _, err = _run(_base(files, tmp_path / "afile"), capsys)
    assert rc == 2 and "exists and is not a directory" in err


def test_output_is_atomic_when_writing_fails(files, tmp_path, capsys, monkeypatch):
    from transport.errors import TransportError

    out = tmp_path / "out"
    assert _run(_base(files, out), capsys)[0] == 0  # an earlier run's results
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(tau, path, **meta):
        Path(path).write_bytes(b"partial")
        raise TransportError(f"{path}: disk full")

    import transport.sources

    monkeypatch.setattr(transport.sources, "save_task_vector", broken_save)
    new = tmp_path / "new"
    rc, _, err = _run(_base(files, new), capsys)
    assert rc == 2 and "disk full" in err and err.count("\n") == 1
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    rc, _, _ = _run(_base(files, out, **{"--force": True}), capsys)
    assert rc == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before  # old results untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


BAD = {
    "missing file": ({"--source-pre": "{d}/nope.safetensors"}, "{d}/nope.safetensors: file not found"),
    "truncated file": ({"--target": "A_cut"}, "A_cut.safetensors: not a readable safetensors file (truncated"),
    "nan weights": ({"--target": "B_nan"}, "tensor transformer.resblocks.1.mlp.c_proj.weight contains NaN or Inf"),
    "arch mismatch": ({"--target": "W"}, "naive needs source and target of the same architecture"),
    "pickle": ({"--source-pre": "A_module"}, "this file runs code when loaded (GLOBAL open_clip.transformer.VisionTransformer"),
    "unknown method": ({"--method": "magic"}, "unknown method 'magic' (known: naive, transfusion, gradfix, theseus)"),
    "undeclared flag": ({"--vote": "mean"}, "--vote is not an option of method naive (its options: none)"),
    "undeclared option": ({"--option": "foo=1"}, "--option foo: not an option of method naive"),
    "bad grid": ({"--alpha-grid": "0:1"}, "--alpha-grid must be LO:HI:N, got '0:1'"),
    "task and data": ({"--task": "rot90", "--data": "shapes"}, "argument --data: not allowed with argument --task"),
    "alpha twice": ({"--alpha": "1", "--alpha-grid": "0:1:3"}, "argument --alpha-grid: not allowed with argument"),
    "unknown task": ({"--task": "sudoku"}, "unknown task 'sudoku'"),
    "empty data": ({"--data": "empty_data"}, "empty_data: no class sub-folders found"),
    "no head": ({"--data": "shapes"}, "no classification head for 3 classes"),
    "bad device": ({"--device": "tpu"}, "unknown device 'tpu' (use cpu or cuda)"),
    "bad shots": ({"--shots": "0"}, "--shots must be >= 1, got 0"),
    "no ft": ({"--source-ft": None}, "one of the arguments --source-ft --task-vector is required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_exit_2_with_one_line(case, files, tmp_path, capsys):
    over, needle = BAD[case]
    d = files["A"].parent
    resolved = {}
    for k, v in over.items():
        resolved[k] = files[v] if isinstance(v, str) and v in files else (v.format(d=d) if isinstance(v, str) else v)
    out = tmp_path / "out"
    rc, stdout, err = _run(_base(files, out, **resolved), capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle.format(d=d) in err, err
    assert not out.exists()


def test_not_implemented_method_says_so(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods, "METHOD_NAMES", methods.METHOD_NAMES + ("future",))
    rc, _, err = _run(_base(files, tmp_path / "o", **{"--method": "future"}), capsys)
    assert rc == 2 and err == "error: method 'future' is not implemented yet\n"


def test_trust_pickle_loads_a_pickled_module(files, tmp_path, capsys):
    """A pickled whole tower (no metadata) runs with --trust-pickle and --arch naming a file of that architecture."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(_base(files, a, **{"--alpha": "1"}), capsys)[0] == 0
    rc, _, err = _run(_base(files, b, **{"--source-pre": files["A_module"], "--arch": files["A"], "--alpha": "1",
                                         "--trust-pickle": True}), capsys)
    assert rc == 0, err
    ta, tb = _family_tensors(a / "task_vector.safetensors")[0], _family_tensors(b / "task_vector.safetensors")[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_collect_options_types_and_errors():
    import argparse

    declared = {"max_iter": 100, "matching": "weight", "centering": False, "eps": 0.1, "extra": None}
    ns = argparse.Namespace(vote=None, variant=None, max_iter=5, matching=None, calib_batches=None, calib_size=None,
                            option=["centering=yes", "eps=1e-3", "extra=[1, 2]", "matching=activation"])
    assert collect_options(ns, declared, "m") == {"max_iter": 5, "centering": True, "eps": 1e-3, "extra": [1, 2],
                                                  "matching": "activation"}
    from transport.errors import TransportError

    bad = argparse.Namespace(**{**vars(ns), "option": ["max_iter=lots"]})
    with pytest.raises(TransportError, match="--option max_iter=lots: expected a int"):
        collect_options(bad, declared, "m")
    bad = argparse.Namespace(**{**vars(ns), "option": ["novalue"]})
    with pytest.raises(TransportError, match="--option expects KEY=VALUE, got 'novalue'"):
        collect_options(bad, declared, "m")
    bad = argparse.Namespace(**{**vars(ns), "option": [], "calib_size": 8})
    with pytest.raises(TransportError, match="--calib-size is not an option of method m"):
        collect_options(bad, declared, "m")


def test_methods_command_lists_the_registry(capsys):
    rc, out, _ = _run(["methods"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("naive") and "theta_B + alpha * tau" in lines[0]
    for name in methods.METHOD_NAMES:
        assert any(line.startswith(name) for line in lines), name


def test_gradfix_flags_reach_the_method(files, tmp_path, capsys):
    try:
        info = methods.get_method("gradfix")
    except methods.NotImplementedYet:
        pytest.skip("gradfix is not built yet")
    if "vote" not in info.options:
        pytest.skip("gradfix declares no 'vote' option")
    out = tmp_path / "g"
    args = _base(files, out, **{"--source-pre": files["A3"], "--source-ft": files["A_ft3"], "--target": files["B3"],
                                "--data": files["shapes"], "--method": "gradfix", "--vote": "mean", "--alpha": "1",
                                "--shots": "2"})
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gradfix" and report["options"]["vote"] == "mean"
    pre, ft = load_model(str(files["A3"])), load_model(str(files["A_ft3"]))
    tau = from_canonical(TaskVector.from_models(pre.params, ft.params, ARCH).tensors, ARCH)
    delta, md = _family_tensors(out / "task_vector.safetensors")
    assert json.loads(md["options"])["vote"] == "mean"
    # the normal variant keeps or drops entries of tau: every entry is tau's own value or zero
    for k, t in delta.items():
        assert torch.all((t == tau[k]) | (t == 0)), k
    kept = sum(int((t != 0).sum()) for t in delta.values())
    assert 0 < kept < sum(t.numel() for t in delta.values())


def test_subprocess_errors_are_one_line_without_traceback(files, tmp_path):
    """The real entry point: exit code 2 and exactly one stderr line, for a missing file and an arch mismatch."""
    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "transport", "run", "--source-pre", str(files["A"]), "--source-ft",
               str(files["A_ft"]), "--method", "naive", "--out", str(tmp_path / "o"), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)

    p = run("--target", str(tmp_path / "missing.safetensors"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {tmp_path / 'missing.safetensors'}: file not found"]
    p = run("--target", str(files["W"]))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("error: naive needs source and target of the same architecture: ")
    assert "(width 32, 2 layers)" in p.stderr and "(width 64, 2 layers)" in p.stderr
    assert not (tmp_path / "o").exists()


def test_zoo_references_end_to_end(request, tmp_path, capsys):
    try:
        request.getfixturevalue("tiny_zoo")
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_zoo fixture")
    from transport import zoo

    rc, out, err = _run(["zoo", "list"], capsys)
    assert rc == 0, err
    assert "zoo:A@" in out and "zoo:B_control@" in out
    task = zoo.tasks()[0]
    o = tmp_path / "z"
    rc, _, err = _run(["run", "--source-pre", "zoo:A", "--source-ft", f"zoo:A+{task}", "--target", "zoo:B_control",
                       "--method", "naive", "--task", task, "--alpha-grid", "0:1:5", "--out", o], capsys)
    assert rc == 0, err
    report = json.loads((o / "report.json").read_text())
    t = digits_task(task)
    a, a_ft, b = load_zoo_model("A"), load_zoo_model(f"A+{task}"), load_zoo_model("B_control")
    assert report["accuracies"]["source_finetuned"] == accuracy(a_ft, t, "test")
    tau = TaskVector.from_models(a.params, a_ft.params, a.arch)
    assert report["accuracies"]["naive"] == accuracy(b, t, "test", tau.apply_to(b.params, report["alpha"]))
    assert report["inputs"]["source_pre"].startswith("zoo:A@")  # a zoo reference resolves to its seed
    # composition: GradFix's mask on TransFusion's pi(tau); on the control pair pi(tau) is A's tau relabelled
    o2 = tmp_path / "gf-on-tf"
    rc, out, err = _run(["run", "--source-pre", "zoo:A", "--source-ft", f"zoo:A+{task}", "--target", "zoo:B_control",
                         "--method", "gradfix", "--on", "transfusion", "--shots", "2", "--task", task,
                         "--alpha", "1", "--out", o2], capsys)
    assert rc == 0, err
    rep2 = json.loads((o2 / "report.json").read_text())
    assert rep2["options"]["on"] == "transfusion" and "prepare_transfusion" in rep2["timings_s"]
    assert read_safetensors_metadata(o2 / "task_vector.safetensors")["method"] == "gradfix on transfusion"
    rc, _, err = _run(["run", "--source-pre", "zoo:A", "--source-ft", f"zoo:A+{task}", "--target", "zoo:B_control",
                       "--method", "gradfix", "--on", "magic", "--task", task, "--out", tmp_path / "bad"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "error: unknown method 'magic' (known: naive, transfusion, gradfix, theseus)"]


def test_progress_bar_follows_the_pipeline(files, tmp_path, capsys):
    rc = main([str(a) for a in _base(files, tmp_path / "p", **{"--task": "rot90", "--alpha-grid": "0:1:2"})])
    err = capsys.readouterr().err
    assert rc == 0
    # the phases the pipeline reported: prepare, each alpha of the sweep, the test accuracies
    assert "naive: nothing to prepare" in err and "alpha sweep (naive): 2/2" in err and "test accuracy:" in err
    assert err.count("\n") == 0  # the bar clears itself: nothing left between the user and the next line


def test_cross_width_method_writes_the_targets_names_and_shapes(files, tmp_path, capsys):
    try:
        info = methods.get_method("theseus")
    except methods.NotImplementedYet:
        pytest.skip("theseus is not built yet")
    if info.same_arch or "calib_size" not in info.options:
        pytest.skip("theseus does not take cross-width pairs / calib_size")
    out = tmp_path / "t"
    args = _base(files, out, **{"--target": files["W"], "--method": "theseus", "--task": "rot90",
                                "--calib-size": "16", "--alpha-grid": "0:1:2"})
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    tensors, md = _family_tensors(out / "task_vector.safetensors")
    want = {k: tuple(v.shape) for k, v in from_canonical(_params(WIDE, 0), WIDE).items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: want[k] for k in tensors}
    assert tensors["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert json.loads(md["arch"])["width"] == 64 and json.loads(md["source_arch"])["width"] == 32
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["calib_size"] == 16 and report["inputs"]["target_arch"] == WIDE.name
    assert "naive" not in report["accuracies"]  # no naive baseline across widths
    assert load_task_vector(out / "task_vector.safetensors").arch.width == 64


def test_task_vector_file_is_unscaled_and_says_its_alpha(files, tmp_path, capsys):
    """One convention: the file holds the transported tau at alpha = 1; the chosen alpha is metadata and the
    console line says how to use it."""
    from transport.sources import SCALING_NOTE, load_model

    out = tmp_path / "out"
    rc, stdout, err = _run(_base(files, out, **{"--task": "rot90", "--alpha": "0.6"}), capsys)
    assert rc == 0, err
    tensors, md = _family_tensors(out / "task_vector.safetensors")
    assert md["scaling"] == SCALING_NOTE and float(md["alpha"]) == 0.6
    pre, ft = load_model(str(files["A"])), load_model(str(files["A_ft"]))
    want = from_canonical({k: ft.params[k] - pre.params[k] for k in pre.params}, ARCH)
    assert all(torch.allclose(tensors[k], want[k], atol=1e-7, rtol=0) for k in want)  # alpha = 1, not 0.6
    assert "add 0.6 x this file to the target (theta = theta_target + 0.6 * tau)" in stdout


def test_tiny_splits_are_warned_and_tied_alphas_shown(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(_base(files, out, **{"--data": files["shapes"], "--source-pre": files["A3"],
                                                "--source-ft": files["A_ft3"], "--target": files["B3"],
                                                "--alpha-grid": "0:0.002:3"}), capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    lines = [w for w in err.splitlines() if w.startswith("warning: ")]
    assert any("the val split has only" in w and "too few to choose alpha" in w for w in lines), err
    assert any("the test split has only" in w for w in lines)
    assert report["warnings"] and all(w in err for w in report["warnings"])
    sweep = report["alpha_sweep"]
    assert sweep["tied"] == [a for a, v in zip(sweep["alphas"], sweep["val"]) if v == sweep["best_val"]]
    if len(sweep["tied"]) > 1:  # tiny alphas barely move the model: the candidates tie, and the run says so
        assert any("tied at" in w for w in lines) and "alpha candidates tied on validation" in stdout
