"""Language models in, task vectors out, in the models' own names: Hugging Face decoder directories (single file,
sharded, from the hub cache), single files with --arch, their tokenizers (built here with the tokenizers
package), task_vector.safetensors that a fresh AutoModelForCausalLM loads strictly, and every bad input one line.

Nothing downloads: tiny random-init configs from the transformers config classes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from transport import families, hub, sources
from transport.core.forward import encode
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import LazyWeights, read_weights
from transport.pipeline import transfer
from transport.sources import load_model, parse_arch, save_task_vector

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)

DECODERS = ["hf_llama", "hf_qwen2", "hf_mistral", "hf_gpt2"]
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "transport moves task vectors between models",
             "the quick brown fox jumps over the lazy dog", "models get a new release every few months"]


def bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences (a real tokenizer, built offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def decoder_dir(d: Path, family: str, seed: int = 0, tokenizer=None, vocab: int = 0, shard: str | None = None):
    """A tiny random-init model of ``family`` saved with save_pretrained (and its tokenizer); (dir, module)."""
    fam = families.get(family)
    arch = fam.tiny_arch() if not vocab else fam.tiny_arch().replace(vocab_size=vocab)
    module = fam.build_module(arch, seed)
    module.save_pretrained(str(d), **({"max_shard_size": shard} if shard else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return d, module


def ids(vocab: int, n: int = 2, t: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=x).logits


# ----------------------------------------------------------------------------------------------
# directories, shards, the hub cache
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)
def test_a_save_pretrained_directory_loads_with_its_tokenizer(tmp_path, family):
    tok = bpe_tokenizer()
    d, module = decoder_dir(tmp_path / "m", family, seed=1, tokenizer=tok, vocab=len(tok))
    model = load_model(str(d))
    fam = families.get(family)
    assert model.arch.family == family and model.arch.vocab_size == len(tok)
    assert model.arch.differences(fam.tiny_arch().replace(vocab_size=len(tok))) == []
    want = fam.to_canonical(fam.module_state(module), model.arch)
    assert set(model.params) == set(want) and all(torch.equal(model.params[k], want[k]) for k in want)
    x = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    assert torch.allclose(encode(model.params, model.arch, x), logits(module, x), atol=1e-5, rtol=1e-5)
    assert model.tokenizer is not None and model.tokenizer("a dog ran")["input_ids"] == tok("a dog ran")["input_ids"]


@pytest.mark.parametrize("family", ["hf_qwen2", "hf_gpt2"])
def test_sharded_safetensors_stream_to_the_same_tensors(tmp_path, family):
    one, _ = decoder_dir(tmp_path / "one", family, seed=2)
    many, _ = decoder_dir(tmp_path / "many", family, seed=2, shard="20KB")
    shards = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(shards) > 2 and (many / "model.safetensors.index.json").is_file()
    sd = read_weights(many)
    assert isinstance(sd, LazyWeights)  # nothing read yet: shapes from the headers
    a, b = load_model(str(one)), load_model(str(many))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    (many / shards[1]).unlink()
    with pytest.raises(TransportError) as err:
        load_model(str(many))
    assert str(err.value) == f"{many / 'model.safetensors.index.json'}: names shard {shards[1]}, which is missing"


def test_an_index_that_lists_a_tensor_its_shard_lacks_or_a_bad_tensor_is_one_line(tmp_path):
    d, _ = decoder_dir(tmp_path / "m", "hf_llama", shard="20KB")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    first = sorted(set(data["weight_map"].values()))[0]
    holder = data["weight_map"][key]
    data["weight_map"][key] = first if holder != first else sorted(set(data["weight_map"].values()))[1]
    index.write_text(json.dumps(data))
    with pytest.raises(TransportError, match=rf"^{index}: lists {key} in {data['weight_map'][key]}, which does not "
                                             r"hold it$"):
        load_model(str(d))
    data["weight_map"][key] = holder
    index.write_text(json.dumps(data))
    shard = d / holder
    tensors = load_file(str(shard))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(TransportError, match=rf"^{shard}: tensor {key} contains NaN or Inf values$"):
        load_model(str(d))


def test_hf_id_from_the_local_cache_and_a_one_line_offline_error(tmp_path, monkeypatch):
    tok = bpe_tokenizer()
    d, module = decoder_dir(tmp_path / "m", "hf_qwen2", seed=3, tokenizer=tok, vocab=len(tok))
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked: list[str] = []
    monkeypatch.setattr(hub, "network_reachable", lambda host, port=443, timeout=3.0: asked.append(host) or False)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-qwen2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(d, repo / "snapshots" / commit)
    model = load_model("hf:acme/tiny-qwen2")
    assert asked == [] and model.ref == "hf:acme/tiny-qwen2" and model.tokenizer is not None
    assert all(torch.equal(model.params[k], load_model(str(d)).params[k]) for k in model.params)
    with pytest.raises(TransportError) as err:
        load_model("hf:acme/not-cached")
    assert str(err.value) == ("weights for hf:acme/not-cached are not in the local cache and the network is "
                              "unreachable (huggingface.co); download them once on a connected machine")
    # a single file with --arch hf:ORG/NAME: the cached config and tokenizer
    f = tmp_path / "ft.safetensors"
    shutil.copy(d / "model.safetensors", f)
    single = load_model(str(f), arch="hf:acme/tiny-qwen2")
    assert single.tokenizer is not None and all(torch.equal(single.params[k], model.params[k]) for k in model.params)


# ----------------------------------------------------------------------------------------------
# single files with --arch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["hf_llama", "hf_qwen2", "hf_gpt2"])
def test_single_files_with_arch_a_directory_a_config_or_a_json(tmp_path, family):
    tok = bpe_tokenizer()
    d, module = decoder_dir(tmp_path / "m", family, seed=4, tokenizer=tok, vocab=len(tok))
    ref = load_model(str(d))
    sd = {k: v.clone().contiguous() for k, v in module.state_dict().items()}  # tied: two tensors in a file
    files = {"ft.safetensors": lambda p: save_file(sd, str(p)), "ft.bin": lambda p: torch.save(sd, p)}
    base = families.get(family).base_prefix  # a base model's dict (GPT-2's hub files): no model./transformer.
    files["base.safetensors"] = lambda p: save_file({k[len(base):] if k.startswith(base) else k: v
                                                     for k, v in sd.items() if not k.startswith("lm_head.")
                                                     or not ref.arch.tied_embeddings}, str(p))
    cfg_copy = tmp_path / "cfgs" / "llm-config.json"
    cfg_copy.parent.mkdir()
    shutil.copy(d / "config.json", cfg_copy)
    for name, write in files.items():
        write(tmp_path / name)
        for arch in (str(d), str(d / "config.json"), str(cfg_copy)):
            m = load_model(str(tmp_path / name), arch=arch)
            assert m.arch.differences(ref.arch) == [], (name, arch)
            assert all(torch.equal(m.params[k], ref.params[k]) for k in ref.params), (name, arch)
            has_tok = arch != str(cfg_copy)  # a config file alone: its directory holds no tokenizer
            assert (m.tokenizer is not None) == has_tok, (name, arch)
    with pytest.raises(TransportError, match=r"the file does not say its architecture; pass --arch"):
        load_model(str(tmp_path / "ft.safetensors"))
    assert parse_arch(str(cfg_copy)).differences(ref.arch) == []


# ----------------------------------------------------------------------------------------------
# outputs in the target's own names
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)
def test_the_written_task_vector_loads_strictly_into_a_fresh_model(tmp_path, family):
    pre_dir, pre = decoder_dir(tmp_path / "pre", family, seed=5)
    ft = families.get(family).build_module(load_model(str(pre_dir)).arch, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(str(tmp_path / "ft"))
    tgt_dir, _ = decoder_dir(tmp_path / "tgt", family, seed=7)
    source_pre, source_ft, target = (load_model(str(tmp_path / n)) for n in ("pre", "ft", "tgt"))
    result = transfer(source_pre, source_ft, target, "naive", evaluate=False, use_cache=False)
    out = save_task_vector(result.transported, tmp_path / "out" / "task_vector.safetensors")
    tau = load_file(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(tgt_dir))
    theta = model.state_dict()
    assert set(tau) == set(theta)  # the tied lm_head included
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tgt_dir)))
    fresh.load_state_dict({k: theta[k] + tau[k] for k in theta}, strict=True)
    x = ids(target.arch.vocab_size)
    want = encode(result.transported.apply_to(target.params), target.arch, x)
    assert torch.allclose(logits(fresh.eval(), x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model.eval(), x), want, atol=1e-3)  # tau changed the function


# ----------------------------------------------------------------------------------------------
# bad inputs, one line each
# ----------------------------------------------------------------------------------------------
def _config_dir(d: Path, **cfg) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


LLAMA = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48,
             vocab_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("rope, kind", [({"rope_type": "linear", "factor": 2.0}, "linear"),
                                        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
                                        ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, "yarn"),
                                        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, "llama3")])
def test_rotary_scaling_variants_are_refused(tmp_path, rope, kind):
    d = _config_dir(tmp_path / "m", **LLAMA, rope_scaling=rope)
    with pytest.raises(TransportError) as err:
        parse_arch(str(d))
    assert str(err.value) == f"hf:{d}: rotary scaling '{kind}' is not supported (only the default rotary embedding)"


def test_bad_configs_each_give_one_line(tmp_path):
    cases = [
        (dict(model_type="falcon"), r"model type 'falcon' is not supported \(known: clip, clip_vision_model, gpt2, "
                                    r"llama, mistral, qwen2, vit\)$"),
        (dict(model_type="t5"), r"'t5' is an encoder-decoder model; only decoder-only language models and vision "
                                r"towers are supported \(encoder-decoders are out of scope\)$"),
        ({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         r"partial rotary embeddings \(partial_rotary_factor 0.5\) are not supported"),
        ({**LLAMA, "model_type": "qwen2", "use_sliding_window": True},
         r"sliding-window attention \(use_sliding_window\) is not supported$"),
    ]
    for i, (cfg, pattern) in enumerate(cases):
        d = _config_dir(tmp_path / f"m{i}", **cfg)
        with pytest.raises(TransportError, match=rf"^hf:{d}: " + pattern):
            load_model(str(d))


def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    tok = bpe_tokenizer()
    d, _ = decoder_dir(tmp_path / "m", "hf_llama", tokenizer=tok, vocab=len(tok) - 20)
    with pytest.raises(TransportError) as err:
        load_model(str(d))
    top = max(tok.get_vocab().values())
    assert str(err.value) == (f"{d}: its tokenizer has {len(tok)} tokens with ids up to {top}, but the embedding "
                              f"has {len(tok) - 20} rows (not the tokenizer of this model)")
    decoder_dir(tmp_path / "ok", "hf_llama", tokenizer=tok, vocab=len(tok) + 20)  # padding rows past it are fine
    assert load_model(str(tmp_path / "ok")).tokenizer is not None
