"""Architecture as data: family adapters are bit-exact, the axis table describes real symmetries."""
from __future__ import annotations

import pytest
import torch

from transport.core.arch import Arch
from transport.core.layout import canonical_shapes, check_params
from transport.core.symmetry import apply_permutation, from_head_index, random_permutation
from transport.families.open_clip import build_open_clip_tower, open_clip_arch, tiny_arch
from transport.sources import from_canonical, to_canonical
from transport.errors import TransportError
from transport.core.forward import encode
from transport.core.stems import preprocess
from transport.sources import family_shapes


def _tiny_tower(arch: Arch, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    tower = build_open_clip_tower(arch).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors; random values make every check meaningful
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tower


def test_open_clip_vit_b16_split_refuse_bit_for_bit():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    sd = clip.visual.state_dict()
    arch = open_clip_arch("ViT-B-16")
    canon = to_canonical(sd, arch)
    d = arch.width
    fused = sd["transformer.resblocks.5.attn.in_proj_weight"]
    assert torch.equal(canon["blocks.5.attn.q.weight"], fused[:d])
    assert torch.equal(canon["blocks.5.attn.k.weight"], fused[d:2 * d])
    assert torch.equal(canon["blocks.5.attn.v.weight"], fused[2 * d:])
    back = from_canonical(canon, arch)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-B-16-quickgelu", "ViT-B-16-plus-240", "ViT-L-14"])
def test_open_clip_configs_match_the_real_module(name):
    """Every family key and shape the adapter expects is exactly what open_clip builds (meta device: no memory)."""
    import open_clip

    arch = open_clip_arch(name)
    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
    real = {k: tuple(v.shape) for k, v in clip.visual.state_dict().items()}
    assert family_shapes(arch) == real
    assert arch.act == ("quick_gelu" if "quickgelu" in name else "gelu")
    if name == "ViT-B-16-plus-240":
        assert (arch.width, arch.image_size, arch.output_dim) == (896, 240, 640)


def test_non_vit_open_clip_configs_are_refused():
    with pytest.raises(TransportError, match="not a plain ViT"):
        open_clip_arch("RN50")
    with pytest.raises(TransportError, match="no model config named 'ViT-Nope'"):
        open_clip_arch("ViT-Nope")


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_encode_equals_open_clip_tower(act):
    arch = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, act=act)
    tower = _tiny_tower(arch, seed=1)
    params = to_canonical(tower.state_dict(), arch)
    x = preprocess(arch, torch.rand(5, 3, 8, 8))
    with torch.no_grad():
        want = tower(x)
    got = encode(params, arch, x)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_tiny_round_trip_hf_families():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from transport.sources import hf_arch_from_config as _arch_from_config

    torch.manual_seed(0)
    ccfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            image_size=8, patch_size=2, projection_dim=16)
    vcfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=8, patch_size=2)
    from pathlib import Path

    for module, cfg in ((CLIPVisionModelWithProjection(ccfg), ccfg), (ViTModel(vcfg, add_pooling_layer=False), vcfg)):
        sd = module.state_dict()
        arch = _arch_from_config(cfg, Path("."), "tiny", set(sd))
        canon = to_canonical(sd, arch)
        back = from_canonical(canon, arch)
        assert set(back) == {k for k in sd if not k.endswith("position_ids")}
        for k, v in back.items():
            assert torch.equal(v, sd[k]), k


def test_axis_table_describes_function_preserving_permutations():
    """Permuting every axis the table labels with a space (whole heads with one within-head order, MLP units, one
    residual permutation for every segment) leaves the function unchanged; a heads index that mixes dims across
    heads does not, and neither does a within-head order that differs between q and k."""
    arch = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16)
    params = to_canonical(_tiny_tower(arch, seed=2).state_dict(), arch)
    perms = random_permutation(arch, seed=0, kinds=("res_shared", "mlp", "heads", "within"))
    x = preprocess(arch, torch.rand(4, 3, 8, 8))
    base = encode(params, arch, x)
    permuted = apply_permutation(params, perms, arch)
    assert any(not torch.equal(permuted[k], params[k]) for k in params)
    assert torch.allclose(encode(permuted, arch, x), base, atol=1e-5, rtol=0)
    # separate q/k and v/o within-head orders are a symmetry too (without rotary positions)
    sep = random_permutation(arch, seed=1, kinds=("res_shared", "mlp", "heads", "within_qk", "within_vo"))
    assert not torch.equal(sep["heads:0"].qk, sep["heads:0"].vo)
    assert torch.allclose(encode(apply_permutation(params, sep, arch), arch, x), base, atol=1e-5, rtol=0)
    # Mixing dimensions across heads breaks the attention pattern: the check above can fail.
    g = torch.Generator().manual_seed(0)
    bad = dict(perms, **{"heads:0": torch.randperm(arch.width, generator=g)})
    assert not torch.allclose(encode(apply_permutation(params, bad, arch), arch, x), base, atol=1e-3)
    with pytest.raises(TransportError, match="mixes dimensions of different heads"):
        from_head_index(bad["heads:0"], arch)


def test_check_params_errors_name_the_tensor():
    arch = tiny_arch(width=16, layers=1, heads=2, image_size=4, patch_size=2, output_dim=8)
    params = {k: torch.zeros(s) for k, s in canonical_shapes(arch).items()}
    check_params(params, arch, "m.safetensors")
    with pytest.raises(TransportError, match=r"m.safetensors: missing tensors for .*: blocks.0.attn.q.weight"):
        check_params({k: v for k, v in params.items() if k != "blocks.0.attn.q.weight"}, arch, "m.safetensors")
    with pytest.raises(TransportError, match=r"unexpected tensors for .*: extra.weight"):
        check_params({**params, "extra.weight": torch.zeros(1)}, arch, "m.safetensors")
    with pytest.raises(TransportError, match=r"shape mismatch for head.proj: got \(16, 9\)"):
        check_params({**params, "head.proj": torch.zeros(16, 9)}, arch, "m.safetensors")
    nan = dict(params)
    nan["blocks.0.mlp.fc1.bias"] = torch.full_like(nan["blocks.0.mlp.fc1.bias"], float("nan"))
    with pytest.raises(TransportError, match=r"tensor blocks.0.mlp.fc1.bias contains NaN or Inf"):
        check_params(nan, arch, "m.safetensors")


def test_arch_json_round_trip_and_validation():
    arch = open_clip_arch("ViT-B-16-quickgelu")
    assert Arch.from_json(arch.to_json()) == arch
    with pytest.raises(TransportError, match="not divisible by 5 heads"):
        tiny_arch(width=32, heads=5)
    with pytest.raises(TransportError, match="malformed architecture description"):
        Arch.from_json("{not json")
