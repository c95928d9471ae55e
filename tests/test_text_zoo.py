"""The text demo zoo (test variant): deterministic files, exact control pair, the phenomenon's ordering,
disjoint task splits, the corpus recorded (not copied), and zoo references through the normal loaders."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from transport.cli import main
from transport.core.forward import encode
from transport.core.symmetry import apply_permutation
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.sources import load_model, parse_arch
from transport.zoo import text_store
from transport.zoo.text_build import VARIANTS, build, load_tasks
from transport.zoo.text_corpus import make_tokenizer, read_stdlib

TIMING = ("seconds", "cpu_seconds", "build_seconds")


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file of a built zoo (the manifest without its timings)."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == "manifest.json":
            m = json.loads(f.read_text())
            for k in TIMING + ("workers",):
                m.pop(k, None)
            for rec in m["models"]:
                for k in TIMING:
                    rec.pop(k, None)
            out[rel] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_build_is_deterministic(tiny_text_zoo, tmp_path):
    again = tmp_path / "again"
    build(again, variant="test", progress=False, workers=1)
    a, b = _digest(tiny_text_zoo), _digest(again)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, differing[:5]
    assert any(k.endswith("A/model.safetensors") for k in a) and any(k.endswith("tokenizer.json") for k in a)


def test_manifest_records_the_corpus_not_its_text(tiny_text_zoo):
    info = text_store.build_info(tiny_text_zoo)
    lib = read_stdlib()
    assert info["corpus"]["stdlib_sha256"] == lib.sha256 and len(lib.sha256) == 64
    assert info["corpus"]["python"] == lib.python and info["corpus"]["stdlib_files"] == len(lib.files)
    # no stored file holds a whole standard-library module (the corpus is read at build time only)
    sample = dict(lib.files)["json/encoder.py"][:2000]
    for f in tiny_text_zoo.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".txt"):
            assert sample not in f.read_text(errors="replace")


def test_control_pair_true_map_is_the_source_function(tiny_text_zoo):
    task_name = text_store.tasks(tiny_text_zoo)[0]
    A, A_ft, B = (load_model(f"zoo:text/{n}") for n in ("A", f"A+{task_name}", "B_control"))
    perm = text_store.true_permutation("B_control", tiny_text_zoo)
    tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
    moved = apply_permutation(tau.tensors, perm, A.arch)
    task = load_tasks(tiny_text_zoo, VARIANTS["test"], B.tokenizer, B.arch.context)[task_name]
    x = task.split("test")[0][:16].trimmed()
    want = encode(A_ft.params, A.arch, x)
    got = encode(TaskVector(B.arch, moved).apply_to(B.params, 1.0), B.arch, x)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)
    naive = encode(tau.apply_to(B.params, 1.0), B.arch, x)
    assert (naive - want).abs().max() > 100 * (got - want).abs().max()  # the unaligned tau is another function
    assert not torch.equal(B.params["blocks.0.attn.k.weight"], A.params["blocks.0.attn.k.weight"])


def test_next_release_naive_is_below_the_oracle(tiny_text_zoo):
    rows = [r for r in text_store.phenomenon_table(tiny_text_zoo) if r["pair"] == "next"]
    assert rows
    gaps = [r["oracle"] - r["naive"] for r in rows]
    assert max(gaps) >= 0.2, rows  # on at least one task the oracle's gain is far out of naive addition's reach
    ctrl = [r for r in text_store.phenomenon_table(tiny_text_zoo) if r["pair"] == "control"]
    for r in ctrl:  # the exact answer: the shuffled tau reproduces A's fine-tune (and the exact oracle)
        assert r["true_map"] == pytest.approx(r["source_finetuned"]) == pytest.approx(r["oracle"])


def test_task_splits_are_disjoint_and_stratified(tiny_text_zoo):
    tok = make_tokenizer()
    tasks = load_tasks(tiny_text_zoo, VARIANTS["test"], tok, VARIANTS["test"].context)
    assert tuple(tasks) == text_store.DEFAULT_TEXT_TASKS == ("codeprose", "brackets", "sorted")
    for name, task in tasks.items():
        seen = {}
        for split in ("train", "val", "test"):
            x, y = task.split(split)
            assert len(x) > 0 and set(y.tolist()) == set(range(len(task.classnames))), (name, split)
            for i in range(len(x)):
                key = tuple(x.ids[i][x.mask[i]].tolist())
                assert key not in seen, f"{name}: a text of {split} is also in {seen.get(key)}"
                seen[key] = split
        assert len(set(task.label_ids.tolist())) == len(task.classnames)


def test_synthetic_task_labels_are_right():
    from transport.zoo.text_corpus import read_stdlib
    from transport.zoo.text_tasks import BRACKET_PAIRS, SORT_LENGTH, is_balanced, is_sorted, task_rows

    lib = read_stdlib()
    rows = task_rows("brackets", lib, 0, 150)
    assert [r["label"] for r in rows].count("yes") == 150 and len({r["text"] for r in rows}) == 300
    for r in rows:  # a near miss: one bracket turned around keeps the length of a balanced string
        assert is_balanced(r["text"]) == (r["label"] == "yes"), r
        assert 2 * BRACKET_PAIRS[0] <= len(r["text"]) <= 2 * BRACKET_PAIRS[1], r
    assert not is_balanced("([)]") and not is_balanced("((") and is_balanced("[{}]()")
    rows = task_rows("sorted", lib, 0, 150)
    assert [r["label"] for r in rows].count("no") == 150 and len({r["text"] for r in rows}) == 300
    for r in rows:
        xs = r["text"].split()
        assert is_sorted(r["text"]) == (r["label"] == "yes") and len(set(xs)) == len(xs), r
        assert SORT_LENGTH[0] <= len(xs) <= SORT_LENGTH[1] and all(len(c) == 1 for c in xs), r
    assert is_sorted("0 9 a z") and not is_sorted("a 0")
    # the tasks are the same on every call (seeded)
    assert task_rows("sorted", lib, 0, 20) == task_rows("sorted", lib, 0, 20) != task_rows("sorted", lib, 1, 20)
    assert len(task_rows("codeprose", lib, 0, 10)) == 20


def test_zoo_references_load_with_tokenizer_and_vocabulary(tiny_text_zoo):
    A = load_model("zoo:text/A@0")
    V = load_model("zoo:text/V_vocab")
    assert A.ref == "zoo:text/A@0" and A.tokenizer is not None and A.arch.name.startswith("zoo:text-llama")
    assert parse_arch("zoo:text/W_grown").width == 2 * A.arch.width
    assert V.arch.vocab_size > A.arch.vocab_size and len(V.tokenizer) == V.arch.vocab_size
    assert A.tokenizer.convert_ids_to_tokens(A.tokenizer(" code")["input_ids"])[0] == "Ġc"
    with pytest.raises(TransportError, match="text zoo has no model 'Z'"):
        load_model("zoo:text/Z")
    with pytest.raises(TransportError, match="no seed 7"):
        load_model("zoo:text/A@7")


def test_cli_runs_on_a_text_zoo_pair(tiny_text_zoo, tmp_path, capsys):
    data = text_store.task_file("codeprose", tiny_text_zoo)
    rc = main(["run", "--source-pre", "zoo:text/A", "--source-ft", "zoo:text/A+codeprose", "--target",
               "zoo:text/B_control", "--oracle", "zoo:text/B_control+codeprose", "--method", "transfusion",
               "--data", str(data), "--alpha", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    acc = rep["accuracies"]
    # TransFusion finds the hidden shuffle of the control pair: at alpha = 1 the source's fine-tune, on the target
    assert acc["transfusion"] == pytest.approx(acc["oracle"])
    assert rep["perplexities"]["transfusion"] == pytest.approx(rep["perplexities"]["oracle"], rel=1e-4)
    assert acc["source_finetuned"] == pytest.approx(acc["oracle"])
