"""GradFix: the spec's invariants on tiny open_clip towers and the digits tasks."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from transport.core.layout import param_axes
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.sources import to_canonical
from transport.data import Task, digits_task
from transport.errors import TransportError
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.stems import preprocess
from transport.core.losses import classification_loss, mean_loss
from transport.methods import TransportInputs, get_method
from transport.methods.gradfix import (GradFixAlignment, apply, collect_votes, invariant_tensors,
                                       per_sample_grads, prepare)
from transport.core.model import Model
from transport.core.task_vector import TaskVector

ARCH = tiny_arch(width=32, layers=2, heads=4, output_dim=16)
VOTED = [k for k in param_axes(ARCH) if k not in invariant_tensors(ARCH)]
NAMES = [f"c{i}" for i in range(10)]


def tower(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = build_open_clip_tower(ARCH).state_dict()
    return {k: v.detach().to(dtype) for k, v in to_canonical(sd, ARCH).items()}


def head(dtype=torch.float32) -> Classifier:
    g = torch.Generator().manual_seed(7)
    return Classifier(torch.randn(10, ARCH.output_dim, generator=g).to(dtype), normalize=True, logit_scale=10.0,
                      classnames=list(NAMES))


def model(seed: int = 1, dtype=torch.float32) -> Model:
    return Model(ARCH, tower(seed, dtype), f"tiny{seed}", head=head(dtype))


def rand_tau(seed: int = 3, scale: float = 0.02, dtype=torch.float32) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector(ARCH, {k: (scale * torch.randn(v.shape, generator=g)).to(dtype)
                             for k, v in param_axes(ARCH).items()})


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task("rot90")


@pytest.fixture(scope="module")
def prepared(task) -> GradFixAlignment:
    """The majority vote of tiny model 1 on 2 shots per class of rot90 (tests take fresh copies)."""
    return prepare(inputs(model(1), task), {})


def fresh(al: GradFixAlignment) -> GradFixAlignment:
    return dataclasses.replace(al, last=None)


def inputs(target: Model, task: Task, shots: int = 2, seed: int = 0) -> TransportInputs:
    return TransportInputs(source=model(2, next(iter(target.params.values())).dtype), target=target, task=task,
                           shots=shots, seed=seed)


def loss_on(target: Model, x: torch.Tensor):
    dtype = next(iter(target.params.values())).dtype
    return classification_loss(ARCH, target.head), preprocess(ARCH, x).to(dtype)


def inner(a: dict, b: dict) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


# ----------------------------------------------------------------------------------------------
# the descent guarantee
# ----------------------------------------------------------------------------------------------
def test_descent_identity_for_any_g_and_tau():
    g_gen = torch.Generator().manual_seed(11)
    grad = {k: torch.randn(v.shape, generator=g_gen, dtype=torch.float64) for k, v in param_axes(ARCH).items()}
    counts = {k: torch.zeros(v.shape, dtype=torch.int8) for k, v in param_axes(ARCH).items()}
    al = GradFixAlignment(ARCH, counts, grad, 4, vote="mean")
    tau = rand_tau(dtype=torch.float64)
    delta = apply(al, tau, 1.0, {"variant": "normal"})
    m = {k: (delta[k] != 0).double() for k in delta}
    expected = -sum(float((m[k] * grad[k].abs() * tau[k].abs()).sum()) for k in m)
    got = inner(grad, delta.tensors)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < 0
    assert al.diagnostics()["first_order_total"] == pytest.approx(expected, rel=1e-9)


def test_strict_loss_decrease_for_small_alpha(task):
    target = model(1, torch.float64)
    al = prepare(inputs(target, task), {"vote": "mean"})
    x, y = task.shots(2, 0)
    loss_fn, pixels = loss_on(target, x)
    tau = rand_tau(dtype=torch.float64)
    delta = apply(al, tau, 1.0, {"variant": "normal"})
    base = mean_loss(loss_fn, target.params, pixels, y)
    fo = al.diagnostics()["first_order_total"]
    assert fo < 0
    for a in (1e-2, 1e-3, 1e-4):
        moved = mean_loss(loss_fn, delta.apply_to(target.params, a), pixels, y)
        assert moved < base
    a = 1e-5
    slope = (mean_loss(loss_fn, delta.apply_to(target.params, a), pixels, y) - base) / a
    assert slope == pytest.approx(fo, rel=1e-3)
    # the unmasked tau is not a descent direction here (so the test could fail without the mask)
    assert inner(al.grad, tau.tensors) > 0 or inner(al.grad, (-tau).tensors) > 0


# ----------------------------------------------------------------------------------------------
# mask algebra
# ----------------------------------------------------------------------------------------------
def test_mask_values_idempotent_and_l1(prepared):
    al = fresh(prepared)
    tau = rand_tau()
    d1 = apply(al, tau, 1.0, {})
    d2 = apply(al, d1, 1.0, {})
    for k in tau:
        assert bool(((d1[k] == 0) | (d1[k] == tau[k])).all())
        assert torch.equal(d1[k], d2[k])
    l1 = lambda v: sum(float(t.abs().sum()) for t in v.tensors.values())  # noqa: E731
    assert l1(d1) < l1(tau)
    assert 0.2 < al.diagnostics()["keep_rate_total"] < 0.8
    assert torch.equal(apply(al, tau, 0.5, {})["blocks.0.mlp.fc1.weight"], 0.5 * d1["blocks.0.mlp.fc1.weight"])


def test_positive_loss_scaling_changes_nothing(task):
    target = model(1, torch.float64)
    x, y = task.shots(2, 0)
    loss_fn, pixels = loss_on(target, x)
    v1 = collect_votes(loss_fn, target.params, pixels, y, names=VOTED)
    v2 = collect_votes(lambda p, a, b: 3.7 * loss_fn(p, a, b), target.params, pixels, y, names=VOTED)
    for k in v1.counts:
        assert torch.equal(v1.counts[k], v2.counts[k]), k
        assert torch.equal(torch.sign(v1.grad[k]), torch.sign(v2.grad[k])), k
    assert v1.counts["blocks.0.attn.q.weight"].abs().sum() > 0


def test_ties_are_dropped():
    counts = {k: torch.ones(v.shape, dtype=torch.int8) for k, v in param_axes(ARCH).items()}
    w = "blocks.1.mlp.fc2.weight"
    counts[w][0, :5] = 0  # ties
    counts[w][1, :3] = -2
    grad = {k: torch.zeros(v.shape) for k, v in param_axes(ARCH).items()}
    al = GradFixAlignment(ARCH, counts, grad, 2)
    tau = TaskVector(ARCH, {k: torch.full(v.shape, 0.5) for k, v in param_axes(ARCH).items()})
    d = apply(al, tau, 1.0, {})
    assert torch.equal(d[w][0, :5], torch.zeros(5))
    assert torch.equal(d[w][1, :3], torch.zeros(3))
    assert torch.equal(d[w][0, 5:], tau[w][0, 5:])
    block = next(b for b in al.diagnostics()["blocks"] if b["layer"] == 1 and b["block"] == "fc2")
    assert block["ties"] == 5
    assert al.entry_map(w, tau)[0, :5].tolist() == [0] * 5
    assert al.entry_map(w, tau)[1, :3].tolist() == [-1] * 3
    assert al.entry_map(w, tau)[2, 0] == 1


def test_one_sample_majority_equals_mean(task):
    target = model(1)
    x, y = task.shots(1, 0)
    loss_fn, pixels = loss_on(target, x[:1])
    v = collect_votes(loss_fn, target.params, pixels, y[:1])
    al = GradFixAlignment(ARCH, v.counts, v.grad, v.n)
    for k in v.counts:
        assert torch.equal(al.sign(k, "majority"), al.sign(k, "mean")), k


def test_oracle_returns_tau_and_anti_oracle_returns_zero(prepared):
    al = fresh(prepared)
    tau = rand_tau()
    assert apply(al, tau, 1.0, {"variant": "oracle", "oracle_tau": tau}).allclose(tau)
    assert apply(al, tau, 1.0, {"variant": "oracle", "oracle_tau": -tau}).allclose(TaskVector.zeros_like(ARCH))
    with pytest.raises(TransportError, match=r"^gradfix: variant 'oracle' needs options\['oracle_tau'\]"):
        apply(al, tau, 1.0, {"variant": "oracle"})


def test_force_below_normal_below_zero(task):
    al = prepare(inputs(model(1), task), {"vote": "mean"})
    tau = rand_tau()
    fo_normal = inner(al.grad, apply(al, tau, 1.0, {"variant": "normal", "vote": "mean"}).tensors)
    force = apply(al, tau, 1.0, {"variant": "force", "vote": "mean"})
    fo_force = inner(al.grad, force.tensors)
    assert fo_force < fo_normal < 0
    assert al.diagnostics()["first_order_total"] == pytest.approx(fo_force, rel=1e-9)
    k = "blocks.0.attn.v.weight"
    assert torch.equal(force[k].abs(), tau[k].abs() * (al.sign(k, "mean") != 0))


def test_random_control_keeps_the_same_count_per_tensor(prepared):
    al = fresh(prepared)
    tau = rand_tau()
    normal = apply(al, tau, 1.0, {})
    r0 = apply(al, tau, 1.0, {"variant": "random", "mask_seed": 0})
    r0b = apply(al, tau, 1.0, {"variant": "random", "mask_seed": 0})
    r1 = apply(al, tau, 1.0, {"variant": "random", "mask_seed": 1})
    k = "blocks.1.mlp.fc1.weight"
    for name in tau:
        assert int((r0[name] != 0).sum()) == int((normal[name] != 0).sum())
        assert torch.equal(r0[name], r0b[name])
    assert not torch.equal(r0[k], r1[k]) and not torch.equal(r0[k], normal[k])


# ----------------------------------------------------------------------------------------------
# gradients and votes
# ----------------------------------------------------------------------------------------------
def test_target_weights_bit_identical(task):
    target = model(1)
    before = {k: v.clone() for k, v in target.params.items()}
    prepare(inputs(target, task), {"micro_batch": 3})
    for k, v in target.params.items():
        assert torch.equal(v.view(torch.int32), before[k].view(torch.int32)), k


def test_outlier_majority_keeps_sign_mean_flips():
    params = tower(1)
    k = "blocks.0.ln1.bias"

    def loss_fn(p, pixels, labels):  # per-sample gradient w.r.t. p[k][0]: +1 for label 0, -100 for label 1
        w = torch.where(labels == 1, -100.0, 1.0)
        return w * p[k][0]

    labels = torch.tensor([0, 0, 0, 0, 1])
    v = collect_votes(loss_fn, params, torch.zeros(5, 3, 8, 8), labels, micro_batch=2)
    al = GradFixAlignment(ARCH, v.counts, v.grad, v.n)
    assert int(v.counts[k][0]) == -3  # four votes for -1, one for +1
    assert int(al.sign(k, "majority")[0]) == -1
    assert int(al.sign(k, "mean")[0]) == 1  # mean gradient (4 - 100) / 5 < 0
    assert float(v.grad[k][0]) == pytest.approx(-96 / 5)
    assert k not in v.no_grad and "blocks.0.ln1.weight" in v.no_grad


def test_per_sample_grads_match_a_loop(task):
    target = model(1)
    x, y = task.shots(1, 0)
    loss_fn, pixels = loss_on(target, x[:4])
    grads, losses = per_sample_grads(loss_fn, target.params, pixels, y[:4])
    for i in range(4):
        p = {k: v.clone().requires_grad_(True) for k, v in target.params.items()}
        li = loss_fn(p, pixels[i:i + 1], y[i:i + 1]).sum()
        gi = torch.autograd.grad(li, list(p.values()))
        assert float(losses[i]) == pytest.approx(float(li.detach()), rel=1e-5)
        for k, g in zip(p, gi):
            torch.testing.assert_close(grads[k][i], g, atol=1e-5, rtol=1e-4)


def test_deterministic_and_micro_batch_independent(task):
    target = model(1, torch.float64)
    a = prepare(inputs(target, task, shots=1), {"micro_batch": 3})
    b = prepare(inputs(target, task, shots=1), {"micro_batch": 3})
    c = prepare(inputs(target, task, shots=1), {"micro_batch": 10})
    for k in a.counts:
        assert torch.equal(a.counts[k], b.counts[k]) and torch.equal(a.grad[k], b.grad[k])
        assert torch.equal(a.counts[k], c.counts[k])
        torch.testing.assert_close(a.grad[k], c.grad[k], atol=1e-12, rtol=1e-9)
    assert a.counts["embed.pos"].dtype == torch.int8 and a.n_samples == 10 and a.micro_batch == 3


def test_shots_come_from_the_train_split_only(task, prepared):
    x, y = task.split("train")
    nan = lambda s: (torch.full_like(task.split(s)[0], float("nan")), task.split(s)[1])  # noqa: E731
    poisoned = Task("p", task.classnames, {"train": (x, y), "val": nan("val"), "test": nan("test")})
    al = prepare(inputs(model(1), poisoned), {})
    ref = prepared
    for k in al.counts:
        assert torch.equal(al.counts[k], ref.counts[k])
    bad_train = Task("q", task.classnames, {"train": nan("train"), "val": task.split("val"),
                                            "test": task.split("test")})
    with pytest.raises(TransportError, match="^gradfix: the loss is not finite"):
        prepare(inputs(model(1), bad_train), {})


def test_one_bad_sample_among_side_by_side_workers_is_one_line(task):
    """One sample per worker thread: a non-finite loss on one sample in the middle stops the vote with that one
    line (the samples after it stop at their next fold; nothing hangs) and the thread setting is restored."""
    target = model(1)
    x, y = task.shots(1, 0)
    loss_fn, pixels = loss_on(target, x)
    pixels = pixels.clone()
    pixels[4] = float("nan")
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(TransportError, match="^gradfix: the loss is not finite on the labelled samples"):
            collect_votes(loss_fn, target.params, pixels, y, micro_batch=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(start)


def test_prepare_uses_exactly_the_seeded_shots(task):
    target = model(1)
    al = prepare(inputs(target, task, shots=1, seed=5), {})
    x, y = task.shots(1, 5)
    loss_fn, pixels = loss_on(target, x)
    v = collect_votes(loss_fn, target.params, pixels, y)
    other = prepare(inputs(target, task, shots=1, seed=6), {})
    assert all(torch.equal(al.counts[k], v.counts[k]) for k in al.counts)
    assert not all(torch.equal(al.counts[k], other.counts[k]) for k in al.counts)
    assert al.shots == 1 and al.n_samples == 10


def test_unreached_tensors_pass_through_unmasked(task):
    target = model(1)
    x, y = task.shots(1, 0)
    full, pixels = loss_on(target, x)

    def loss_fn(p, px, lab):  # head.proj is held constant: the loss does not reach it
        return full({**p, "head.proj": p["head.proj"].detach()}, px, lab)

    v = collect_votes(loss_fn, target.params, pixels, y, names=VOTED)
    assert v.no_grad == ["head.proj"]
    al = GradFixAlignment(ARCH, v.counts, v.grad, v.n, no_grad=v.no_grad)
    tau = rand_tau()
    d = apply(al, tau, 1.0, {})
    assert torch.equal(d["head.proj"], tau["head.proj"])
    assert torch.equal(d["blocks.1.attn.k.bias"], tau["blocks.1.attn.k.bias"])  # no vote at all
    assert not torch.equal(d["embed.pos"], tau["embed.pos"])
    assert al.diagnostics()["no_grad"] == ["head.proj", "blocks.0.attn.k.bias", "blocks.1.attn.k.bias"]


def test_key_bias_does_not_change_the_function(task):
    """Why the key biases take no vote: softmax ignores the shift q·b_k, so their gradient is rounding noise."""
    target = model(1, torch.float64)
    x, _ = task.shots(1, 0)
    pix = preprocess(ARCH, x).double()
    moved = dict(target.params)
    for k in invariant_tensors(ARCH):
        moved[k] = moved[k] + torch.randn(moved[k].shape, dtype=torch.float64)
    torch.testing.assert_close(encode(moved, ARCH, pix), encode(target.params, ARCH, pix), atol=1e-10, rtol=1e-10)
    v = moved["blocks.0.attn.v.bias"]
    moved["blocks.0.attn.v.bias"] = v + 0.1
    assert not torch.allclose(encode(moved, ARCH, pix), encode(target.params, ARCH, pix), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# composition, diagnostics, files, errors
# ----------------------------------------------------------------------------------------------
def _permute_mlp(params: dict, perms: dict[int, torch.Tensor]) -> dict:
    out = dict(params)
    for l, p in perms.items():
        b = f"blocks.{l}.mlp"
        out[f"{b}.fc1.weight"] = params[f"{b}.fc1.weight"][p]
        out[f"{b}.fc1.bias"] = params[f"{b}.fc1.bias"][p]
        out[f"{b}.fc2.weight"] = params[f"{b}.fc2.weight"][:, p]
    return out


def test_gradfix_on_a_permuted_tau(task):
    """GradFix on pi(tau) against the vote of pi(B) equals pi of GradFix on tau against B's vote."""
    g = torch.Generator().manual_seed(0)
    perms = {l: torch.randperm(ARCH.mlp_width, generator=g) for l in range(ARCH.layers)}
    target = model(1, torch.float64)
    permuted = Model(ARCH, _permute_mlp(target.params, perms), "tiny1-permuted", head=target.head)
    x, _ = task.shots(1, 0)
    pix = preprocess(ARCH, x).double()
    torch.testing.assert_close(encode(permuted.params, ARCH, pix), encode(target.params, ARCH, pix))
    tau = rand_tau(dtype=torch.float64)
    tau_pi = TaskVector(ARCH, _permute_mlp(tau.tensors, perms))
    al = prepare(inputs(target, task), {})
    al_pi = prepare(inputs(permuted, task), {})
    got = apply(al_pi, tau_pi, 1.0, {})
    want = TaskVector(ARCH, _permute_mlp(apply(al, tau, 1.0, {}).tensors, perms))
    k = "blocks.1.mlp.fc1.weight"
    mismatch = sum(int((got[n] != want[n]).sum()) for n in got.keys())
    assert mismatch <= 5  # float64 rounding may flip a vote on a near-zero gradient, nothing more
    wrong = apply(al, tau_pi, 1.0, {})  # the unpermuted vote on the permuted tau: a different mask
    assert int((wrong[k] != got[k]).sum()) > 0.2 * got[k].numel()


