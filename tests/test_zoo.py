"""The demo zoo: exact shuffles and widenings, deterministic training, loading, and the phenomenon."""
from __future__ import annotations

import json

import pytest
import torch

from transport import zoo
from transport.core.layout import param_axes
from transport.families.open_clip import tiny_arch
from transport.data import digits_task
from transport.errors import TransportError
from transport.core.evaluate import accuracy
from transport.core.forward import encode
from transport.core.stems import preprocess
from transport.files import read_safetensors
from transport.core.task_vector import TaskVector
from transport.zoo.train import Augment, TrainConfig, init_head, init_params, train
from transport.core.symmetry import apply_permutation
from transport.zoo.builder import _main as zoo_main
from transport.zoo.builder import build as build_zoo
from transport.core.symmetry import invert
from transport.zoo.shuffle import random_shuffle
from transport.sources import load_zoo_model
from transport.zoo.shuffle import grow_params
from transport.zoo.builder import PRETRAINED, VARIANTS, format_table, pretrain_source, summarize

ARCH = tiny_arch(width=32, layers=2, heads=4, output_dim=16)


def _pixels(arch, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return preprocess(arch, torch.rand(n, 1, arch.image_size, arch.image_size, generator=g))


def _randomized(arch, seed=0):
    """open_clip init plus noise on every tensor (so biases and LayerNorms are not trivially 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init_params(arch, seed).items()}


# ----------------------------------------------------------------------------------------------
# shuffles and widening (no zoo needed)
# ----------------------------------------------------------------------------------------------
def test_shuffle_is_exactly_function_preserving_and_moves_units():
    params = _randomized(ARCH)
    perm = random_shuffle(ARCH, seed=3)
    shuffled = apply_permutation(params, perm, ARCH)
    x = _pixels(ARCH)
    torch.testing.assert_close(encode(shuffled, ARCH, x), encode(params, ARCH, x), atol=1e-5, rtol=0)
    # it really moved things: every matrix differs, and most entries of the big ones changed place
    for k, info in param_axes(ARCH).items():
        if len(info.shape) == 2 and info.block in ("Q", "K", "V", "O", "fc1", "fc2"):
            assert (shuffled[k] != params[k]).float().mean() > 0.8, k
    dh = ARCH.head_dim
    for l in range(ARCH.layers):  # whole heads move by `heads`; one within-head shuffle for Q, K, V and O
        assert torch.equal(perm[f"heads:{l}"].index("k")[::dh] // dh, perm[f"heads:{l}"].kv) and torch.equal(perm[f"heads:{l}"].index("k"), perm[f"heads:{l}"].index("v"))
        within = perm[f"heads:{l}"].index("k").reshape(ARCH.heads, dh) % dh
        assert not torch.equal(within, torch.arange(dh).repeat(ARCH.heads, 1))  # dims inside heads do move
    back = apply_permutation(shuffled, invert(perm), ARCH)
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_inconsistent_shuffle_changes_the_function():
    """The check above can fail: moving Q's rows but not K's breaks q.k, moving fc1 alone breaks the MLP."""
    params = _randomized(ARCH)
    perm = random_shuffle(ARCH, seed=3)
    x = _pixels(ARCH)
    ref = encode(params, ARCH, x)
    bad = dict(params)
    bad["blocks.0.attn.q.weight"] = params["blocks.0.attn.q.weight"][perm[f"heads:{0}"].index("k")]
    assert (encode(bad, ARCH, x) - ref).abs().max() > 1e-3
    bad = dict(params)
    bad["blocks.1.mlp.fc1.weight"] = params["blocks.1.mlp.fc1.weight"][perm[f"mlp:{1}"]]
    assert (encode(bad, ARCH, x) - ref).abs().max() > 1e-3


def test_widening_is_function_preserving_and_linear():
    wide = tiny_arch(width=64, layers=2, heads=8, output_dim=16)
    assert wide.head_dim == ARCH.head_dim
    params = _randomized(ARCH, seed=1)
    grown = grow_params(params, ARCH, wide)
    assert {k: tuple(v.shape) for k, v in grown.items()} == {k: i.shape for k, i in param_axes(wide).items()}
    x = _pixels(ARCH)
    torch.testing.assert_close(encode(grown, wide, x), encode(params, ARCH, x), atol=1e-5, rtol=0)
    tau = {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in params.items()}
    lhs = grow_params({k: params[k] + tau[k] for k in params}, ARCH, wide)
    rhs = grow_params(tau, ARCH, wide)
    assert all(torch.allclose(lhs[k], grown[k] + rhs[k], atol=1e-7) for k in lhs)
    # noise breaks the equality: the comparison is sharp enough to notice a change
    noisy = {k: v + 0.01 * torch.randn(v.shape) for k, v in grown.items()}
    assert (encode(noisy, wide, x) - encode(params, ARCH, x)).abs().max() > 1e-4
    with pytest.raises(TransportError, match="cannot grow .* need 2x width"):
        grow_params(params, ARCH, tiny_arch(width=64, layers=2, heads=4, output_dim=16))


def test_training_is_deterministic():
    x, y = digits_task("digits").split("train")
    cfg = TrainConfig(steps=6, batch_size=32, augment=Augment(shift=1, noise=0.1, cutout=2), seed=5)
    head = init_head(ARCH, 10, 0)
    a = train(init_params(ARCH, 0), head, ARCH, x, y, cfg)
    b = train(init_params(ARCH, 0), head, ARCH, x, y, cfg)
    c = train(init_params(ARCH, 0), head, ARCH, x, y, cfg.with_seed(6))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert torch.equal(a.head.weight, b.head.weight)
    assert any(not torch.equal(a.params[k], c.params[k]) for k in a.params)  # the data seed matters


def test_not_built_and_bad_variant(tmp_path):
    assert not zoo.is_built(tmp_path)
    with pytest.raises(TransportError, match=r"not built at .*python -m transport zoo build"):
        load_zoo_model("A", root=tmp_path)
    with pytest.raises(TransportError, match="unknown zoo variant 'huge'"):
        build_zoo(tmp_path, variant="huge")


def test_summary_statistics():
    rows = [{"pair": "control", "target": "B_control", "task": "rot90", "seed": s, "zero_shot_target": z,
             "naive": n, "true_map": None, "source_finetuned": 0.9, "oracle": 0.9}
            for s, z, n in ((0, 0.1, 0.1), (1, 0.2, 0.3))]
    (s,) = summarize(rows)
    assert s["seeds"] == 2 and s["naive"] == pytest.approx(0.2) and s["naive_std"] == pytest.approx(0.1)
    assert s["true_map"] is None and s["oracle_std"] == 0.0
    assert "20.0 +- 10.0" in format_table(rows)


# ----------------------------------------------------------------------------------------------
# the built test zoo
# ----------------------------------------------------------------------------------------------
def test_list_load_arch_round_trip(tiny_zoo):
    assert zoo.is_built() and zoo.zoo_root() == tiny_zoo
    assert zoo.seeds() == [0] and zoo.tasks() == ["rot90", "invert"]
    entries = zoo.list_models()
    names = {e.name for e in entries}
    for base in PRETRAINED:
        assert base in names
    for p in zoo.pairs():
        assert p.source == "A" and p.target in names and p.expected
        for t in zoo.tasks():
            assert f"{p.target}+{t}" in names
    for e in entries:
        m = load_zoo_model(e.ref)
        assert m.arch == zoo.arch_of(e.ref) and m.arch.name == e.arch
        assert m.ref == f"zoo:{e.ref}" and m.head is not None and m.head.num_classes == 10
        assert (e.kind == "finetuned") == (e.task is not None)
        if e.base:
            assert load_zoo_model(e.base).arch == m.arch
    a, a0 = load_zoo_model("A"), load_zoo_model("A@0")
    assert all(torch.equal(a.params[k], a0.params[k]) for k in a.params)
    wide = zoo.arch_of("W_grown")
    assert wide.width == 2 * a.arch.width and wide.heads == 2 * a.arch.heads and wide.head_dim == a.arch.head_dim
    # the file is an open_clip state dict (fused in_proj) plus the frozen head
    tensors, md = read_safetensors(tiny_zoo / "seed0" / "A.safetensors")
    assert "transformer.resblocks.0.attn.in_proj_weight" in tensors and "classifier.weight" in tensors
    assert json.loads(md["classnames"])[0] == "zero"


def test_unknown_names(tiny_zoo):
    with pytest.raises(TransportError, match=r"zoo has no model 'C' \(known: A, B_control, B_next,"):
        load_zoo_model("C")
    with pytest.raises(TransportError, match="zoo has no model 'A\\+hflip'"):
        load_zoo_model("A+hflip")  # not a task of the test zoo
    with pytest.raises(TransportError, match=r"zoo model 'A@7': no seed 7 \(seeds: 0\)"):
        zoo.arch_of("A@7")
    with pytest.raises(TransportError, match=r"^zoo model .A. was not made by a shuffle \(only B_control, B_next and W_grown are\)$"):
        zoo.true_permutation("A")


def test_shuffled_releases_are_exact_relabellings(tiny_zoo):
    A, Bc = load_zoo_model("A"), load_zoo_model("B_control")
    perm = zoo.true_permutation("B_control")
    shuffled = apply_permutation(A.params, perm, A.arch)
    assert all(torch.equal(shuffled[k], Bc.params[k]) for k in A.params)
    assert torch.equal(A.head.weight, Bc.head.weight)
    x = preprocess(A.arch, digits_task("digits").split("test")[0][:64])
    torch.testing.assert_close(encode(Bc.params, A.arch, x), encode(A.params, A.arch, x), atol=1e-5, rtol=0)
    for t in zoo.tasks():  # the control oracle is A's fine-tune shuffled alike
        ft = apply_permutation(load_zoo_model(f"A+{t}").params, perm, A.arch)
        assert all(torch.equal(ft[k], load_zoo_model(f"B_control+{t}").params[k]) for k in ft)
    Bn, Bu = load_zoo_model("B_next"), load_zoo_model("B_next_unshuffled")
    renamed = apply_permutation(Bu.params, zoo.true_permutation("B_next"), A.arch)
    assert all(torch.equal(renamed[k], Bn.params[k]) for k in renamed)
    assert any(not torch.equal(Bn.params[k], A.params[k]) for k in A.params)


def test_source_is_reproducible_from_its_config(tiny_zoo):
    cfg = VARIANTS["test"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build trains single-threaded
    try:
        res = pretrain_source(cfg, 0)
    finally:
        torch.set_num_threads(threads)
    A = load_zoo_model("A")
    assert all(torch.equal(res.params[k], A.params[k]) for k in A.params)
    assert torch.equal(res.head.weight, A.head.weight)


def test_phenomenon_on_test_variant(tiny_zoo):
    table = zoo.phenomenon_table()
    assert {(r["pair"], r["task"]) for r in table} == {(p.key, t) for p in zoo.pairs() for t in zoo.tasks()}
    for r in (r for r in table if r["pair"] == "control"):
        # the source fine-tune is good and the exactly shuffled one is the same function ...
        assert r["source_finetuned"] > r["zero_shot_target"] + 0.25
        assert r["oracle"] == pytest.approx(r["source_finetuned"], abs=2.5e-3)  # equal up to a rounding tie
        assert r["true_map"] == pytest.approx(r["source_finetuned"], abs=2.5e-3)
        # ... but naive addition of tau onto the shuffled weights recovers little of that gain
        gain = (r["naive"] - r["zero_shot_target"]) / (r["oracle"] - r["zero_shot_target"])
        assert gain < 0.3, r
    for r in table:
        assert (r["naive"] is None) == r["pair"].startswith("wide")
    # the stored table agrees with the stored models

    r = next(r for r in table if r["pair"] == "next" and r["task"] == "rot90")
    task = digits_task("rot90")
    Bn, A, Aft = load_zoo_model("B_next"), load_zoo_model("A"), load_zoo_model("A+rot90")
    tau = TaskVector.from_models(A.params, Aft.params, A.arch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the build
    try:
        assert accuracy(load_zoo_model("B_next+rot90"), task) == r["oracle"]
        assert accuracy(Bn, task, "test", tau.apply_to(Bn.params, r["naive_alpha"])) == r["naive"]
    finally:
        torch.set_num_threads(threads)


def test_build_skips_when_built_and_refuses_other_configs(tiny_zoo):
    info = build_zoo(tiny_zoo, variant="test", progress=False)
    assert info["skipped"] and info["variant"] == "test" and info["build_seconds"] > 0
    assert set(info["model_seconds"]) >= {"A@0", "W_indep+rot90@0"}
    with pytest.raises(TransportError, match="another configuration"):
        build_zoo(tiny_zoo, variant="full", progress=False)


def test_module_cli_lists_models(tiny_zoo, capsys):
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "B_next+invert@0" in out and "finetuned" in out
    assert zoo_main(["list", "--root", str(tiny_zoo / "nowhere")]) == 2
    assert "python -m transport zoo build" in capsys.readouterr().err


def test_grown_release_hides_its_unit_order(tiny_zoo):
    """W_grown is shuffled after growing: zero-padding tau (naive_resize) is no hidden alignment, the known
    widening map (grow, then the shuffle) carries the fine-tuning over, as the build's table says."""
    from transport.methods.theseus import naive_resize

    A = load_zoo_model("A")
    W = load_zoo_model("W_grown")
    assert torch.equal(zoo.true_permutation("W_grown")["res:0"].sort().values, torch.arange(W.arch.width))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the build
    try:
        for r in (r for r in zoo.phenomenon_table() if r["pair"] == "wide_grown"):
            task = digits_task(r["task"])
            tau = TaskVector.from_models(A.params, load_zoo_model(f"A+{r['task']}").params, A.arch)
            mapped = zoo.grown_task_vector(tau, "W_grown")
            assert accuracy(W, task, "test", mapped.apply_to(W.params, r["true_map_alpha"])) == r["true_map"]
            padded = naive_resize(tau, W.arch)
            best_pad = max(accuracy(W, task, "test", padded.apply_to(W.params, a)) for a in (0.5, 1.0, 1.5, 2.0))
            gain = r["true_map"] - r["zero_shot_target"]
            assert gain > 0.2, r
            assert best_pad < r["zero_shot_target"] + 0.3 * gain, (best_pad, r)
    finally:
        torch.set_num_threads(threads)
