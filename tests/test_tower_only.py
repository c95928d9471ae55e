"""Moving a tower alone: source and target towers that differ only in their output projection (--tower-only)."""
from __future__ import annotations

import pytest
import torch

from transport import sources
from transport.core.heads import Classifier
from transport.core.layout import param_axes
from transport.core.model import Model
from transport.core.symmetry import apply_permutation, random_permutation
from transport.core.task_vector import TaskVector
from transport.data import digits_task
from transport.errors import TransportError
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.methods.gradfix import invariant_tensors
from transport.pipeline import transfer
from transport.sources import to_canonical

SRC = tiny_arch(width=32, layers=2, heads=4, output_dim=16, name="zoo:src")
PROJ = "head.proj"


def tower(arch, seed: int) -> dict[str, torch.Tensor]:
    """open_clip's random init, LayerNorms and biases perturbed so they carry signal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = to_canonical(build_open_clip_tower(arch).state_dict(), arch)
    g = torch.Generator().manual_seed(seed + 1000)
    for k, info in param_axes(arch).items():
        if info.is_bias or info.block in ("ln_pre", "ln1", "ln2", "ln_post"):
            params[k] = params[k] + 0.1 * torch.randn(info.shape, generator=g)
    return params


def rand_tau(arch, seed: int) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector(arch, {k: 0.02 * torch.randn(i.shape, generator=g) for k, i in param_axes(arch).items()})


def planted(output_dim: int):
    """Source (pre, ft, Pi, tau) and a target = a hidden symmetry Pi of the source's tower with its own
    projection of ``output_dim`` (0: none)."""
    A = tower(SRC, 0)
    tau = rand_tau(SRC, 7)
    Pi = random_permutation(SRC, seed=13, kinds=("res", "mlp", "heads", "within"))
    B = apply_permutation(A, Pi, SRC)
    tarch = SRC.replace(output_dim=output_dim, name="zoo:tgt")
    B = {k: v for k, v in B.items() if k in param_axes(tarch) and k != PROJ}
    if output_dim:
        B[PROJ] = 0.1 * torch.randn(SRC.width, output_dim, generator=torch.Generator().manual_seed(5))
    pre, ft = Model(SRC, A, "A"), Model(SRC, tau.apply_to(A), "A_ft")
    tau = TaskVector.from_models(pre.params, ft.params, SRC)  # bit for bit what the transfer moves
    return pre, ft, Model(tarch, B, "B"), Pi, tau


@pytest.mark.parametrize("output_dim", [24, 0])
def test_transfusion_recovers_a_planted_permutation_on_the_tower_alone(output_dim):
    pre, ft, target, Pi, tau = planted(output_dim)
    with pytest.raises(TransportError, match=r"pass --tower-only to move the tower alone"):
        transfer(pre, ft, target, "transfusion", alpha=1.0, use_cache=False)
    # visiting order 1: with order 0 coordinate ascent stops at a local optimum on this 2-layer tower
    # (objective 411 of 458, last block off) whether or not the tower moves alone
    r = transfer(pre, ft, target, "transfusion", options={"seed": 1}, alpha=1.0, use_cache=False, tower_only=True)
    shared_sq = sum(float((v.double() ** 2).sum()) for k, v in pre.params.items() if k != PROJ)
    assert r.diagnostics["objective_per_sweep"][-1] == pytest.approx(shared_sq, rel=1e-5)  # <B, pi(A)> at its max
    want = apply_permutation(tau.tensors, Pi, SRC)
    shared = [k for k in want if k != PROJ]
    assert all(torch.equal(r.transported.tensors[k], want[k]) for k in shared)
    assert r.transported.arch == target.arch
    if output_dim:
        assert torch.equal(r.transported.tensors[PROJ], torch.zeros(SRC.width, output_dim))
    else:
        assert PROJ not in r.transported.tensors
    left = r.report()["diagnostics"]["tower_only"]["left_out"]
    assert list(left) == [PROJ]
    assert ("update left at zero" if output_dim else "dropped") in left[PROJ]
    assert any(w.startswith("tower only: left out of the transport: head.proj (") for w in r.warnings)


def test_naive_at_alpha_one_is_tau_on_the_shared_tensors_and_zero_on_the_projection():
    pre, ft, target, _, tau = planted(24)
    r = transfer(pre, ft, target, "naive", alpha=1.0, use_cache=False, tower_only=True)
    assert all(torch.equal(r.transported.tensors[k], tau.tensors[k]) for k in tau.tensors if k != PROJ)
    assert torch.equal(r.transported.tensors[PROJ], torch.zeros(SRC.width, 24))


def test_tower_only_refuses_towers_that_differ_in_more_than_the_projection():
    pre, ft, _, _, _ = planted(24)
    wide = SRC.replace(width=64, output_dim=24, name="zoo:wide")
    with pytest.raises(TransportError, match=r"^--tower-only: A and W differ in more than the output projection "
                                             r"\(width 32 vs 64, head_dim 8 vs 16, output_dim 16 vs 24\)"):
        transfer(pre, ft, Model(wide, tower(wide, 3), "W"), "naive", alpha=1.0, use_cache=False, tower_only=True)


def test_gradfix_mask_covers_only_the_shared_tensors_and_evaluation_uses_the_targets_projection():
    task = digits_task("rot90")
    arch = tiny_arch(width=32, layers=2, heads=4, output_dim=16, name="zoo:g-src")
    tarch = arch.replace(output_dim=12, name="zoo:g-tgt")
    A, B = tower(arch, 1), tower(tarch, 2)
    g = torch.Generator().manual_seed(7)
    head = Classifier(torch.randn(10, 12, generator=g), normalize=True, logit_scale=10.0,
                      classnames=[f"c{i}" for i in range(10)])
    src_head = Classifier(torch.randn(10, 16, generator=g), normalize=True, logit_scale=10.0,
                          classnames=[f"c{i}" for i in range(10)])
    pre, ft = Model(arch, A, "A", head=src_head), Model(arch, rand_tau(arch, 3).apply_to(A), "A_ft", head=src_head)
    tau = TaskVector.from_models(pre.params, ft.params, arch)
    target = Model(tarch, B, "B", head=head)
    r = transfer(pre, ft, target, "gradfix", task=task, alpha=1.0, use_cache=False, tower_only=True)
    passed = r.diagnostics["no_grad"]
    assert PROJ in passed and set(passed) == set(invariant_tensors(tarch)) | {PROJ}
    assert torch.equal(r.transported.tensors[PROJ], torch.zeros(32, 12))
    masked = [k for k in tau.tensors if k not in passed]
    assert masked and any(not torch.equal(r.transported.tensors[k], tau.tensors[k]) for k in masked)
    assert set(r.accuracies) >= {"zero_shot_target", "gradfix", "naive", "source_finetuned"}


def test_tower_only_output_loads_strictly_into_the_targets_own_module(tmp_path):
    """An HF CLIP vision tower with a projection of 12 as the target of an open_clip tower with one of 16."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    module = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=128, image_size=8, patch_size=2,
                                                            projection_dim=12)).eval()
    module.save_pretrained(str(tmp_path / "target"))
    target = sources.load_hf(str(tmp_path / "target"))
    arch = target.arch.replace(output_dim=16, family="open_clip", name="zoo:src")
    A = tower(arch, 0)
    tau = rand_tau(arch, 4)
    r = transfer(Model(arch, A, "A"), Model(arch, tau.apply_to(A), "A_ft"), target, "naive", alpha=1.0,
                 use_cache=False, tower_only=True)
    path = sources.save_task_vector(r.transported, tmp_path / "task_vector.safetensors", target.meta)
    from safetensors.torch import load_file
    written = load_file(str(path))
    theta = module.state_dict()
    assert set(written) <= set(theta)
    module.load_state_dict({k: v + written[k] if k in written else v for k, v in theta.items()}, strict=True)
    proj = [k for k in written if "visual_projection" in k]
    assert proj and all(torch.equal(written[k], torch.zeros_like(written[k])) for k in proj)