def test_diagnostics_shape_and_totals(prepared):
    al = fresh(prepared)
    before = al.diagnostics()
    keys = ["method", "vote", "n_samples", "shots", "variant", "blocks", "margin_hist", "first_order_total",
            "keep_rate_total", "agreement_total", "no_grad"]
    assert list(before) == keys and before["agreement_total"] is None
    tau = rand_tau()
    d = apply(al, tau, 1.0, {})
    diag = al.diagnostics()
    json.dumps(diag)
    assert list(diag) == keys
    assert diag["method"] == "gradfix" and diag["n_samples"] == 20 and diag["shots"] == 2
    blocks = diag["blocks"]
    assert {(b["layer"], b["block"]) for b in blocks} == {(i.layer, i.block) for i in param_axes(ARCH).values()}
    assert all(list(b) == ["layer", "block", "numel", "agreement", "keep_rate", "ties", "first_order"]
               for b in blocks)
    n = sum(b["numel"] for b in blocks)
    assert n == sum(t.numel() for t in tau.tensors.values())
    kept = sum(int((d[k] != 0).sum()) for k in d.keys())
    assert diag["keep_rate_total"] == pytest.approx(kept / n)
    assert sum(b["keep_rate"] * b["numel"] for b in blocks) == pytest.approx(kept)
    assert sum(b["first_order"] for b in blocks) == pytest.approx(diag["first_order_total"])
    assert diag["first_order_total"] == pytest.approx(inner(al.grad, d.tensors), rel=1e-9)
    ties = sum(int((al.sign(k) == 0).sum()) for k in al.counts)
    assert sum(b["ties"] for b in blocks) == ties == sum(b["ties"] for b in before["blocks"])
    voted = sum(al.counts[k].numel() for k in al.counts if k not in al.no_grad) - ties
    assert al.no_grad == [k for k in tau.keys() if k.endswith("attn.k.bias")]
    agree = sum(int((al.entry_map(k, tau) == 1).sum()) for k in al.counts)
    assert diag["agreement_total"] == pytest.approx(agree / voted)
    h = diag["margin_hist"]
    assert len(h["edges"]) == len(h["counts"]) + 1 == 22 and sum(h["counts"]) == voted + ties
    assert h["counts"][0] == sum(int((al.counts[k] == 0).sum()) for k in al.counts)
    assert al.agreement(tau)["agreement_total"] == diag["agreement_total"]


