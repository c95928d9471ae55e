"""Loading what users have: open_clip names + tags, Hugging Face dirs / ids, every checkpoint form, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from transport import hub, sources
from transport.core import heads
from transport.families import open_clip as openclip
from transport.families.open_clip import build_open_clip_tower, open_clip_arch, tiny_arch
from transport.sources import from_canonical, to_canonical
from transport.data import load_image_folder
from transport.errors import TransportError
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.stems import preprocess
from transport.files import read_checkpoint
from transport.sources import load_model, save_model
from transport.core.model import Model

ARCH = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:test-tiny")


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # some tensors start at zero / one; perturb all so equality checks mean something
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _fake_hub_snapshot(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """The on-disk layout of the Hugging Face hub cache for ``repo_id`` holding ``files``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())
    return snap


@pytest.fixture
def no_network(monkeypatch):
    """The network probe answers 'unreachable' and records the hosts it was asked about."""
    asked: list[str] = []

    def probe(host: str, port: int = 443, timeout: float = 3.0) -> bool:
        asked.append(host)
        return False

    monkeypatch.setattr(hub, "network_reachable", probe)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return asked


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip for url-only tags
    return tmp_path / "hub"


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
TINY_OC = "transport-test-tiny"
TINY_OC_CFG = {"embed_dim": 16, "quick_gelu": False,
               "vision_cfg": {"image_size": 8, "layers": 2, "width": 32, "patch_size": 2, "head_width": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


@pytest.fixture
def tiny_open_clip_config(monkeypatch):
    """Register a tiny open_clip model config (and later tags) for the duration of a test."""
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY_OC, json.loads(json.dumps(TINY_OC_CFG)))
    return TINY_OC


@pytest.fixture(scope="module")
def vit_b32():
    """A full-size random-init open_clip ViT-B-32: its features on 2 images, then the Model built from it."""
    import open_clip

    clip, arch = openclip.create_open_clip("ViT-B-32", "", seed=3)
    tok = open_clip.get_tokenizer("ViT-B-32")
    x = preprocess(arch, torch.rand(2, 3, 224, 224))
    names = ["cat", "dog", "car"]
    with torch.no_grad():
        feats = clip.encode_image(x)
        txt = F.normalize(clip.encode_text(tok([f"a photo of a {c}." for c in names])), dim=-1)
        logits = clip.logit_scale.exp() * F.normalize(feats, dim=-1) @ txt.t()
    one = openclip.zero_shot_head(clip, tok, names, templates=("a photo of a {}.",))
    model = openclip.model_from_open_clip(clip, arch, "open_clip:ViT-B-32:none", tokenizer=tok)
    ours = encode(model.params, model.arch, x)
    return {"x": x, "feats": feats, "ours": ours, "names": names, "logits": logits, "one_template": one,
            "model": model}


def test_open_clip_vit_b32_forward_equals_functional_encode(vit_b32):
    m = vit_b32["model"]
    assert m.arch.act == "gelu" and m.arch.width == 768 and m.arch.patch_size == 32
    assert torch.allclose(vit_b32["ours"], vit_b32["feats"], atol=1e-5, rtol=0)


def test_open_clip_quickgelu_forward_equals_functional_encode():
    """ViT-B-32-quickgelu: the real open_clip tower of that config (QuickGELU inside) equals encode."""
    from open_clip.transformer import QuickGELU

    arch = open_clip_arch("ViT-B-32-quickgelu")
    assert arch.act == "quick_gelu"
    torch.manual_seed(0)
    tower = build_open_clip_tower(arch).eval()
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, QuickGELU)
    x = preprocess(arch, torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        want = tower(x)
    params = to_canonical(tower.state_dict(), arch)
    assert torch.allclose(encode(params, arch, x), want, atol=1e-5, rtol=0)
    # the same weights run with plain GELU give different features: the activation is really used
    import dataclasses

    assert not torch.allclose(encode(params, dataclasses.replace(arch, act="gelu"), x), want, atol=1e-4)


def test_open_clip_random_init_is_seeded(tiny_open_clip_config):
    a = openclip.load_open_clip(f"open_clip:{TINY_OC}:none", seed=0)
    b = openclip.load_open_clip(f"open_clip:{TINY_OC}", seed=0)
    c = openclip.load_open_clip(f"open_clip:{TINY_OC}:none", seed=1)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["blocks.0.attn.q.weight"], c.params["blocks.0.attn.q.weight"])
    assert a.meta["seed"] == "0" and a.meta["pretrained"] == "none"
    state = torch.random.get_rng_state()
    openclip.load_open_clip(f"open_clip:{TINY_OC}:none", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_open_clip_zero_shot_head_matches_clip_logits(vit_b32):
    assert torch.allclose(vit_b32["one_template"](vit_b32["ours"]), vit_b32["logits"], atol=1e-4, rtol=0)


def test_open_clip_zero_shot_uses_the_prompt_ensemble(tiny_open_clip_config):
    import open_clip

    clip, arch = openclip.create_open_clip(TINY_OC, "", seed=0)
    tok = open_clip.get_tokenizer(TINY_OC)
    names = ["cat", "dog", "car"]
    single = [openclip.zero_shot_head(clip, tok, names, templates=(t,)) for t in openclip.PROMPT_TEMPLATES]
    m = openclip.model_from_open_clip(clip, arch, f"open_clip:{TINY_OC}:none", tokenizer=tok)
    ensemble = m.zero_shot(names)
    assert ensemble.weight.shape == (3, 16) and ensemble.normalize and ensemble.classnames == names
    want = F.normalize(sum(h.weight for h in single), dim=-1)  # mean of unit vectors, renormalised
    assert torch.allclose(ensemble.weight, want, atol=1e-6)
    assert not torch.allclose(ensemble.weight, single[0].weight, atol=1e-3)
    assert ensemble.logit_scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    assert m.zero_shot(names) is ensemble and m.classifier(names) is ensemble  # built once per class list


def test_open_clip_unknown_tag_lists_known_ones():
    with pytest.raises(TransportError, match=r"no pretrained tag 'nope' for ViT-B-16 \(known: .*laion2b_s34b_b88k"):
        openclip.load_open_clip("open_clip:ViT-B-16:nope")
    with pytest.raises(TransportError, match="expected open_clip:ARCH:TAG"):
        openclip.load_open_clip("open_clip:")


def test_open_clip_pretrained_offline_fails_fast_with_one_line(no_network, empty_caches):
    with pytest.raises(TransportError) as err:
        openclip.load_open_clip("open_clip:ViT-B-16:laion2b_s34b_b88k")
    msg = str(err.value)
    assert "weights for ViT-B-16:laion2b_s34b_b88k are not in the local cache and the network is unreachable" in msg
    assert "\n" not in msg
    assert no_network == ["huggingface.co"]


def test_open_clip_offline_env_skips_the_probe(empty_caches, monkeypatch):
    def probe(*a, **k):
        raise AssertionError("must not touch the network when HF_HUB_OFFLINE is set")

    monkeypatch.setattr(hub, "network_reachable", probe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TransportError, match="not in the local cache and the network is unreachable"):
        openclip.load_open_clip("open_clip:ViT-B-32:laion2b_s34b_b79k")


def test_real_probe_answers_false_for_an_unresolvable_host():
    assert hub.network_reachable("transport-test.invalid", timeout=1.0) is False


def test_open_clip_pretrained_tag_loads_from_the_cache_without_network(tmp_path, monkeypatch, empty_caches,
                                                                     tiny_open_clip_config):
    """A registered tag whose weights sit in the HF cache loads with no network call, honouring quick_gelu."""
    import open_clip
    from open_clip import pretrained

    name = tiny_open_clip_config
    monkeypatch.setitem(pretrained._PRETRAINED, name, {"mytag": {"hf_hub": "transport-test/tiny-clip/",
                                                                 "quick_gelu": True, "mean": (0.5, 0.5, 0.5),
                                                                 "std": (0.25, 0.25, 0.25)}})
    torch.manual_seed(0)
    clip = _randomize(open_clip.create_model(name, pretrained=None, force_quick_gelu=True), 1)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    _fake_hub_snapshot(empty_caches, "transport-test/tiny-clip", {"open_clip_model.safetensors": weights})

    def probe(*a, **k):
        raise AssertionError("cached weights must load without a network probe")

    monkeypatch.setattr(hub, "network_reachable", probe)
    model = openclip.load_open_clip(f"open_clip:{name}:mytag")
    assert model.arch.act == "quick_gelu" and model.arch.mean == (0.5, 0.5, 0.5) and model.arch.std[0] == 0.25
    want = to_canonical(clip.visual.state_dict(), model.arch)
    assert all(torch.equal(model.params[k], want[k]) for k in want)
    x = preprocess(model.arch, torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        assert torch.allclose(encode(model.params, model.arch, x), clip.encode_image(x), atol=1e-6)
    assert model.zero_shot(["a", "b"]).weight.shape == (2, 16)


# ----------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------
def _clip_tokenizer_files(d: Path) -> int:
    """A byte-level CLIP BPE vocabulary with no merges (tiny but a real tokenizer); returns its size."""
    from open_clip.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("hf_clip")
    n = _clip_tokenizer_files(d)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=n,
                max_position_embeddings=32, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
                  patch_size=2, hidden_act="gelu", layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = _randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), 1)
    model.save_pretrained(str(d))
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    return d, model


