"""Theseus across depths: the relative-depth baseline, the similarity map finding a planted block insertion
(target = a widened copy of the source with one identity block inserted), exact transport from the matched
blocks, zero updates on the unmatched one, and what the diagnostics report."""
from __future__ import annotations

import pytest
import torch
from planted_decoders import decoder, identity_block, logits, model, planted, random_tau, text_task

from transport.core.model import Model
from transport.errors import TransportError
from transport.methods import TransportInputs, check_compatible, get_method
from transport.methods.theseus import TheseusAlignment, apply, prepare
from transport.methods.theseus_depth import block_similarity, linear_cka, relative_depth

torch.set_num_threads(1)
A_ARCH = decoder(layers=4)
WIDE = decoder(layers=4, width=64, heads=8, kv_heads=4, mlp_width=96, norm_eps=A_ARCH.norm_eps / 2, name="test:w")
INSERTED = 1  # target block 1 is the inserted one: the relative-depth map leaves block 2 unmatched instead


@pytest.fixture(scope="module")
def task():
    return text_task(50, n=40)


@pytest.fixture(scope="module")
def pair():
    A = model(A_ARCH, 1)
    W, _ = planted(A, WIDE, seed=2)
    params, arch = identity_block(W.params, W.arch, INSERTED, seed=9)
    return A, Model(arch, params, "planted:deeper")


def fit(A, B, task, **options):
    return prepare(TransportInputs(A, B, task, seed=0), {"calib_size": 40, **options})


def error(A, B, al, task):
    tau = random_tau(A.arch, 3)
    out = apply(al, tau, 1.0)
    batch = task.split("train")[0]
    f_ft = logits(tau.apply_to(A.params), A.arch, batch)
    change = (f_ft - logits(B.params, B.arch, batch)).abs().max()
    return out, float((logits(out.apply_to(B.params), B.arch, batch) - f_ft).abs().max() / change)


def test_planted_insertion_keeps_the_function(pair, task):
    A, B = pair
    batch = task.split("train")[0]
    assert B.arch.layers == 5
    assert (logits(A.params, A.arch, batch) - logits(B.params, B.arch, batch)).abs().max() < 1e-10


def test_similarity_finds_the_inserted_block_and_transports_exactly(pair, task):
    A, B = pair
    al = fit(A, B, task, depth="similarity")
    d = al.diagnostics()["depth"]
    assert d["mode"] == "similarity" and d["map"] == [0, None, 1, 2, 3]
    assert d["unmatched_target"] == [INSERTED] and d["dropped_source"] == []
    S = torch.tensor(d["similarity"])
    assert S.shape == (5, 4) and torch.allclose(S[[0, 2, 3, 4], [0, 1, 2, 3]], torch.ones(4, dtype=S.dtype), atol=1e-6)
    assert float(S[INSERTED].max()) < 0.999  # the inserted block's output is its input: no source block does that
    out, err = error(A, B, al, task)
    assert err < 1e-5 and al.diagnostics()["unused"] == []
    zeroed = al.diagnostics()["zeroed"]
    assert sorted(n for n in zeroed) == sorted(n for n in out.tensors if n.startswith(f"blocks.{INSERTED}."))
    assert all(float(out[n].abs().max()) == 0 for n in zeroed)
    src = {u["name"]: u["source"] for u in al.diagnostics()["updates"]}
    assert src["blocks.3.mlp.fc2.weight"] == "blocks.2.mlp.fc2.weight" and src["blocks.0.attn.q.weight"] == \
        "blocks.0.attn.q.weight"


def test_relative_depth_misses_it(pair, task):
    A, B = pair
    al = fit(A, B, task)  # the default: relative depth
    d = al.diagnostics()["depth"]
    assert d["mode"] == "relative" and d["map"] == [0, 1, None, 2, 3] and d["similarity"] is None
    assert error(A, B, al, task)[1] > 0.05


def test_depth_map_survives_save_and_load(pair, task, tmp_path):
    A, B = pair
    al = fit(A, B, task, depth="similarity")
    al.save(tmp_path / "al")
    back = TheseusAlignment.load(tmp_path / "al")
    assert back.depth_map() == [0, None, 1, 2, 3]
    tau = random_tau(A.arch, 4)
    assert apply(back, tau, 1.0).allclose(apply(al, tau, 1.0))
    back.info["depth"]["map"] = [0, 2, 1, None, 3]  # crossing: refused, not applied
    with pytest.raises(TransportError, match=r"^theseus: malformed alignment: not an order-preserving depth map"):
        apply(back, tau, 1.0)


def test_shallower_target_drops_source_blocks_and_says_so(pair, task):
    A, B = pair
    al = fit(B, A, task)  # 5 -> 4 blocks: one source block has no target block
    d = al.diagnostics()
    assert d["depth"]["map"] == [0, 1, 3, 4] and d["depth"]["dropped_source"] == [2]
    apply(al, random_tau(B.arch, 1), 1.0)
    unused = al.diagnostics()["unused"]
    assert unused and all(n.startswith("blocks.2.") for n in unused)


def test_relative_depth_baseline():
    assert relative_depth(4, 5) == [0, 1, None, 2, 3]
    assert relative_depth(3, 3) == [0, 1, 2]
    deeper = relative_depth(24, 28)
    got = [i for i in deeper if i is not None]
    assert got == list(range(24)) and deeper[0] == 0 and deeper[-1] == 23 and deeper.count(None) == 4
    shallower = relative_depth(28, 24)
    assert None not in shallower and shallower[0] == 0 and shallower[-1] == 27 and shallower == sorted(set(shallower))
    assert relative_depth(1, 3) == [0, None, None] and relative_depth(3, 1) == [0]


def test_cka():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    wide = torch.cat([X, torch.zeros(200, 4, dtype=torch.float64)], 1) @ Q * 3.0
    assert linear_cka(X, wide) == pytest.approx(1.0, abs=1e-12)  # rotations, widening and scale do not matter
    assert linear_cka(X, torch.randn(200, 6, generator=g, dtype=torch.float64)) < 0.3
    S = block_similarity([X, wide, X], [X, X, wide, X])
    assert S.shape == (3, 2)


def test_methods_that_need_equal_depths_still_refuse(pair, task):
    A, B = pair
    check_compatible(get_method("theseus"), TransportInputs(A, B, task))
    with pytest.raises(TransportError, match=r"^gradfix: source and target depths differ \(4 vs 5 layers\)$"):
        info = get_method("gradfix")
        check_compatible(type(info)(**{**vars(info), "same_arch": False}), TransportInputs(A, B, task))
