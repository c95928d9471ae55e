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
from transport.text import TextTask, load_text_file, parse_template, split_groups
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
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
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


# ----------------------------------------------------------------------------------------------
# evaluation: label-word accuracy and perplexity equal a direct computation with the HF module
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(tok, tmp_path_factory):
    """A random-init tiny Llama saved with its tokenizer, the module itself and the loaded Model."""
    from transport.sources import load_model

    d = tmp_path_factory.mktemp("tiny_llama")
    module = llama(len(tok), seed=5)
    module.save_pretrained(d / "m")
    tok.save_pretrained(d / "m")
    return module, load_model(str(d / "m")), d


def _hf_direct(module, task: TextTask, split: str):
    """Per text, unpadded, through the HF module: argmax over the label tokens at the last position (and the
    gap between its two best label logits), and the summed next-token cross-entropy with its count."""
    x, _ = task.split(split)
    preds, gaps, nll, count = [], [], 0.0, 0
    with torch.no_grad():
        for i in range(len(x)):
            ids = x.ids[i, :int(x.lengths[i])][None]
            logits = module(input_ids=ids).logits[0].double()
            if task.label_ids is not None:
                preds.append(int(logits[-1, task.label_ids].argmax()))
                gaps.append(float(logits[-1, task.label_ids].sort().values.diff()[-1]))
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return preds, gaps, nll, count


@pytest.mark.parametrize("kind", ["labelled", "corpus"])
def test_text_scores_equal_the_hf_module(hf_pair, tok, tmp_path, kind, monkeypatch):
    module, m, _ = hf_pair
    rows = reviews(60, seed=3)
    f = (write_jsonl(tmp_path / "r.jsonl", rows) if kind == "labelled" else
         write_csv(tmp_path / "c.csv", ["text"], [[r["text"]] for r in rows]))
    task = load_text_task(f, m, [])
    assert task.tokenizer_id.startswith("vocab:")
    for split in ("val", "test"):
        sc = text_scores(m, task, split)
        preds, gaps, nll, count = _hf_direct(module, task, split)
        assert sc.tokens == count == int((task.split(split)[0].lengths - 1).sum())
        assert sc.loss == pytest.approx(nll / count, rel=1e-5)
        assert sc.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
        if kind == "labelled":
            # equal predictions (a float32 near-tie of the two label logits may go either way on another CPU)
            assert all(p == q or gap < 1e-4 for p, q, gap in zip(sc.predictions.tolist(), preds, gaps))
            assert sum(gap < 1e-4 for gap in gaps) <= 1
            y = task.split(split)[1]
            right = sum(int(p == t) for p, t in zip(sc.predictions.tolist(), y.tolist()))
            assert accuracy(m, task, split) == right / len(y)
            assert len(set(preds)) == 2  # both labels occur: the comparison could fail
        else:
            assert sc.predictions is None
            with pytest.raises(TransportError, match="texts without labels have no accuracy$"):
                accuracy(m, task, split)
    # scoring a few rows at a time (a small logit budget) gives the same numbers
    whole = text_scores(m, task, "test")
    monkeypatch.setattr("transport.core.evaluate.LOGIT_BUDGET", 1)
    part = text_scores(m, task, "test")
    assert part.tokens == whole.tokens and part.nll == pytest.approx(whole.nll, rel=1e-6)
    assert (part.predictions is None) == (whole.predictions is None)
    if whole.predictions is not None:
        assert torch.equal(part.predictions, whole.predictions)