def test_hf_clip_dir_forward_zero_shot_and_round_trip(hf_clip_dir, monkeypatch):
    from transformers import AutoTokenizer

    d, ref = hf_clip_dir
    model = sources.load_hf(str(d))
    arch = model.arch
    assert (arch.family, arch.act, arch.norm_eps, arch.output_dim, arch.ln_pre, arch.patch_bias) == \
        ("hf_clip", "gelu", 1e-6, 16, True, False)
    assert sources.hf_arch(str(d)) == arch
    x = preprocess(arch, torch.rand(3, 3, 8, 8))
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=x)
    want = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = encode(model.params, arch, x)
    assert torch.allclose(feats, want, atol=1e-5, rtol=0)
    # canonical -> family names gives back the HF vision tensors bit for bit
    sd = ref.state_dict()
    back = from_canonical(model.params, arch)
    assert set(back) == {k for k in sd if k.startswith("vision_model.") and "position_ids" not in k} | \
        {"visual_projection.weight"}
    assert all(torch.equal(v, sd[k]) for k, v in back.items())
    # zero-shot from the text tower: with one template it is exactly CLIP's own logits
    monkeypatch.setattr(heads, "PROMPT_TEMPLATES", ("a photo of a {}.",))
    names = ["cat", "dog"]
    tok = AutoTokenizer.from_pretrained(str(d))
    enc = tok([f"a photo of a {c}." for c in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=x).logits_per_image
    assert torch.allclose(model.zero_shot(names)(feats), logits, atol=1e-4, rtol=0)


def test_hf_clip_vision_models(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=8, patch_size=2, projection_dim=12)
    x = torch.rand(2, 3, 8, 8)
    for cls, dim in ((CLIPVisionModel, 0), (CLIPVisionModelWithProjection, 12)):
        torch.manual_seed(0)
        ref = _randomize(cls(cfg), 2)
        d = tmp_path / cls.__name__
        ref.save_pretrained(str(d))
        model = sources.load_hf(str(d))
        assert model.arch.output_dim == dim and model.arch.act == "quick_gelu" and model.zero_shot is None
        px = preprocess(model.arch, x)
        with torch.no_grad():
            out = ref(pixel_values=px)
        want = out.image_embeds if dim else out.pooler_output
        assert torch.allclose(encode(model.params, model.arch, px), want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    d = tmp_path_factory.mktemp("hf_vit")
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
                    patch_size=2, num_labels=3, id2label={0: "ant", 1: "bee", 2: "wasp"},
                    label2id={"ant": 0, "bee": 1, "wasp": 2})
    torch.manual_seed(0)
    ref = _randomize(ViTForImageClassification(cfg), 3)
    ref.save_pretrained(str(d))
    return d, ref


def test_hf_vit_classifier_dir(hf_vit_dir):
    d, ref = hf_vit_dir
    model = sources.load_hf(str(d))
    a = model.arch
    assert (a.family, a.ln_pre, a.patch_bias, a.mean, a.std, a.norm_eps) == \
        ("hf_vit", False, True, (0.5,) * 3, (0.5,) * 3, 1e-12)
    assert model.head is not None and model.head.classnames == ["ant", "bee", "wasp"]
    x = preprocess(a, torch.rand(4, 3, 8, 8))
    with torch.no_grad():
        want = ref(pixel_values=x).logits
    assert torch.allclose(model.head(encode(model.params, a, x)), want, atol=1e-5, rtol=0)
    assert model.classifier(["ant", "bee", "wasp"]) is model.head


def _legacy_vit_key(k: str) -> str:
    """transformers < 5 spelling of a ViT tensor name."""
    import re

    for new, old in ((r"layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
                     (r"layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
                     (r"layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
                     (r"layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
                     (r"layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
                     (r"layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
                     (r"layers\.(\d+)\.layernorm_", r"encoder.layer.\1.layernorm_")):
        k, n = re.subn(new, old, k)
        if n:
            break
    return k


def test_hf_vit_legacy_key_names_load_to_the_same_tensors(hf_vit_dir, tmp_path):
    from transformers import ViTConfig, ViTModel

    d, _ = hf_vit_dir
    new = sources.load_hf(str(d))
    sd = read_checkpoint(d / "model.safetensors")[0]
    legacy = {_legacy_vit_key(k[len("vit."):]) if k.startswith("vit.") else k: v for k, v in sd.items()}
    legacy = {("vit." + k if not k.startswith("classifier.") else k): v.contiguous() for k, v in legacy.items()}
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    ld = tmp_path / "legacy"
    ld.mkdir()
    (ld / "config.json").write_text((d / "config.json").read_text())
    save_file(legacy, str(ld / "model.safetensors"))
    old = sources.load_hf(str(ld))
    assert set(old.params) == set(new.params)
    assert all(torch.equal(old.params[k], new.params[k]) for k in new.params)
    assert torch.equal(old.head.weight, new.head.weight)
    # a headless ViTModel with its pooler, in legacy names, loads too (the pooler is not part of the tower)
    vm = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            image_size=8, patch_size=2)).eval()
    vd = tmp_path / "vitmodel"
    vm.save_pretrained(str(vd))
    sd = read_checkpoint(vd / "model.safetensors")[0]
    save_file({_legacy_vit_key(k): v.contiguous() for k, v in sd.items()}, str(vd / "model.safetensors"))
    m = sources.load_hf(str(vd))
    x = preprocess(m.arch, torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        want = vm(pixel_values=x).last_hidden_state[:, 0]
    assert m.head is None and torch.allclose(encode(m.params, m.arch, x), want, atol=1e-5, rtol=0)


def test_hf_preprocessor_config_sets_normalisation(hf_vit_dir, tmp_path):
    d, _ = hf_vit_dir
    c = tmp_path / "withproc"
    c.mkdir()
    for f in ("config.json", "model.safetensors"):
        (c / f).write_bytes((d / f).read_bytes())
    (c / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.4, 0.4],
                                                            "image_std": [0.2, 0.2, 0.2]}))
    assert sources.hf_arch(str(c)).mean == (0.4, 0.4, 0.4) and sources.hf_arch(str(c)).std == (0.2, 0.2, 0.2)


def test_hf_id_from_the_local_cache_and_offline_error(hf_vit_dir, empty_caches, no_network):
    d, _ = hf_vit_dir
    _fake_hub_snapshot(empty_caches, "acme/tiny-vit",
                       {"config.json": d / "config.json", "model.safetensors": d / "model.safetensors"})
    model = load_model("hf:acme/tiny-vit")
    assert model.ref == "hf:acme/tiny-vit" and model.arch.name == "hf:acme/tiny-vit" and no_network == []
    assert all(torch.equal(model.params[k], sources.load_hf(str(d)).params[k]) for k in model.params)
    with pytest.raises(TransportError) as err:
        load_model("hf:acme/not-cached")
    assert str(err.value).startswith("weights for hf:acme/not-cached are not in the local cache and the network "
                                     "is unreachable")
    assert no_network == ["huggingface.co"]


def test_hf_bad_inputs(tmp_path):
    with pytest.raises(TransportError, match="not a Hugging Face model directory"):
        sources.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TransportError, match="model type 'bert' is not supported"):
        sources.load_hf(str(tmp_path))
    with pytest.raises(TransportError, match="expected hf:ORG/NAME"):
        sources.load_hf("hf:just-a-name")


# ----------------------------------------------------------------------------------------------
# checkpoint files
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny open_clip CLIP (visual + text tower) whose visual tower is ARCH."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg={"image_size": 8, "layers": 2, "width": 32, "patch_size": 2, "head_width": 8},
                text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1})
    return _randomize(clip, 4)


