"""Task-vector algebra, files, and naive transport = theta_B + alpha * tau exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from transport import __version__
from transport.core.layout import param_axes
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.sources import from_canonical, load_task_vector, save_task_vector, to_canonical
from transport.data import digits_task
from transport.errors import TransportError
from transport.core.evaluate import accuracy
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.stems import preprocess
from transport.core.model import Model
from transport.pipeline import transfer
from transport.core.task_vector import TaskVector

ARCH = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:tv-tiny")
WIDE = tiny_arch(width=64, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:tv-wide")


def _params(arch, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    tower = build_open_clip_tower(arch)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return to_canonical(tower.state_dict(), arch)


def _tau(seed: int, arch=ARCH) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector(arch, {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in param_axes(arch).items()})


def test_from_models_is_the_difference():
    pre, ft = _params(ARCH, 0), _params(ARCH, 1)
    tau = TaskVector.from_models(pre, ft, ARCH)
    assert set(tau.keys()) == set(param_axes(ARCH))
    assert all(torch.equal(tau[k], ft[k] - pre[k]) for k in pre)
    assert all(torch.allclose(v, ft[k], atol=1e-7, rtol=0) for k, v in tau.apply_to(pre, 1.0).items())
    bad = dict(ft)
    bad["head.proj"] = torch.full_like(bad["head.proj"], float("inf"))
    with pytest.raises(TransportError, match="fine-tuned model: tensor head.proj contains NaN or Inf"):
        TaskVector.from_models(pre, bad, ARCH)


def test_algebra_elementwise():
    a, b, c = _tau(0), _tau(1), _tau(2)
    for k in a:
        assert torch.equal((a + b)[k], a[k] + b[k])
        assert torch.equal((a - b)[k], a[k] - b[k])
        assert torch.equal((-a)[k], -a[k])
        assert torch.equal((0.5 * a)[k], a[k] * 0.5) and torch.equal((a * 0.5)[k], a[k] * 0.5)
        assert torch.equal((a / 4)[k], a[k] * 0.25)
        assert torch.equal(sum([a, b, c])[k], (a[k] + b[k]) + c[k])
    assert (a + a).allclose(2 * a)
    assert ((a + b) - b).allclose(a, atol=1e-7)
    assert (a - a).norm() == 0.0
    assert a.dot(a) == pytest.approx(a.norm() ** 2, rel=1e-9)
    assert (2 * a).norm() == pytest.approx(2 * a.norm(), rel=1e-9)
    with pytest.raises(TypeError):
        a * torch.ones(1)  # scalars only
    with pytest.raises(TypeError):
        a + 1.0


def test_mismatched_architectures_refuse_to_combine():
    a, w = _tau(0), _tau(0, WIDE)
    with pytest.raises(TransportError, match="task vectors do not match: zoo:tv-tiny vs zoo:tv-wide"):
        a + w
    with pytest.raises(TransportError, match="task vectors do not match"):
        a.dot(w)
    with pytest.raises(TransportError, match="task vector does not fit the model: .* is \\(64"):
        a.apply_to(_params(WIDE, 0))
    with pytest.raises(TransportError, match="unknown tensor names for zoo:tv-tiny: blocks.9.attn.q.weight"):
        TaskVector(ARCH, {"blocks.9.attn.q.weight": torch.zeros(32, 32)})
    with pytest.raises(TransportError, match=r"shape mismatch for embed.cls: got \(3,\)"):
        TaskVector(ARCH, {"embed.cls": torch.zeros(3)})


def test_apply_to_is_exact_and_leaves_the_model_alone():
    theta = _params(ARCH, 3)
    before = {k: v.clone() for k, v in theta.items()}
    tau = _tau(4)
    out = tau.apply_to(theta, alpha=0.37)
    assert all(torch.equal(out[k], theta[k] + 0.37 * tau[k]) for k in theta)
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_restrict_and_per_layer_norms():
    tau = _tau(5)
    only1 = tau.restrict({1})
    info = param_axes(ARCH)
    for k, v in only1.items():
        if info[k].layer == 0:
            assert not v.any()
        else:
            assert torch.equal(v, tau[k])
    norms = tau.per_layer_norms()
    assert set(norms) == {-1, 0, 1}
    assert sum(n ** 2 for n in norms.values()) == pytest.approx(tau.norm() ** 2, rel=1e-9)
    assert only1.per_layer_norms()[0] == 0.0


def test_save_load_round_trip_with_metadata(tmp_path):
    tau = _tau(6)
    path = save_task_vector(tau, tmp_path / "tau.safetensors", method="naive", source="zoo:A", target="zoo:B", alpha="0.5")
    back = load_task_vector(path)
    assert back.arch == ARCH
    assert all(torch.equal(back[k], tau[k]) for k in tau)
    assert back.meta["method"] == "naive" and back.meta["target"] == "zoo:B" and back.meta["alpha"] == "0.5"
    assert back.meta["transport_version"] == __version__
    # a plain safetensors reader sees open_clip's own names, q/k/v re-fused
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        fused = f.get_tensor("transformer.resblocks.1.attn.in_proj_weight")
        md = f.metadata()
    assert keys == set(from_canonical(tau.tensors, ARCH))
    assert torch.equal(fused, torch.cat([tau["blocks.1.attn.q.weight"], tau["blocks.1.attn.k.weight"],
                                         tau["blocks.1.attn.v.weight"]]))
    assert md["format"] == "transport.task_vector" and md["source"] == "zoo:A"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    tau = _tau(7)
    sd = {k: v.contiguous() for k, v in from_canonical(tau.tensors, ARCH).items()}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    with pytest.raises(TransportError, match="no architecture in the file's metadata; pass --arch"):
        load_task_vector(tmp_path / "bare.safetensors")
    assert load_task_vector(tmp_path / "bare.safetensors", ARCH).allclose(tau)
    save_file({**sd, "foo": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(TransportError, match="unexpected keys for zoo:tv-tiny: foo"):
        load_task_vector(tmp_path / "extra.safetensors", ARCH)
    with pytest.raises(TransportError, match="unexpected keys|shape mismatch|missing keys"):
        load_task_vector(tmp_path / "bare.safetensors", WIDE)
    with pytest.raises(TransportError, match="file not found"):
        load_task_vector(tmp_path / "nope.safetensors")


def _model(seed: int, head: Classifier, ref: str) -> Model:
    return Model(ARCH, _params(ARCH, seed), ref=ref, head=head)


def test_naive_transport_is_theta_b_plus_alpha_tau_exactly():
    torch.manual_seed(0)
    head = Classifier(torch.randn(10, 16), normalize=True, logit_scale=10.0)
    pre, ft, tgt = _model(0, head, "A"), _model(1, head, "A_ft"), _model(2, head, "B")
    res = transfer(pre, ft, tgt, "naive", alpha=0.7)
    theta = res.transported.apply_to(tgt.params, res.alpha)
    for k in tgt.params:
        assert torch.equal(res.transported[k], ft.params[k].float() - pre.params[k].float())
        assert torch.equal(theta[k], tgt.params[k] + 0.7 * (ft.params[k] - pre.params[k]))
    # with a task, alpha is chosen on validation and the reported accuracy is that of theta_B + alpha * tau
    task = digits_task("rot90")
    res = transfer(pre, ft, tgt, "naive", task=task, alpha_grid=[0.0, 0.5, 1.0])
    assert res.alpha in (0.0, 0.5, 1.0) and res.sweep is not None
    assert res.sweep.best_val == max(res.sweep.val)
    tau = TaskVector.from_models(pre.params, ft.params, ARCH)
    want = accuracy(tgt, task, "test", tau.apply_to(tgt.params, res.alpha))
    assert res.accuracies["naive"] == want
    assert res.accuracies["zero_shot_target"] == accuracy(tgt, task, "test")
    x = preprocess(ARCH, task.split("test")[0][:4])
    assert torch.equal(encode(theta, ARCH, x), encode(TaskVector.from_models(pre.params, ft.params, ARCH)
                                                     .apply_to(tgt.params, 0.7), ARCH, x))