def test_sweep_picks_by_accuracy_or_by_loss(hf_pair, tmp_path):
    _, m, _ = hf_pair
    rows = reviews(40, seed=4)
    lab = load_text_task(write_jsonl(tmp_path / "r.jsonl", rows), m, [])
    cor = load_text_task(write_csv(tmp_path / "c.csv", ["text"], [[r["text"]] for r in rows]), m, [])
    tau = random_tau(m.arch, 7, scale=0.05)
    tau = type(tau)(m.arch, {k: v.float() for k, v in tau.items()})
    grid = [0.0, 0.5, 1.0]
    s = sweep_alpha(m, tau, cor, grid)
    losses = [text_scores(m, cor, "val", tau.apply_to(m.params, a)).loss for a in grid]
    assert s.metric == "loss" and s.val == losses and s.best_alpha == grid[losses.index(min(losses))]
    s = sweep_alpha(m, tau, lab, grid)
    accs = [accuracy(m, lab, "val", tau.apply_to(m.params, a)) for a in grid]
    assert s.metric == "accuracy" and s.val == accs and s.best_val == max(accs)
    assert s.best_alpha == min((a for a, v in zip(grid, accs) if v == max(accs)), key=abs)


# ----------------------------------------------------------------------------------------------
# GradFix on the next-token loss
# ----------------------------------------------------------------------------------------------
ARCH = decoder(vocab_size=40)


def random_texts(n: int, seed: int, labels: bool) -> TextTask:
    """Random token texts of lengths 4..11 (right-padded), labelled by their last token (below 23: 'yes')."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(6, 40, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    y = torch.tensor([int(s[-1] < 23) for s in seqs])
    b = TextBatch.from_lists(seqs)
    part = {"train": slice(0, n // 2), "val": slice(n // 2, 3 * n // 4), "test": slice(3 * n // 4, n)}
    splits = {k: (b[v].trimmed(), y[v] if labels else None) for k, v in part.items()}
    if labels:
        return TextTask("planted", splits, ["no", "yes"], label_ids=torch.tensor([1, 2]))
    return TextTask("corpus", splits)


def _descent(target, task, shots: int = 4):
    al = prepare(TransportInputs(target, target, task, shots, 0), {"vote": "mean"})
    x, y = task.shots(shots, 0)
    loss_fn, _ = task_loss(target, task)
    tau = random_tau(ARCH, 3, scale=0.05)
    delta = apply(al, tau, 1.0, {"variant": "normal"})
    return al, loss_fn, x, y, tau, delta


@pytest.mark.parametrize("labels", [True, False], ids=["label-word", "every-token"])
def test_gradfix_descends_on_the_lm_loss(labels):
    target = random_decoder(ARCH, 1)
    task = random_texts(48, 0, labels)
    al, loss_fn, x, y, tau, delta = _descent(target, task)
    assert al.n_samples == len(y) == (8 if labels else 4)
    base = mean_loss(loss_fn, target.params, x, y)
    fo = al.diagnostics()["first_order_total"]
    g = al.grad
    masked = -sum(float(((delta[k] != 0).double() * g[k].double().abs() * tau[k].abs()).sum()) for k in g)
    inner = sum(float((g[k].double() * delta[k]).sum()) for k in g)
    assert inner == pytest.approx(masked, rel=1e-10) and fo == pytest.approx(inner, rel=1e-9) and fo < 0
    for a in (1e-2, 1e-3, 1e-4):
        assert mean_loss(loss_fn, delta.apply_to(target.params, a), x, y) < base
    a = 1e-6
    slope = (mean_loss(loss_fn, delta.apply_to(target.params, a), x, y) - base) / a
    assert slope == pytest.approx(fo, rel=1e-3)
    # tau or -tau raises the loss: the descent comes from the mask, not from tau
    assert (mean_loss(loss_fn, tau.apply_to(target.params, 1e-4), x, y) > base
            or mean_loss(loss_fn, (-tau).apply_to(target.params, 1e-4), x, y) > base)


def test_lm_loss_reads_only_real_tokens():
    """A text's loss and gradient are the same alone and padded next to a longer text (any pad id)."""
    p = random_decoder(ARCH, 2).params
    short, long = [7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]
    fn = lm_loss(ARCH)
    alone = TextBatch.from_lists([short])
    for pad in (0, 33):
        both = TextBatch.from_lists([short, long], pad_id=pad)
        assert torch.allclose(fn(p, both, torch.zeros(2))[0], fn(p, alone, torch.zeros(1))[0], rtol=0, atol=1e-12)
        g2, l2 = per_sample_grads(fn, p, both, torch.zeros(2, dtype=torch.long))
        g1, l1 = per_sample_grads(fn, p, alone, torch.zeros(1, dtype=torch.long))
        for k in g1:
            assert torch.allclose(g2[k][0], g1[k][0], rtol=0, atol=1e-12), k
    # the per-text mean over its real next-token predictions
    logits = __import__("transport.core.forward", fromlist=["encode"]).encode(p, ARCH, alone)
    total, n = next_token_nll(logits, alone)
    assert int(n) == 3 and float(fn(p, alone, torch.zeros(1))) == pytest.approx(float(total) / 3, rel=1e-12)
    # label-word loss: -log softmax at the last real token, whatever follows it
    lw = label_word_loss(ARCH, torch.tensor([1, 2]))
    want = -torch.log_softmax(logits[0, 3], -1)[2]
    assert float(lw(p, both, torch.tensor([1, 0]))[0]) == pytest.approx(float(want), rel=1e-12)


