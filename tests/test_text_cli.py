"""``--data FILE`` end to end on the command line with tiny Llama directories saved here (nothing downloaded):
the report's numbers are recomputed from the written task vector through the Hugging Face module itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.tiny_text import finetune_label_words, llama, perturbed, review_rows, tokenizer_texts, train_tokenizer
from transport.cli import main
from transport.files import read_safetensors

from tests.test_text import write_csv, write_jsonl


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text_cli")
    tok = train_tokenizer(tokenizer_texts())
    pre = llama(len(tok), seed=0)
    out = {"pre": d / "pre", "ft": d / "ft", "target": d / "target", "other": d / "other"}
    ft = finetune_label_words(llama(len(tok), seed=0), tok, review_rows(64, 1000), steps=40, lr=1e-2)
    for name, module in (("pre", pre), ("ft", ft), ("target", perturbed(pre, 0.2, 2))):
        module.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    other = train_tokenizer([t[::-1] for t in tokenizer_texts()])  # the same size, other merges
    assert len(other) == len(tok)
    perturbed(pre, 0.2, 3).save_pretrained(out["other"])
    other.save_pretrained(out["other"])
    out["reviews"] = write_jsonl(d / "reviews.jsonl", review_rows(80, 7))
    out["corpus"] = write_csv(d / "corpus.csv", ["text"], [[r["text"]] for r in review_rows(60, 8)])
    out["tok"] = tok
    return out


def _run(dirs, out: Path, data: Path, method: str = "gradfix", *extra: str, target: str = "target") -> int:
    return main(["run", "--source-pre", str(dirs["pre"]), "--source-ft", str(dirs["ft"]), "--target",
                 str(dirs[target]), "--method", method, "--data", str(data), "--shots", "3", "--alpha-grid", "0:2:5",
                 "--out", str(out), "--no-progress", "--no-cache", *extra])


def _hf_accuracy(target_dir: Path, tau: dict, alpha: float, task) -> tuple[float, float, int]:
    """Label-word accuracy and perplexity on the test split of AutoModelForCausalLM(theta + alpha * tau), and
    how many texts have their two label logits within 1e-4 (a float32 near-tie may go either way)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(target_dir)).float().eval()
    sd = m.state_dict()
    m.load_state_dict({k: sd[k] + alpha * tau[k] if k in tau else sd[k] for k in sd})
    x, y = task.split("test")
    right, nll, count, ties = 0, 0.0, 0, 0
    with torch.no_grad():
        for i in range(len(x)):
            ids = x.ids[i, :int(x.lengths[i])][None]
            logits = m(input_ids=ids).logits[0].double()
            if y is not None:
                right += int(int(logits[-1, task.label_ids].argmax()) == int(y[i]))
                ties += int(float(logits[-1, task.label_ids].sort().values.diff()[-1]) < 1e-4)
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return right / len(x), float(torch.tensor(nll / count).exp()), ties


@pytest.mark.parametrize("kind", ["reviews", "corpus"])
def test_text_run_end_to_end(dirs, tmp_path, kind, capsys):
    from transport.sources import load_model
    from transport.text import load_text_file

    out = tmp_path / "run"
    assert _run(dirs, out, dirs[kind]) == 0
    report = json.loads((out / "report.json").read_text())
    tau, _ = read_safetensors(out / "task_vector.safetensors")
    assert all(k.startswith(("model.", "lm_head.")) for k in tau)  # the target's own Hugging Face names
    assert report["inputs"]["data"] == str(dirs[kind]) and report["alpha_source"] == "validation"
    sweep = report["alpha_sweep"]
    assert sweep["metric"] == ("accuracy" if kind == "reviews" else "loss") and sweep["alphas"] == [0, 0.5, 1, 1.5, 2]
    pick = max if kind == "reviews" else min
    assert report["alpha"] == sweep["best_alpha"] and sweep["best_val"] == pick(sweep["val"])
    assert set(report["perplexities"]) == {"zero_shot_target", "gradfix", "naive", "source_finetuned",
                                          "source_zero_shot"}
    # the same texts, the same ids: the report's numbers come back through the HF module and the written file
    target = load_model(str(dirs["target"]))
    task = load_text_file(dirs[kind], target.tokenizer, target.arch.vocab_size, target.arch.context)
    acc, ppl, ties = _hf_accuracy(dirs["target"], tau, report["alpha"], task)
    assert report["perplexities"]["gradfix"] == pytest.approx(ppl, rel=1e-4)
    if kind == "reviews":
        assert set(report["accuracies"]) == set(report["perplexities"])
        n = len(task.split("test")[0])
        assert abs(report["accuracies"]["gradfix"] - acc) <= ties / n and ties <= 1
    else:
        assert report["accuracies"] == {}
    printed = capsys.readouterr()
    assert f"gradfix              perplexity {report['perplexities']['gradfix']:.4g}" in printed.out
    if kind == "corpus":
        assert "holds texts without labels: perplexity only (alpha chosen on the validation loss)" in printed.err


def test_text_run_errors_are_one_line(dirs, tmp_path, capsys):
    cases = [
        (dict(extra=("--template", "{text} {label}"), data=None, task="rot90"),
         "error: --template is the prompt of a labelled text file: give --data FILE.jsonl or FILE.csv"),
        (dict(extra=("--template", "{text}")),
         "error: --template must end with {label} (the label word the model is scored on), got '{text}'"),
    ]
    for i, (kw, start) in enumerate(cases):
        out = tmp_path / f"o{i}"
        args = ["run", "--source-pre", str(dirs["pre"]), "--source-ft", str(dirs["ft"]), "--target",
                str(dirs[kw.get("target", "target")]), "--method", "gradfix", "--out", str(out), "--no-progress"]
        args += ["--task", kw["task"]] if "task" in kw else ["--data", str(dirs[kw.get("data", "reviews")])]
        rc = main(args + list(kw.get("extra", ())))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(start), err
        assert not out.exists()
    # another tokenizer is no longer a refusal: both tokenizers are known, so rows move by token identity
    out = tmp_path / "other"
    rc = main(["run", "--source-pre", str(dirs["pre"]), "--source-ft", str(dirs["ft"]), "--target", str(dirs["other"]),
               "--method", "naive", "--out", str(out), "--no-progress", "--data", str(dirs["corpus"]), "--alpha", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "note: vocabulary 320 -> 320 rows by token identity:" in err, err