def test_save_load_round_trip(task, tmp_path):
    al = prepare(inputs(model(1), task), {"vote": "mean"})
    apply(al, rand_tau(), 1.0, {"vote": "mean"})
    al.save(tmp_path / "a")
    back = GradFixAlignment.load(tmp_path / "a")
    for k in al.counts:
        assert back.counts[k].dtype == al.counts[k].dtype and torch.equal(back.counts[k], al.counts[k])
        assert torch.equal(back.grad[k], al.grad[k])
    assert back.diagnostics() == al.diagnostics()
    assert back.vote == "mean" and back.mean_loss == al.mean_loss
    tau = rand_tau(9)
    assert apply(back, tau, 1.0, {}).allclose(apply(al, tau, 1.0, {}))


def test_pipeline_transfer_and_cache(task, tmp_path):
    from transport.pipeline import transfer

    src = model(2)
    ft = src.with_params(rand_tau().apply_to(src.params), "tiny2-ft")
    kw = dict(method="gradfix", task=task, shots=2, seed=0, alpha_grid=[0.0, 0.5, 1.0], cache_dir=tmp_path)
    r1 = transfer(src, ft, model(1), **kw)
    r2 = transfer(src, ft, model(1), **kw)
    assert not r1.cache_hit and r2.cache_hit
    assert r1.transported.allclose(r2.transported)
    assert r1.diagnostics["agreement_total"] is not None and r1.diagnostics == r2.diagnostics
    assert {"gradfix", "naive", "zero_shot_target"} <= set(r1.accuracies)


