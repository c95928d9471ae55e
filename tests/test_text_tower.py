"""The open_clip text tower as a transportable model: ``open_clip:ARCH:TAG#text``, ``--arch open_clip:ARCH#text`` on
files holding a CLIP state dict (any prefix), the task vector in open_clip's own names, and a text fine-tune
moved by TransFusion onto a hidden symmetry of its base computing the same text features."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from transport.core.forward import encode
from transport.core.symmetry import apply_permutation, random_permutation
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.families import open_clip_text
from transport.families.open_clip import build_clip
from transport.pipeline import transfer
from transport.sources import load_model, parse_arch, save_task_vector

torch.set_num_threads(1)

NAME = "transport-test-text"
CFG = {"embed_dim": 16, "quick_gelu": False,
       "vision_cfg": {"image_size": 8, "layers": 1, "width": 32, "patch_size": 2, "head_width": 8},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


@pytest.fixture
def text_config(monkeypatch):
    """A tiny open_clip model config registered for one test (CLIP's own BPE tokenizer, 49408 tokens)."""
    from open_clip import factory

    def register(name: str = NAME, **text) -> str:
        cfg = json.loads(json.dumps(CFG))
        cfg["text_cfg"].update(text)
        monkeypatch.setitem(factory._MODEL_CONFIGS, name, cfg)
        return name

    return register


def _perturbed(clip: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return clip


def test_the_text_reference_is_open_clips_encode_text(text_config):
    name = text_config()
    model = load_model(f"open_clip:{name}:none#text", seed=3)
    clip, _ = build_clip(name, "", seed=3)
    assert model.arch.name == f"open_clip:{name}#text" and model.arch.readout == "eot" and model.arch.causal
    tokens = model.tokenizer(["a photo of a cat", "a diagram"])
    assert tokens.shape == (2, 16) and int(tokens.max()) == 49407  # the end-of-text token has the top id
    with torch.no_grad():
        want = clip.encode_text(tokens)
    assert torch.allclose(encode(model.params, model.arch, tokens), want, atol=1e-5, rtol=1e-5)
    visual = load_model(f"open_clip:{name}:none#visual", seed=3)
    assert visual.arch.stem == "image" and visual.arch == load_model(f"open_clip:{name}:none", seed=3).arch


def test_files_holding_a_clip_state_dict_give_their_text_tower(text_config, tmp_path):
    from open_clip.model import CustomTextCLIP

    name = text_config()
    clip = _perturbed(build_clip(name, "", seed=1)[0], 2)
    want = load_model(f"open_clip:{name}:none#text", seed=1)
    full = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    save_file(full, str(tmp_path / "clip.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "train.pt")
    torch.manual_seed(0)
    custom = CustomTextCLIP(16, CFG["vision_cfg"], CFG["text_cfg"])  # open_clip's other layout: text.*
    text = {k: v for k, v in full.items() if not k.startswith(("visual.", "logit_"))}
    custom.text.load_state_dict(text, strict=False)
    save_file({k: v.contiguous() for k, v in custom.state_dict().items()}, str(tmp_path / "custom.safetensors"))
    tokens = want.tokenizer(["a photo of a dog"])
    with torch.no_grad():
        ref = clip.encode_text(tokens)
    for f in ("clip.safetensors", "train.pt", "custom.safetensors"):
        m = load_model(str(tmp_path / f), arch=f"open_clip:{name}#text")
        assert m.arch == parse_arch(f"open_clip:{name}#text") and m.tokenizer is not None
        assert torch.allclose(encode(m.params, m.arch, tokens), ref, atol=1e-5, rtol=1e-5), f
    with pytest.raises(TransportError, match=r"^'open_clip:ViT-B-32:none#words': unknown tower '#words' \(use "
                                             r"#visual, the default, or #text\)$"):
        load_model("open_clip:ViT-B-32:none#words")


def test_unsupported_text_towers_are_one_line(text_config):
    for i, (opts, what) in enumerate([({"pool_type": "last"}, "pool_type last"), ({"proj_bias": True}, "proj_bias"),
                                      ({"no_causal_mask": True}, "no_causal_mask"),
                                      ({"hf_model_name": "org/bert"}, "hf_model_name")]):
        name = text_config(f"{NAME}-{i}", **opts)
        with pytest.raises(TransportError) as err:
            parse_arch(f"open_clip:{name}#text")
        assert str(err.value) == f"open_clip:{name}#text: the text tower uses options not supported: {what}"


def test_a_text_fine_tune_moves_onto_a_hidden_symmetry_and_keeps_its_features(text_config, tmp_path):
    """Target = the source's text tower under a hidden symmetry; TransFusion recovers it, and the written task
    vector added to the target's CLIP state dict key by key gives the source fine-tune's text features."""
    name = text_config()
    pre = load_model(f"open_clip:{name}:none#text", seed=4)
    arch = pre.arch
    g = torch.Generator().manual_seed(5)
    tau = TaskVector(arch, {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.params.items()})
    ft = pre.with_params(tau.apply_to(pre.params), ref="ft")
    Pi = random_permutation(arch, seed=6, kinds=("res_shared", "mlp", "heads", "within"))
    target = pre.with_params(apply_permutation(pre.params, Pi, arch), ref="target")
    result = transfer(pre, ft, target, "transfusion", evaluate=False, use_cache=False)
    moved = apply_permutation(tau.tensors, Pi, arch)
    assert all(torch.allclose(result.transported[k], moved[k], atol=1e-6) for k in moved)
    out = save_task_vector(result.transported, tmp_path / "task_vector.safetensors")
    written = load_file(str(out))
    clip = build_clip(name, "", seed=0)[0]
    sd = clip.state_dict()
    theta = open_clip_text.FAMILY.from_canonical(target.params, arch)
    assert set(written) == set(theta) and set(theta) <= set(sd)  # open_clip's own names: they add to the CLIP dict
    clip.load_state_dict({**sd, **{k: theta[k] + written[k] for k in theta}}, strict=True)
    tokens = pre.tokenizer(["a photo of a cat", "a sketch of a tree"])
    with torch.no_grad():
        got = clip.encode_text(tokens)
    assert torch.allclose(got, encode(ft.params, arch, tokens), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, encode(pre.params, arch, tokens), atol=1e-3)
