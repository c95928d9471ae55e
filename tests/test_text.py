"""Text tasks: JSONL / CSV loaders (exact error lines), label-word accuracy and perplexity against the
Hugging Face module itself, GradFix on the next-token loss (descent, one sample, padding, a planted case)
and the token-id checks. Tokenizers are trained here (byte-level BPE), models are random-init: nothing
is downloaded."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bench.tiny_text import llama, review_rows, tokenizer_texts, train_tokenizer
from transport.core.evaluate import accuracy, sweep_alpha, text_scores
from transport.core.losses import label_word_loss, lm_loss, mean_loss, next_token_nll, task_loss
from transport.core.stems import TextBatch
from transport.errors import TransportError
from transport.methods import TransportInputs
from transport.methods.gradfix import GradFixAlignment, apply, collect_votes, per_sample_grads, prepare
from transport.pipeline import check_token_ids, load_text_task
from transport.text import DEFAULT_TEMPLATE, TextTask, load_text_file, parse_template, split_groups
from transport.textfile import read_text_file

from tests.planted_decoders import decoder, model as random_decoder, random_tau

F64 = torch.float64


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_texts())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def reviews(n: int = 40, seed: int = 0) -> list[dict]:
    return review_rows(n, seed)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def test_jsonl_and_csv_give_the_same_task(tok, tmp_path):
    rows = reviews(40)
    a = load_text_file(write_jsonl(tmp_path / "r.jsonl", rows), tok, len(tok))
    b = load_text_file(write_csv(tmp_path / "r.csv", ["label", "text"], [[r["label"], r["text"]] for r in rows]),
                       tok, len(tok))
    assert a.classnames == b.classnames == ["negative", "positive"]
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s)[0].ids, b.split(s)[0].ids) and torch.equal(a.split(s)[1], b.split(s)[1])
    # each text is the prompt "{text}\nLabel:" in the tokenizer's own ids; labels score their first token
    want = tok([r["text"] + "\nLabel:" for r in rows])["input_ids"]
    got = sorted(tuple(x.ids[i, :int(x.lengths[i])].tolist()) for x, _ in a.splits.values() for i in range(len(x)))
    assert got == sorted(tuple(w) for w in want)
    first = [tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in a.classnames]
    assert a.label_ids.tolist() == first
    # labels follow the texts into their split
    lab = {r["text"] + "\nLabel:": r["label"] for r in rows}
    for x, y in a.splits.values():
        for i in range(len(x)):
            text = tok.decode(x.ids[i, :int(x.lengths[i])].tolist())
            assert a.classnames[int(y[i])] == lab[text]


def test_splits_are_seeded_stratified_and_disjoint(tok, tmp_path):
    rows = reviews(40)  # 20 per label: 12 / 3 / 5 each
    f = write_jsonl(tmp_path / "r.jsonl", rows)
    t0, t0b, t1 = (load_text_file(f, tok, len(tok), seed=s) for s in (0, 0, 1))
    for s, n in (("train", 12), ("val", 3), ("test", 5)):
        assert torch.bincount(t0.split(s)[1], minlength=2).tolist() == [n, n]
        assert torch.equal(t0.split(s)[0].ids, t0b.split(s)[0].ids)
    assert not torch.equal(t0.split("test")[0].ids, t1.split("test")[0].ids)
    parts = split_groups(torch.tensor([0] * 20 + [1] * 20).numpy(), 0)
    every = parts["train"] + parts["val"] + parts["test"]
    assert sorted(every) == list(range(40))


def test_plain_corpus_and_its_shots(tok, tmp_path):
    f = write_csv(tmp_path / "c.csv", ["text"], [[r["text"]] for r in reviews(20)])
    t = load_text_file(f, tok, len(tok))
    assert not t.labelled and t.classnames == [] and t.label_ids is None and t.template == ""
    assert sum(len(x) for x, _ in t.splits.values()) == 20
    x, y = t.shots(3, seed=0)
    assert len(x) == 3 and y.tolist() == [0, 0, 0]
    assert x.ids.shape[1] == int(x.lengths.max())  # trimmed to the longest drawn text


def test_template_option(tok, tmp_path):
    rows = reviews(20)
    t = load_text_file(write_jsonl(tmp_path / "r.jsonl", rows), tok, len(tok), template="Review: {text}\nIt was {label}")
    assert parse_template("Review: {text}\nIt was {label}") == ("Review: {text}\nIt was", " ")
    x = t.split("train")[0]
    assert tok.decode(x.ids[0, :int(x.lengths[0])].tolist()).startswith("Review: ")
    assert tok.decode(x.ids[0, :int(x.lengths[0])].tolist()).endswith("\nIt was")
    for tmpl, msg in (("{text} {label} {text}", "--template must hold {text} exactly once, got '{text} {label} {text}'"),
                      ("{text}\nLabel:", "--template must end with {label} (the label word the model is scored on), "
                       "got '{text}\\nLabel:'"),
                      ("{label}{text}", "--template must end with {label} (the label word the model is scored on), "
                       "got '{label}{text}'")):
        with pytest.raises(TransportError) as e:
            parse_template(tmpl)
        assert str(e.value) == msg


BAD_FILES = [
    ("e.jsonl", "", "{p}: no rows (expected one JSON object per line with a 'text' field)"),
    ("e.jsonl", '{"text": "a"}\n{"text": "b"\n', "{p}: line 2 is not JSON (Expecting ',' delimiter)"),
    ("e.jsonl", '["a"]\n', "{p}: line 1 is not a JSON object (expected {{\"text\": ...}})"),
    ("e.jsonl", '{"txt": "a", "label": "x"}\n', "{p}: line 1 has no 'text' field (fields: txt, label)"),
    ("e.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n',
     "{p}: line 3 has no label, unlike line 1 (label every row, or none)"),
    ("e.jsonl", '{"text": "  ", "label": "x"}\n', "{p}: line 1 has an empty text"),
    ("e.jsonl", '{"text": 3}\n', "{p}: line 1: the text must be a string, got int"),
    ("e.jsonl", '{"text": "a", "label": [1]}\n', "{p}: line 1: the label must be a string, got list [1]"),
    ("e.jsonl", '{"text": "a", "label": " "}\n', "{p}: line 1 has an empty label"),
    ("e.csv", "", "{p}: empty file (expected a header row with a 'text' column)"),
    ("e.csv", "sentence,label\nhi,x\n", "{p}: no 'text' column (columns: sentence, label)"),
    ("e.csv", "text,label\n", "{p}: no rows below the header"),
    ("e.csv", "text,label\nhi,x\nthere\n", "{p}: row 2 has 1 fields, the header 2"),
    ("e.txt", "hi\n", "{p}: unknown data file type '.txt' (texts: .jsonl or .csv with a 'text' column; images: a "
     "folder)"),
    ("e.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
     "{p}: every row has the label 'x'; label-word scoring needs two or more labels (drop the label column for a "
     "plain text corpus)"),
]


@pytest.mark.parametrize("name,content,msg", BAD_FILES, ids=[m.split(": ")[1][:30] for _, _, m in BAD_FILES])
def test_bad_files_are_one_exact_line(tok, tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(TransportError) as e:
        load_text_file(p, tok, len(tok))
    assert str(e.value) == msg.format(p=p)


def test_unreadable_files(tok, tmp_path):
    cases = [(tmp_path / "missing.jsonl", "{p}: no such file")]
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    cases.append((d, "{p}: is a directory, not a data file"))
    b = tmp_path / "latin.csv"
    b.write_bytes(b"text\ncaf\xe9\n")
    cases.append((b, "{p}: not UTF-8 text (byte 0xe9 at offset 8)"))
    for p, msg in cases:
        with pytest.raises(TransportError) as e:
            load_text_file(p, tok, len(tok))
        assert str(e.value) == msg.format(p=p)
    with pytest.raises(TransportError) as e:
        load_text_file(tmp_path / "missing.jsonl", None, 10)
    assert str(e.value).endswith(": the target model has no tokenizer to read texts with (a model directory needs "
                                 "its tokenizer files, e.g. tokenizer.json)")


def _tokenizer_with(normalizer=None, word_level: bool = False):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if word_level:
        t = Tokenizer(models.WordLevel({"<unk>": 0, "good": 1, "bad": 2, "it": 3, "was": 4, "Label:": 5},
                                       unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    t = Tokenizer(models.BPE())
    t.normalizer = normalizer
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["it was good", "it was bad"], trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t)


def test_bad_labels_are_one_exact_line(tok, tmp_path):
    from tokenizers import normalizers

    p = write_jsonl(tmp_path / "l.jsonl", [{"text": "it was good", "label": "\u2605"},
                                           {"text": "it was bad", "label": "good"}])
    drop = _tokenizer_with(normalizers.Replace("\u2605", ""))  # the star normalises to nothing
    with pytest.raises(TransportError) as e:
        load_text_file(p, drop, len(drop), template="{text}\nLabel:{label}")
    assert str(e.value) == f"{p}: the label '\u2605' tokenises to nothing"
    words = _tokenizer_with(word_level=True)
    q = write_jsonl(tmp_path / "u.jsonl", [{"text": "it was good", "label": "good"},
                                           {"text": "it was bad", "label": "zebra"}])
    with pytest.raises(TransportError) as e:
        load_text_file(q, words, len(words))
    assert str(e.value) == f"{q}: the label 'zebra' starts with the unknown token"
    # two labels whose first token is the same cannot be told apart by label-word scoring
    first = {c: tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in ("qx", "qy")}
    assert first["qx"] == first["qy"]
    r = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "qx"}, {"text": "b", "label": "qy"}])
    with pytest.raises(TransportError) as e:
        load_text_file(r, tok, len(tok))
    t0 = tok.convert_ids_to_tokens(first["qx"])
    assert str(e.value) == (f"{r}: the labels 'qx' and 'qy' start with the same token {t0!r} (id {first['qx']}); "
                            "label-word scoring cannot tell them apart, rename one")


def test_texts_the_model_cannot_read(tok, tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", reviews(10))
    n = len(tok("the movie was great\nLabel:")["input_ids"])
    with pytest.raises(TransportError) as e:
        load_text_file(p, tok, 100)
    assert str(e.value).startswith(f"{p}: line 1: the tokenizer gives id ")
    assert str(e.value).endswith(", outside the model's vocabulary of 100 tokens (tokenizer and model do not fit)")
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "the movie was great " * 20}])
    k = len(tok("the movie was great " * 20)["input_ids"])
    with pytest.raises(TransportError) as e:
        load_text_file(long, tok, len(tok), context=k - 1)
    assert str(e.value) == f"{long}: line 1 has {k} tokens, more than the model's context of {k - 1}"
    one = write_csv(tmp_path / "one.csv", ["text"], [["the"], ["the movie"]])
    assert len(tok("the")["input_ids"]) == 1 and n > 2
    with pytest.raises(TransportError) as e:
        load_text_file(one, tok, len(tok))
    assert str(e.value) == f"{one}: row 1 has 1 token(s); the next-token loss needs 2 or more"


def test_read_text_file_keeps_rows_and_labels(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"text": "a b", "label": 1}, "", {"text": "c", "label": " two "}])
    t = read_text_file(p)
    assert t.texts == ["a b", "c"] and t.labels == ["1", "two"] and t.rows == [1, 3] and t.rowname == "line"
