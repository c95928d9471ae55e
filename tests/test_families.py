"""The contract every registered model family keeps, on a tiny random-init configuration of its real module:

- its name table's shapes are exactly the real module's tensors;
- family names -> canonical -> family names round-trips bit for bit;
- the functional forward on canonical tensors equals the real module;
- a random symmetry of the axis table, written back in the family's names and loaded into the real module,
  keeps the module's function (and really moved the weights).
"""
from __future__ import annotations

import pytest
import torch

from transport import families
from transport.core.forward import encode
from transport.core.symmetry import apply_permutation, random_permutation

FAMILIES = families.names()


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request):
    fam = families.get(request.param)
    arch = fam.tiny_arch()
    module = fam.build_module(arch, seed=0)
    return fam, arch, module


def test_every_family_is_covered():
    assert {"open_clip", "hf_clip", "hf_vit"} <= set(FAMILIES)


def test_name_table_shapes_are_the_real_modules(family_case):
    fam, arch, module = family_case
    real = {k: tuple(v.shape) for k, v in fam.module_state(module).items()}
    assert fam.family_shapes(arch) == real


def test_round_trip_is_bit_exact(family_case):
    fam, arch, module = family_case
    sd = fam.module_state(module)
    canon = fam.to_canonical(sd, arch, "module")
    back = fam.from_canonical(canon, arch)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_functional_forward_equals_the_real_module(family_case):
    fam, arch, module = family_case
    canon = fam.to_canonical(fam.module_state(module), arch, "module")
    x = fam.example_inputs(arch, n=3, seed=1)
    want = fam.module_forward(module, x)
    got = encode(canon, arch, x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_a_random_symmetry_keeps_the_real_modules_function(family_case):
    fam, arch, module = family_case
    canon = fam.to_canonical(fam.module_state(module), arch, "module")
    kinds = ("res_shared", "mlp", "heads", "query", "within_vo") + (("within_qk",) if arch.position != "rope" else ())
    perms = random_permutation(arch, seed=5, kinds=kinds)
    moved = fam.from_canonical(apply_permutation(canon, perms, arch), arch)
    original = fam.module_state(module)
    assert sum(not torch.equal(moved[k], original[k]) for k in original) > len(original) // 2
    x = fam.example_inputs(arch, n=3, seed=2)
    ref = fam.module_forward(module, x)
    permuted = fam.build_module(arch, seed=0)
    permuted.load_state_dict(moved, strict=False)
    assert all(torch.equal(permuted.state_dict()[k], v) for k, v in moved.items())
    out = fam.module_forward(permuted, x)
    if arch.output_dim or arch.readout == "lm":  # projected features / logits are not in a permuted space
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    else:  # features live in the last residual space: they come out permuted like it
        assert torch.allclose(out, ref[:, perms["res:0"]], atol=1e-5, rtol=1e-5)