def test_one_text_majority_equals_mean():
    target = random_decoder(ARCH, 1)
    task = random_texts(24, 1, labels=True)
    x, y = task.shots(1, 0)
    loss_fn, _ = task_loss(target, task)
    v = collect_votes(loss_fn, target.params, x[:1], y[:1])
    al = GradFixAlignment(ARCH, v.counts, v.grad, v.n)
    assert v.n == 1
    for k in v.counts:
        assert torch.equal(al.sign(k, "majority"), al.sign(k, "mean")), k


def zipf_corpus(n: int, seed: int) -> TextTask:
    """Texts of 6..12 tokens drawn from a Zipf law over ids 6..39 (a plain corpus: half train, a quarter
    each val / test)."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, 35, dtype=F64)
    seqs = [(6 + torch.multinomial(w, int(torch.randint(6, 13, (1,), generator=g)), replacement=True,
                                   generator=g)).tolist() for _ in range(n)]
    b = TextBatch.from_lists(seqs)
    part = {"train": slice(0, n // 2), "val": slice(n // 2, 3 * n // 4), "test": slice(3 * n // 4, n)}
    return TextTask("zipf", {k: (b[v].trimmed(), None) for k, v in part.items()})


def test_planted_case_where_gradfix_helps():
    """tau* = the target fine-tuned on the corpus (40 Adam steps); the source's tau = tau* with 40 % of its
    signs flipped (a task vector partly at odds with the target). GradFix's vote on 4 texts removes mostly
    the flipped entries: its test perplexity beats naive B + alpha tau and a random mask of the same
    keep-rate, each at its own alpha chosen on validation loss."""
    from transport.core.model import Model
    from transport.core.task_vector import TaskVector
    from transport.pipeline import transfer

    B = random_decoder(ARCH, 1)
    task = zipf_corpus(160, 0)
    loss_fn, _ = task_loss(B, task)
    x, _ = task.split("train")
    p = {k: v.clone().requires_grad_(True) for k, v in B.params.items()}
    opt = torch.optim.Adam(p.values(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(p, x, torch.zeros(len(x))).mean().backward()
        opt.step()
    g = torch.Generator().manual_seed(9)
    tau = {k: (p[k] - B.params[k]).detach() for k in p}
    flipped = {k: torch.where(torch.rand(v.shape, generator=g, dtype=F64) < 0.4, -v, v) for k, v in tau.items()}
    ft = Model(ARCH, {k: B.params[k] + flipped[k] for k in p}, "source-ft")
    oracle = Model(ARCH, {k: B.params[k] + tau[k] for k in p}, "oracle")
    grid = [0.0, 1.0, 2.0, 3.0]
    r = transfer(B, ft, B, "gradfix", task, shots=4, alpha_grid=grid, oracle=oracle, use_cache=False)
    assert r.sweep.metric == "loss" and r.accuracies == {}
    ppl = {k: r.perplexities[k] for k in ("gradfix", "zero_shot_target", "naive", "oracle")}
    # the control: a random mask keeping as many entries per tensor, its alpha chosen the same way
    al = prepare(TransportInputs(B, B, task, 4, 0), {})
    rand = apply(al, TaskVector.from_models(B.params, ft.params, ARCH), 1.0, {"variant": "random"})
    ppl["random"] = text_scores(B, task, "test", rand.apply_to(B.params, sweep_alpha(B, rand, task, grid).best_alpha)
                                ).perplexity
    print("planted zipf corpus, test perplexity:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["gradfix"] < 0.8 * ppl["naive"] < 0.8 * ppl["zero_shot_target"]
    assert ppl["gradfix"] < 0.8 * ppl["random"]
    assert ppl["oracle"] < ppl["naive"]


def test_token_id_checks(tok, tmp_path):
    """Texts tokenised for the target are refused by a model with other ids, unless a vocabulary map is given."""
    from transport.core.model import Model

    arch = decoder(vocab_size=len(tok))
    target = random_decoder(arch, 0, "tgt", tokenizer=tok)
    f = write_csv(tmp_path / "r.csv", ["text"], [[r["text"]] for r in reviews(20)])
    task = load_text_task(f, target, [])
    other = train_tokenizer([t[::-1] for t in tokenizer_texts()])
    src = random_decoder(arch, 1, "src", tokenizer=other)
    mine, theirs = task.tokenizer_id, load_text_task(f, src, []).tokenizer_id
    assert mine != theirs
    with pytest.raises(TransportError) as e:
        check_token_ids(task, target, [src])
    assert str(e.value) == (f"src and the target tgt do not share token ids (tokenizers {theirs} and {mine}): the "
                            "texts are tokenised by the target's tokenizer, so every model must read the same ids "
                            "(one tokenizer, or a vocabulary map between the two)")
    check_token_ids(task, target, [src], vocab_map=object())  # a map moves the source's rows: not refused here
    check_token_ids(task, target, [random_decoder(arch, 2, "same", tokenizer=tok), None])
    small = Model(decoder(vocab_size=100), random_decoder(decoder(vocab_size=100), 1).params, "small")
    with pytest.raises(TransportError, match=r"^small and the target tgt do not share token ids \(vocabularies of "
                                             r"100 and 320 tokens\)"):
        check_token_ids(task, target, [small])
    retagged = TextTask(task.name, task.splits, tokenizer_id=theirs)
    with pytest.raises(TransportError) as e:
        check_token_ids(retagged, target, [])
    assert str(e.value) == f"task r was tokenised by {theirs}, not by the target's tokenizer ({mine})"


@pytest.mark.parametrize("labels", [True, False], ids=["label-word", "every-token"])
def test_one_text_at_a_time_votes_equal_the_batched_path(labels):
    """Plain autograd one text at a time (the language-model-scale path) votes as vmap over a micro-batch,
    the tied embedding counted once (one tensor, both roles' gradients summed before its sign is taken)."""
    target = random_decoder(ARCH, 1)
    assert ARCH.tied_embeddings
    task = random_texts(48, 0, labels)
    x, y = task.shots(4, 0)
    loss_fn, _ = task_loss(target, task)
    one = collect_votes(loss_fn, target.params, x, y, micro_batch=1)
    many = collect_votes(loss_fn, target.params, x, y, micro_batch=len(y))
    assert one.micro_batch == 1 and many.micro_batch == len(y) and set(one.counts) == set(target.params)
    for k in many.counts:
        assert torch.equal(one.counts[k], many.counts[k]), k
        torch.testing.assert_close(one.grad[k], many.grad[k], atol=1e-12, rtol=1e-9)
    assert one.mean_loss == pytest.approx(many.mean_loss, rel=1e-12)
    assert int(one.counts["embed.tokens"].abs().max()) <= len(y)