class _Wrapper(torch.nn.Module):
    """The shape of a whole-model pickle: the CLIP model held as an attribute ``model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def _forms(clip: torch.nn.Module, d: Path) -> dict[str, Path]:
    vis = {k: v.contiguous() for k, v in clip.visual.state_dict().items()}
    full = {k: v.contiguous() for k, v in clip.state_dict().items()}
    out: dict[str, Path] = {}

    def pt(name: str, obj) -> None:
        out[name] = d / name
        torch.save(obj, out[name])

    out["tower.safetensors"] = d / "tower.safetensors"
    save_file(vis, str(out["tower.safetensors"]))
    out["full_clip.safetensors"] = d / "full_clip.safetensors"
    save_file(full, str(out["full_clip.safetensors"]))
    pt("tower.pt", vis)
    pt("tower.bin", vis)
    pt("wrapped_state_dict.pt", {"state_dict": vis, "epoch": 3})
    pt("wrapped_model_state_dict.pt", {"model_state_dict": vis, "optimizer": {"lr": 0.1}})
    pt("wrapped_model.pt", {"model": vis})
    pt("module_prefix.pt", {f"module.{k}": v for k, v in vis.items()})
    pt("model_prefix.pt", {f"model.{k}": v for k, v in vis.items()})
    pt("clip_model_prefix.pt", {f"clip_model.{k}": v for k, v in vis.items()})
    pt("open_clip_training.pt", {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in full.items()}})
    pt("full_clip_model_prefix.bin", {f"model.{k}": v for k, v in full.items()})
    return out


def test_every_checkpoint_form_loads_to_the_same_tensors(tiny_clip, tmp_path):
    want = to_canonical(tiny_clip.visual.state_dict(), ARCH)
    forms = _forms(tiny_clip, tmp_path)
    for name, path in forms.items():
        m = load_model(str(path), ARCH)
        assert set(m.params) == set(want), name
        assert all(torch.equal(m.params[k], want[k]) for k in want), name
    # pickled whole modules: refused by default (one line saying why), identical tensors when trusted
    torch.save(tiny_clip.visual, tmp_path / "tower_module.pt")
    torch.save(_Wrapper(tiny_clip), tmp_path / "finetuned.pt")
    for name in ("tower_module.pt", "finetuned.pt"):
        with pytest.raises(TransportError) as err:
            load_model(str(tmp_path / name), ARCH)
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / name}: this file runs code when loaded (GLOBAL ")
        assert msg.endswith("; pass --trust-pickle only if you trust it") and "\n" not in msg
        m = load_model(str(tmp_path / name), ARCH, trust_pickle=True)
        assert all(torch.equal(m.params[k], want[k]) for k in want), name


def test_save_model_round_trip_keeps_arch_head_and_classnames(tmp_path):
    tower = _randomize(build_open_clip_tower(ARCH), 5)
    head = Classifier(torch.randn(3, 16), torch.randn(3), classnames=["x", "y", "z"])
    m = Model(ARCH, to_canonical(tower.state_dict(), ARCH), ref="tiny", head=head)
    path = save_model(m, tmp_path / "m.safetensors")
    back = load_model(str(path))  # no --arch: the file says it
    assert back.arch == ARCH and back.head.classnames == ["x", "y", "z"]
    assert torch.equal(back.head.weight, head.weight) and torch.equal(back.head.bias, head.bias)
    assert all(torch.equal(back.params[k], m.params[k]) for k in m.params)


@pytest.fixture
def tower_file(tmp_path):
    sd = {k: v.contiguous() for k, v in _randomize(build_open_clip_tower(ARCH), 6).state_dict().items()}
    return sd, tmp_path


def _expect(path: Path, *needles: str, arch=ARCH, **kw) -> str:
    with pytest.raises(TransportError) as err:
        load_model(str(path), arch, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_bad_checkpoint_files_each_give_their_error(tower_file):
    sd, d = tower_file
    good = d / "good.safetensors"
    save_file(sd, str(good))
    torch.save(sd, d / "good.pt")
    data = good.read_bytes()
    (d / "half.safetensors").write_bytes(data[: len(data) // 2])
    pt = (d / "good.pt").read_bytes()
    (d / "half.pt").write_bytes(pt[: len(pt) // 2])
    (d / "garbage.safetensors").write_bytes(bytes(range(256)) * 8)
    (d / "garbage.bin").write_bytes(b"not a checkpoint at all\n" * 20)
    (d / "empty.pt").write_bytes(b"")

    _expect(d / "missing.safetensors", f"{d / 'missing.safetensors'}: file not found")
    _expect(d / "half.safetensors", f"{d / 'half.safetensors'}: not a readable safetensors file (truncated")
    _expect(d / "half.pt", f"{d / 'half.pt'}: not a readable checkpoint (truncated or damaged)")
    _expect(d / "garbage.safetensors", f"{d / 'garbage.safetensors'}: not a readable safetensors file")
    _expect(d / "garbage.bin", f"{d / 'garbage.bin'}: not a readable checkpoint (truncated, or neither safetensors")
    _expect(d / "empty.pt", f"{d / 'empty.pt'}: file is empty")
    _expect(good, "does not say its architecture; pass --arch", arch=None)

    def variant(name: str, tensors: dict) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / name))
        return d / name

    missing = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.attn.in_proj_weight"}
    _expect(variant("missing.safetensors", missing), "missing keys for zoo:test-tiny",
            "transformer.resblocks.1.attn.in_proj_weight")
    _expect(variant("extra.safetensors", {**sd, "bogus.weight": torch.zeros(2)}), "unexpected keys", "bogus.weight")
    _expect(variant("shape.safetensors", {**sd, "conv1.weight": torch.zeros(32, 3, 4, 4)}),
            "shape mismatch for conv1.weight: got (32, 3, 4, 4)", "needs (32, 3, 2, 2)")
    nan = dict(sd)
    nan["transformer.resblocks.0.mlp.c_fc.weight"] = nan["transformer.resblocks.0.mlp.c_fc.weight"].clone()
    nan["transformer.resblocks.0.mlp.c_fc.weight"][3, 4] = float("nan")
    _expect(variant("nan.safetensors", nan), "tensor transformer.resblocks.0.mlp.c_fc.weight contains NaN or Inf")
    inf = dict(sd, proj=sd["proj"].clone())
    inf["proj"][0, 0] = float("inf")
    _expect(variant("inf.safetensors", inf), "tensor proj contains NaN or Inf")
    # a file for another architecture
    wide = tiny_arch(width=64, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16)
    _expect(good, "shape mismatch", arch=wide)


def test_empty_or_bad_data_dirs(tmp_path):
    with pytest.raises(TransportError, match="no class sub-folders found"):
        load_image_folder(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(TransportError, match="cats: class folder holds no images"):
        load_image_folder(tmp_path)
    with pytest.raises(TransportError, match="not a directory"):
        load_image_folder(tmp_path / "nope")