def test_transfer_uses_an_alignment_the_caller_holds(task, tmp_path, monkeypatch):
    import transport.pipeline as pl

    src, tgt = model(2), model(1)
    ft = src.with_params(rand_tau().apply_to(src.params), "tiny2-ft")
    kw = dict(method="gradfix", task=task, shots=2, seed=0, alpha_grid=[0.0, 0.5, 1.0], cache_dir=tmp_path)
    held = pl.prepare("gradfix", TransportInputs(src, tgt, task, 2, 0), None, use_cache=False)
    ref = pl.transfer(src, ft, tgt, use_cache=False, **kw)

    def no_prepare(*a, **k):
        raise AssertionError("prepared again although the caller held the alignment")

    monkeypatch.setattr(pl, "prepare", no_prepare)
    r = pl.transfer(src, ft, tgt, prepared=held, **kw)
    assert r.transported.allclose(ref.transported, atol=0) and r.accuracies == ref.accuracies
    with pytest.raises(TransportError, match="^transfer: prepared is an alignment of gradfix, not of transfusion"):
        pl.transfer(src, ft, tgt, **{**kw, "method": "transfusion"}, prepared=held)


def test_bad_inputs():
    al = GradFixAlignment(ARCH, {k: torch.ones(v.shape, dtype=torch.int8) for k, v in param_axes(ARCH).items()},
                          {k: torch.zeros(v.shape) for k, v in param_axes(ARCH).items()}, 1)
    other = tiny_arch(width=16, layers=2, heads=4, output_dim=16)
    with pytest.raises(TransportError, match="^gradfix: the task vector is for zoo:vit-w16-l2-h4"):
        apply(al, TaskVector.zeros_like(other), 1.0, {})
    with pytest.raises(TransportError, match="^gradfix: unknown variant 'flip'"):
        apply(al, rand_tau(), 1.0, {"variant": "flip"})
    with pytest.raises(TransportError, match="^gradfix needs labelled data"):
        prepare(TransportInputs(model(2), model(1)), {})
    with pytest.raises(TransportError, match="^gradfix: unknown vote 'median'"):
        prepare(TransportInputs(model(2), model(1), digits_task("rot90")), {"vote": "median"})
    info = get_method("gradfix")
    assert info.same_arch and info.data == "labelled" and info.options["vote"] == "majority"


