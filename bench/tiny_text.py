"""A tiny offline text setup: a byte-level BPE tokenizer, Llama-style decoders and review files.

    python -m bench.tiny_text DIR [--seed S]

writes, with nothing downloaded:

- ``DIR/pre``: a random-init tiny Llama-style decoder (``save_pretrained``) with its tokenizer;
- ``DIR/ft``: ``pre`` fine-tuned on reviews of its own (label-word loss after the default prompt,
  "{text}\\nLabel:" then " positive" / " negative"; none of them is in the data files below);
- ``DIR/target``: another model of the same shapes (``pre`` with seeded noise added: a stand-in for
  another pretraining), the same tokenizer;
- ``DIR/reviews.jsonl`` (``text`` + ``label``) and ``DIR/corpus.csv`` (``text`` only).

The helpers (tokenizer, rows, models) are what the text tests build their inputs with.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path
from typing import Any

import torch

POSITIVE = ("great", "wonderful", "superb", "lovely", "brilliant", "delightful", "moving", "fresh")
NEGATIVE = ("terrible", "awful", "boring", "dull", "horrible", "bad", "clumsy", "tedious")
NOUNS = ("movie", "film", "story", "plot", "cast", "ending", "music", "script")
SHAPES = ("the {n} was {a}", "a {a} {n}", "what a {a} {n}", "I found the {n} {a}", "the {n} felt {a} to me",
          "{A} {n}, {a2} {n2}")


def review_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` short synthetic reviews with a ``label`` (positive / negative, alternating), seeded."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = POSITIVE if label == "positive" else NEGATIVE
        a, a2 = rng.choice(words), rng.choice(words)
        shape = rng.choice(SHAPES)
        text = shape.format(n=rng.choice(NOUNS), a=a, a2=a2, n2=rng.choice(NOUNS), A=a.capitalize())
        rows.append({"text": text, "label": label})
    return rows


def train_tokenizer(texts: list[str], vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (every byte is a token, so any text encodes), wrapped
    as a ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` (id 0) as its padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def tokenizer_texts() -> list[str]:
    """What the example tokenizer is trained on: every word of the reviews and the prompt."""
    words = [*POSITIVE, *NEGATIVE, *NOUNS, "the was a what I found felt to me", "Label: positive", "Label: negative"]
    return [" ".join(words)] * 4 + [r["text"] for r in review_rows(200, 99)]


def llama(vocab_size: int, seed: int, width: int = 32) -> torch.nn.Module:
    """A random-init tiny ``LlamaForCausalLM`` (2 layers, 4 query / 2 key-value heads, untied embeddings)."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=2 * width, vocab_size=vocab_size,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).float().eval()


def finetune_label_words(module: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], steps: int = 150,
                         lr: float = 3e-3) -> torch.nn.Module:
    """Full-batch Adam on -log p(label word | "{text}\\nLabel:") through the module itself (the HF forward)."""
    prompts = [r["text"] + "\nLabel:" for r in rows]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    last = enc["attention_mask"].sum(1) - 1
    target = torch.tensor([tokenizer(" " + r["label"], add_special_tokens=False)["input_ids"][0] for r in rows])
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[torch.arange(len(rows)), last], target)
        loss.backward()
        opt.step()
    return module.eval()


def perturbed(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy with Gaussian noise of ``scale`` x each tensor's standard deviation added (seeded)."""
    import copy

    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(scale * (std or 0.02) * torch.randn(p.shape, generator=g))
    return out


def write_example(out: Path, seed: int = 0) -> dict[str, Path]:
    """Writes the models, tokenizer and data files of the module docstring; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tokenizer_texts())
    pre = llama(len(tok), seed)
    paths = {"pre": out / "pre", "ft": out / "ft", "target": out / "target",
             "reviews": out / "reviews.jsonl", "corpus": out / "corpus.csv"}
    for name, module in (("pre", pre), ("target", perturbed(pre, 0.3, seed + 1))):
        module.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    ft = finetune_label_words(llama(len(tok), seed), tok, review_rows(64, seed + 1000))
    ft.save_pretrained(paths["ft"])
    tok.save_pretrained(paths["ft"])
    with open(paths["reviews"], "w") as f:
        for r in review_rows(120, seed + 2000):
            f.write(json.dumps(r) + "\n")
    with open(paths["corpus"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for r in review_rows(120, seed + 3000):
            w.writerow([r["text"]])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name, p in write_example(Path(args.dir), args.seed).items():
        print(f"{name:<8} {p}")


if __name__ == "__main__":
    main()
