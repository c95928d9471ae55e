"""Vocabularies that change between releases: embedding and unembedding rows move by token identity.

A source pair trained with one byte-level BPE, a target with another (more sentences: more merges, other ids
for shared tokens, new tokens): the transported tau's rows follow the tokens, new tokens get zero, the
counts in the report are those of the two tables, and without both tokenizers differing vocabularies are one
error line. Tokenizers are built offline with the tokenizers package.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_lm_sources import SENTENCES, decoder_dir
from transport import families
from transport.core.vocab import describe, map_rows, to_target_vocabulary, vocab_map
from transport.errors import TransportError
from transport.pipeline import transfer
from transport.sources import load_model, save_task_vector

torch.set_num_threads(1)

MORE = ["vocabularies grow between releases of a model", "new tokens arrive with every tokenizer",
        "rows of the embedding follow their tokens"]


def tokenizer(sentences: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_vocab_map_counts_kept_moved_new_dropped_and_padding():
    source = {"a": 0, "b": 1, "c": 2, "d": 3}
    target = {"b": 0, "a": 1, "c": 2, "e": 3, "f": 4}
    m = vocab_map(source, target, source_rows=4, target_rows=6)
    assert m.rows.tolist() == [1, 0, 2, -1, -1, -1]
    assert m.summary() == {"source_rows": 4, "target_rows": 6, "kept": 1, "moved": 2, "new": 2, "dropped": 1,
                           "padding": 1}
    assert describe(m.summary()) == ("vocabulary 4 -> 6 rows by token identity: 1 kept, 2 moved, 2 new (zero in "
                                     "tau), 1 dropped, 1 padding")
    arch = families.get("hf_llama").tiny_arch().replace(vocab_size=4)
    emb = torch.arange(4 * arch.width, dtype=torch.float32).reshape(4, arch.width)
    params = {"embed.tokens": emb, "head.unembed": emb + 100, "blocks.0.ln1.weight": torch.ones(arch.width)}
    out, moved_arch = map_rows(params, arch, m)
    assert moved_arch.vocab_size == 6 and out["blocks.0.ln1.weight"] is params["blocks.0.ln1.weight"]
    for name in ("embed.tokens", "head.unembed"):
        assert torch.equal(out[name][:3], params[name][[1, 0, 2]]) and not out[name][3:].any()
    with pytest.raises(TransportError, match=r"the vocabulary map is for 4 rows, the model has 6$"):
        map_rows(out, moved_arch, m)


@pytest.fixture
def release(tmp_path):
    """(source pre, source ft, target) directories: the target a 'new release' with another tokenizer."""
    def make(family: str):
        ta, tb = tokenizer(SENTENCES, 300), tokenizer(SENTENCES + MORE, 340)
        assert len(tb) > len(ta) and ta.get_vocab() != tb.get_vocab()
        pre_dir, _ = decoder_dir(tmp_path / "pre", family, seed=1, tokenizer=ta, vocab=len(ta))
        arch = load_model(str(pre_dir)).arch
        ft = families.get(family).build_module(arch, seed=1)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(str(tmp_path / "ft"))  # a fine-tune saved without its tokenizer: the base's is used
        tgt_dir, _ = decoder_dir(tmp_path / "tgt", family, seed=3, tokenizer=tb, vocab=len(tb) + 4)  # 4 padding
        return ta, tb, load_model(str(pre_dir)), load_model(str(tmp_path / "ft")), load_model(str(tgt_dir))

    return make


@pytest.mark.parametrize("family", ["hf_llama", "hf_qwen2"])  # untied unembedding, tied embedding
def test_tau_rows_follow_their_tokens_and_new_tokens_get_zero(release, tmp_path, family):
    ta, tb, pre, ft, target = release(family)
    va, vb = ta.get_vocab(), tb.get_vocab()
    shared = sorted(set(va) & set(vb))
    result = transfer(pre, ft, target, "naive", evaluate=False, use_cache=False)
    kept = sum(va[t] == vb[t] for t in shared)
    assert result.diagnostics["vocabulary"] == {
        "source_rows": len(ta), "target_rows": len(tb) + 4, "kept": kept, "moved": len(shared) - kept,
        "new": len(set(vb) - set(va)), "dropped": len(set(va) - set(vb)), "padding": 4}
    assert len(shared) - kept > 0 and len(set(vb) - set(va)) > 0  # the case is not trivial
    tau = result.transported
    names = ["embed.tokens"] + ([] if pre.arch.tied_embeddings else ["head.unembed"])
    src, dst = torch.tensor([va[t] for t in shared]), torch.tensor([vb[t] for t in shared])
    fresh = torch.ones(len(tb) + 4, dtype=torch.bool)
    fresh[dst] = False
    for name in names:
        want = ft.params[name] - pre.params[name]
        assert tau[name].shape[0] == len(tb) + 4
        assert torch.equal(tau[name][dst], want[src]), name
        assert not tau[name][fresh].any(), name  # new tokens and padding rows: zero
    assert all(torch.equal(tau[k], ft.params[k] - pre.params[k]) for k in tau.tensors if k not in names)
    written = load_file(str(save_task_vector(tau, tmp_path / "out" / "task_vector.safetensors")))
    key = "model.embed_tokens.weight"
    assert written[key].shape == (len(tb) + 4, target.arch.width) and torch.equal(written[key], tau["embed.tokens"])
    # the source models themselves in the target's vocabulary (what TransFusion and Theseus compare)
    mapped_pre, _, summary = to_target_vocabulary(pre, ft, target)
    assert summary == result.diagnostics["vocabulary"] and mapped_pre.arch.vocab_size == target.arch.vocab_size
    assert torch.equal(mapped_pre.params["embed.tokens"][dst], pre.params["embed.tokens"][src])
    assert to_target_vocabulary(mapped_pre, _, target)[2] == summary  # mapped once, not twice


def test_without_both_tokenizers_differing_vocabularies_are_one_line(release):
    ta, tb, pre, ft, target = release("hf_llama")
    bare = target.with_params(target.params, ref="tgt")
    bare.tokenizer = None
    with pytest.raises(TransportError) as err:
        transfer(pre, ft, bare, "naive", evaluate=False, use_cache=False)
    assert str(err.value) == (f"{pre.ref} has a vocabulary of {len(ta)} tokens and tgt one of {len(tb) + 4}: "
                              "embedding rows can move by token identity only with both tokenizers (give model "
                              "directories that hold them, or --arch one that does)")
    other = ft.with_params(ft.params, ref="ft2")
    other.tokenizer = tb
    with pytest.raises(TransportError) as err:
        transfer(pre, other, target, "naive", evaluate=False, use_cache=False)
    assert str(err.value) == (f"ft2 and {pre.ref} have different tokenizers; a fine-tune must keep its base "
                              "model's vocabulary")