def test_automatic_micro_batch_fits_the_memory_budget():
    from transport.families.open_clip import open_clip_arch
    from transport.methods.gradfix import auto_micro_batch

    big = open_clip_arch("ViT-B-16")
    meta = {k: torch.empty(v.shape, device="meta") for k, v in param_axes(big).items()}
    pixels = torch.zeros(20, 3, 1, 1)
    assert auto_micro_batch(meta, list(meta), pixels, big) == 1  # 344 MB gradients + ~175 MB activations per sample
    tiny = {k: torch.empty(v.shape, device="meta") for k, v in param_axes(ARCH).items()}
    assert auto_micro_batch(tiny, list(tiny), pixels, ARCH) == 20


def test_gradfix_on_transfusion_composes_exactly(task, tmp_path):
    """``on``: GradFix's mask applied to TransFusion's pi(tau), both alignments prepared on the same inputs."""
    from transport.methods import transfusion
    from transport.pipeline import transfer

    src = model(2)
    ft = src.with_params(rand_tau().apply_to(src.params), "tiny2-ft")
    tgt = model(1)
    kw = dict(task=task, shots=2, seed=0, alpha=1.0, cache_dir=tmp_path, evaluate=False)
    composed = transfer(src, ft, tgt, "gradfix", on="transfusion", **kw)
    tau = TaskVector.from_models(src.params, ft.params, src.arch)
    al_tf = transfusion.align(src.params, tgt.params, src.arch)
    al_gf = prepare(TransportInputs(src, tgt, task, 2, 0), {})
    want = apply(al_gf, transfusion.apply(al_tf, tau), 1.0, {})
    assert composed.transported.allclose(want) and composed.options["on"] == "transfusion"
    plain = transfer(src, ft, tgt, "gradfix", **kw)  # differs: the mask now meets tau, not pi(tau)
    assert not composed.transported.allclose(plain.transported)
    with pytest.raises(TransportError, match="^cannot compose gradfix with itself$"):
        transfer(src, ft, tgt, "gradfix", on="gradfix", **kw)


def test_votes_do_not_depend_on_threads_or_micro_batch(task):
    """One sample per worker (micro-batch 1, any number of workers) gives byte-identical votes and mean
    gradients; vmap micro-batches give the same vote."""
    target = model(1, torch.float64)
    start = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            for mb in (1, 3):
                torch.set_num_threads(threads)
                runs[threads, mb] = prepare(inputs(target, task, shots=1), {"micro_batch": mb})
                assert torch.get_num_threads() == threads  # restored after the vote
    finally:
        torch.set_num_threads(start)
    a = runs[1, 1]
    for key, b in runs.items():
        for k in a.counts:
            assert torch.equal(a.counts[k], b.counts[k]), (key, k)
            torch.testing.assert_close(a.grad[k], b.grad[k], atol=1e-12, rtol=1e-9)
            if key[1] == 1:
                assert torch.equal(a.grad[k], b.grad[k]), (key, k)
        assert b.mean_loss == pytest.approx(a.mean_loss, rel=1e-12)
