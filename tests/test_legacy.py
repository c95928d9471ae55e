"""Files written by the release before the model-layer redesign still load, with the same content.

``tests/data/legacy`` was written by that release (a tiny open_clip tower, its task vector and the three
methods' alignment directories, the vision-only architecture JSON); the values are recomputed here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transport.core.arch import Arch
from transport.core.symmetry import perm_equal, random_permutation
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.methods.gradfix import GradFixAlignment
from transport.methods.theseus import TheseusAlignment
from transport.methods.transfusion import TransFusionAlignment
from transport.sources import load_file_model, load_task_vector, to_canonical

DATA = Path(__file__).parent / "data" / "legacy"


def _expected():
    arch = tiny_arch(width=16, layers=1, heads=2, image_size=4, patch_size=2, output_dim=8, name="zoo:legacy")
    torch.manual_seed(0)
    params = {k: v.detach().clone() for k, v in to_canonical(build_open_clip_tower(arch).state_dict(), arch).items()}
    g = torch.Generator().manual_seed(1)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    tau = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    return arch, params, tau


def test_vision_only_architecture_json_reads_into_arch():
    arch, _, _ = _expected()
    assert Arch.from_json((DATA / "arch.json").read_text()) == arch


def test_model_and_task_vector_files_load_with_the_same_tensors():
    arch, params, tau = _expected()
    model = load_file_model(str(DATA / "model.safetensors"), None)
    assert model.arch == arch and model.meta["note"] == "legacy"
    assert all(torch.equal(model.params[k], params[k]) for k in params)
    tv = load_task_vector(DATA / "task_vector.safetensors")
    assert tv.arch == arch and tv.meta["method"] == "naive"
    assert all(torch.equal(tv[k], tau[k]) for k in tau)


def test_alignment_caches_load():
    arch, _, _ = _expected()
    tf = TransFusionAlignment.load(DATA / "transfusion")
    planted = random_permutation(arch, seed=3)  # what that release aligned: recovered exactly
    assert tf.arch == arch and all(perm_equal(tf.perms[s], p) for s, p in planted.items())
    gf = GradFixAlignment.load(DATA / "gradfix")
    assert gf.arch == arch and gf.n_samples == 3 and set(gf.counts) == set(gf.grad) == set(_expected()[1])
    th = TheseusAlignment.load(DATA / "theseus")
    assert th.source_arch == arch and torch.equal(th.maps["ln1:0"], torch.eye(16))