@pytest.mark.parametrize("keys, hint", [
    (["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
     "--arch hf:ORG/NAME, a model directory or a config.json"),
    (["h.0.attn.c_attn.weight", "wte.weight"], "--arch hf:ORG/NAME, a model directory or a config.json"),
    (["conv1.weight", "transformer.resblocks.0.attn.in_proj_weight"], "e.g. open_clip:ViT-B-16"),
])
def test_a_file_without_architecture_gets_an_arch_hint_that_fits_its_keys(keys, hint, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(TransportError) as e:
        sources.load_model(str(path))
    assert str(e.value) == f"{path}: the file does not say its architecture; pass --arch ({hint})"


def test_cli_tower_only_names_the_flag_writes_the_targets_names_and_says_what_was_left_out(tmp_path, capsys):
    import json

    from safetensors import safe_open

    from transport.cli import main
    from transport.sources import from_canonical, save_model

    pre, ft, target, _, tau = planted(0)  # the target has no projection
    paths = {n: save_model(m, tmp_path / f"{n}.safetensors") for n, m in (("A", pre), ("A_ft", ft), ("B", target))}
    args = ["run", "--source-pre", paths["A"], "--source-ft", paths["A_ft"], "--target", paths["B"],
            "--method", "naive", "--alpha", "1", "--no-progress", "--out"]
    assert main([str(a) for a in args + [tmp_path / "refused"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in output_dim 16 vs 0 only" in err and "pass --tower-only" in err
    assert main([str(a) for a in args + [tmp_path / "out", "--tower-only"]]) == 0
    err = capsys.readouterr().err
    assert ("tower only: left out of the transport: head.proj (the target has no output projection "
            "(source (32, 16)): dropped)") in err
    with safe_open(str(tmp_path / "out" / "task_vector.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    want = from_canonical({k: v for k, v in tau.tensors.items() if k != PROJ}, target.arch)
    assert set(written) == set(want) and "proj" not in written
    assert all(torch.equal(written[k], want[k]) for k in want)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["diagnostics"]["tower_only"]["left_out"]) == [PROJ]


def test_app_setup_moves_the_tower_alone_when_asked(tmp_path):
    from dataclasses import replace

    from app import logic
    from transport.sources import save_model

    names = [f"c{i}" for i in range(10)]
    g = torch.Generator().manual_seed(9)
    pre, ft, target, Pi, tau = planted(24)

    def head(dim: int) -> Classifier:
        return Classifier(torch.randn(10, dim, generator=g), normalize=True, logit_scale=10.0, classnames=names)

    src_head = head(16)
    paths = {n: save_model(m, tmp_path / f"{n}.safetensors") for n, m in (
        ("A", Model(pre.arch, pre.params, "A", head=src_head)), ("A_ft", Model(ft.arch, ft.params, "A_ft", head=src_head)),
        ("B", Model(target.arch, target.params, "B", head=head(24))))}
    setup = logic.Setup(*(logic.ModelRef(str(paths[n])) for n in ("A", "A_ft", "B")), "rot90")
    cache = logic.MemoryCache()
    assert "pass --tower-only to move the tower alone" in logic.incompatibility(
        "transfusion", logic.load_setup(setup, cache))
    moved = replace(setup, tower_only=True)
    assert moved.signature() != setup.signature()
    assert logic.incompatibility("transfusion", logic.load_setup(moved, cache)) == ""
    run = logic.run_transfer(moved, "transfusion", {"seed": 1}, alpha=1.0, cache=cache)
    want = apply_permutation(tau.tensors, Pi, SRC)
    assert all(torch.equal(run.result.transported.tensors[k], want[k]) for k in want if k != PROJ)
    assert torch.equal(run.result.transported.tensors[PROJ], torch.zeros(SRC.width, 24))
    assert any(w.startswith("tower only: left out of the transport: head.proj") for w in run.result.warnings)
    assert {"zero_shot_target", "transfusion", "naive"} <= set(run.result.accuracies)
