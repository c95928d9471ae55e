"""Written task vectors load back into the target checkpoint's own class: theta_B + tau, strictly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from transport import sources
from transport.core.forward import encode
from transport.core.stems import preprocess
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.families.open_clip import tiny_arch


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _random_tau(params: dict[str, torch.Tensor], arch, seed: int) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector(arch, {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()})


def _hf_modules():
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel,
                              CLIPVisionModelWithProjection, ViTConfig, ViTForImageClassification, ViTModel)

    vis = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
               patch_size=2)
    text = CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          vocab_size=99, max_position_embeddings=16)
    vit = ViTConfig(**vis, num_labels=3)
    return {
        "CLIPModel": lambda: CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vis, projection_dim=16)),
        "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**vis)),
        "CLIPVisionModelWithProjection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**vis,
                                                                                                projection_dim=12)),
        "ViTModel": lambda: ViTModel(vit, add_pooling_layer=False),
        "ViTForImageClassification": lambda: ViTForImageClassification(vit),
    }


def _features(module: torch.nn.Module, name: str, px: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if name == "CLIPModel":
            out = module.get_image_features(pixel_values=px)
            return out.pooler_output if hasattr(out, "pooler_output") else out
        if name == "CLIPVisionModelWithProjection":
            return module(pixel_values=px).image_embeds
        if name == "CLIPVisionModel":
            return module(pixel_values=px).pooler_output
        body = module.vit if name == "ViTForImageClassification" else module
        return body(pixel_values=px).last_hidden_state[:, 0]


@pytest.mark.parametrize("cls", list(_hf_modules()))
def test_written_task_vector_loads_strictly_into_the_targets_own_class(cls, tmp_path):
    """theta_B + tau from the written file goes into the target's class with strict=True, and that module's
    features equal the functional forward of the target plus tau."""
    ref = _randomize(_hf_modules()[cls](), 1)
    ref.save_pretrained(str(tmp_path / "target"))
    target = sources.load_hf(str(tmp_path / "target"))
    tau = _random_tau(target.params, target.arch, 2)
    path = sources.save_task_vector(tau, tmp_path / "tau.safetensors", target.meta)
    with safe_open(str(path), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
        names = f.metadata()["names"]
    assert cls in names or (cls == "CLIPModel" and "vision_model" in names)
    theta = ref.state_dict()
    unknown = set(written) - set(theta)
    assert not unknown, sorted(unknown)[:3]
    ref.load_state_dict({k: v + written[k] if k in written else v for k, v in theta.items()}, strict=True)
    px = preprocess(target.arch, torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    want = encode(tau.apply_to(target.params, 1.0), target.arch, px)
    assert torch.allclose(_features(ref, cls, px), want, atol=1e-5, rtol=0)
    # and the file reads back to the same canonical tau
    back = sources.load_task_vector(path)
    assert all(torch.equal(back.tensors[k], tau.tensors[k]) for k in tau.tensors)


def test_open_clip_full_model_names_load_into_the_whole_clip_model(tmp_path):
    arch = tiny_arch()
    tau = _random_tau(sources.init_params(arch, 0), arch, 4)
    tower_file = sources.save_task_vector(tau, tmp_path / "tower.safetensors")
    full_file = sources.save_task_vector(tau, tmp_path / "full.safetensors", full_model=True)
    with safe_open(str(tower_file), "pt") as f:
        tower_keys, tower_names = set(f.keys()), f.metadata()["names"]
    with safe_open(str(full_file), "pt") as f:
        full_keys, full_names = set(f.keys()), f.metadata()["names"]
    assert "conv1.weight" in tower_keys and full_keys == {f"visual.{k}" for k in tower_keys}
    assert "model.visual.load_state_dict" in tower_names and "visual.*" in full_names
    for p in (tower_file, full_file):
        back = sources.load_task_vector(p)
        assert all(torch.equal(back.tensors[k], tau.tensors[k]) for k in tau.tensors)


def test_full_model_names_are_refused_where_no_such_naming_exists(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=8, patch_size=2), add_pooling_layer=False).save_pretrained(str(tmp_path / "t"))
    target = sources.load_hf(str(tmp_path / "t"))
    with pytest.raises(TransportError, match=r"^hf_vit: there is no full-model naming"):
        sources.checkpoint_naming(target.arch, target.meta, True)
    assert json.loads(target.arch.to_json())["family"] == "hf_vit"


def test_architecture_mismatch_names_the_fields_that_differ():
    from transport.core.layout import canonical_shapes
    from transport.core.model import Model
    from transport.methods import TransportInputs, check_compatible, get_method

    def params(arch):
        return {k: torch.zeros(s) for k, s in canonical_shapes(arch).items()}

    a = tiny_arch()
    b = a.replace(output_dim=0)
    src = Model(a, params(a), ref="A.safetensors")
    tgt = Model(b, params(b), ref="B.safetensors")
    with pytest.raises(TransportError) as e:
        check_compatible(get_method("transfusion"), TransportInputs(src, tgt, None, 2, 0, "cpu"))
    msg = str(e.value)
    assert f"differ in output_dim {a.output_dim} vs 0 only: the towers match" in msg and "theseus" in msg
    assert "\n" not in msg
    wide = a.replace(width=2 * a.width, output_dim=0)
    with pytest.raises(TransportError, match=rf"differ in width {a.width} vs {2 * a.width}, head_dim 16 vs 32, output_dim "
                                             rf"{a.output_dim} vs 0$"):
        check_compatible(get_method("transfusion"),
                         TransportInputs(src, Model(wide, params(wide), ref="W"), None, 2, 0, "cpu"))
