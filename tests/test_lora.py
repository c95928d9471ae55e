"""LoRA adapters as low-rank task vectors: PEFT adapters of tiny Hugging Face models (built here, nothing
downloaded) read, moved by TransFusion / Theseus as factors, re-factorised after GradFix, written for the
target and loaded back with peft."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from transport.cli import main  # noqa: E402
from transport.core.lowrank import truncated  # noqa: E402
from transport.data import Task  # noqa: E402
from transport.errors import TransportError  # noqa: E402
from transport.lora import read_adapter, transport_lowrank  # noqa: E402
from transport.lora_run import adapter_outputs, adapter_source, transfer_adapter  # noqa: E402
from transport.lora_write import adapter_files  # noqa: E402
from transport.methods import TransportInputs, get_method  # noqa: E402
from transport.sources import load_model, load_task_vector, to_canonical  # noqa: E402
from safetensors import safe_open  # noqa: E402

F64 = torch.float64
VIT_LORA = ["q_proj", "v_proj", "o_proj", "fc1", "fc2"]


# ----------------------------------------------------------------------------------------------
# tiny models and adapters
# ----------------------------------------------------------------------------------------------
def vit(seed: int, width: int = 32, mlp: int = 64):
    cfg = transformers.ViTConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=mlp, image_size=8, patch_size=2, num_labels=10)
    torch.manual_seed(seed)
    m = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # no zero-initialised tensors: every check below is meaningful
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def llama(seed: int):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=8, intermediate_size=48, vocab_size=64, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def attach_lora(model, directory: Path, seed: int = 0, **config) -> None:
    """A random PEFT LoRA on ``model`` (lora_B non-zero, trained-looking biases / saved modules), saved."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(directory))
    pm.unload()  # the caller's model is left as it was (no LoRA layers)


def merged(model_dir: Path, adapter_dir: Path, cls=None):
    cls = cls or transformers.ViTForImageClassification
    base = cls.from_pretrained(str(model_dir)).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()


def noise_task(n: int = 60, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 10
    return Task("noise", [str(i) for i in range(10)], {"train": (x, y), "val": (x[:20], y[:20]), "test": (x, y)})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """Source A, same-width target B, wider target W; an adapter of A on five module kinds (rank 4)."""
    root = tmp_path_factory.mktemp("lora")
    for name, seed, width, mlp in (("A", 0, 32, 64), ("B", 1, 32, 64), ("W", 2, 48, 96)):
        vit(seed, width, mlp).save_pretrained(str(root / name))
    attach_lora(vit(0), root / "lora", r=4, lora_alpha=8, target_modules=VIT_LORA)
    return root


def write(files: dict[str, bytes], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def run(method: str, A, T, task=None, **options):
    info = get_method(method)
    opts = info.resolve(options)
    return info, info.prepare(TransportInputs(A, T, task, 2, 0, "cpu"), opts, lambda f, m: None), opts


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def test_adapter_round_trip_dense_is_scaled_BA(vits):
    A = load_model(str(vits / "A"))
    ad = read_adapter(vits / "lora", A)
    assert ad.prefix == "vit." and ad.ranks == [4] and len(ad.modules) == 10 and ad.outside == []
    f = safe_open(str(vits / "lora" / "adapter_model.safetensors"), "pt")
    for l in range(2):
        for peft_name, canon in (("attention.q_proj", "attn.q"), ("attention.o_proj", "attn.o"), ("mlp.fc1", "mlp.fc1")):
            key = f"base_model.model.vit.layers.{l}.{peft_name}"
            BA = f.get_tensor(key + ".lora_B.weight").double() @ f.get_tensor(key + ".lora_A.weight").double()
            assert rel(ad.tau.factors[f"blocks.{l}.{canon}.weight"].dense(), BA * 8 / 4) < 1e-6
    # and it is what peft itself merges into the model
    sd = merged(vits / "A", vits / "lora")
    ft = to_canonical(sd, A.arch)
    tau = ad.tau.to_task_vector().tensors
    for k in A.params:
        want = ft[k] - A.params[k]
        if k in tau:
            assert (tau[k] - want).abs().max() < 1e-6, k
        else:
            assert torch.equal(want, torch.zeros_like(want)), k


def test_rank_and_alpha_patterns_and_rslora(vits, tmp_path):
    A = load_model(str(vits / "A"))
    attach_lora(vit(0), tmp_path / "pat", r=4, lora_alpha=8, target_modules=VIT_LORA, use_rslora=True,
                rank_pattern={"fc1": 2}, alpha_pattern={"layers.1.attention.v_proj": 3})
    ad = read_adapter(tmp_path / "pat", A)
    fac = ad.tau.factors
    assert fac["blocks.0.mlp.fc1.weight"].rank == 2 and fac["blocks.0.attn.q.weight"].rank == 4
    assert fac["blocks.0.mlp.fc1.weight"].scale == pytest.approx(8 / math.sqrt(2))
    assert fac["blocks.1.attn.v.weight"].scale == pytest.approx(3 / 2) and fac["blocks.0.attn.v.weight"].scale == 4
    ft = to_canonical(merged(vits / "A", tmp_path / "pat"), A.arch)
    tau = ad.tau.to_task_vector().tensors
    assert max(float((ft[k] - A.params[k] - tau[k]).abs().max()) for k in tau) < 1e-6


# ----------------------------------------------------------------------------------------------
# transport: factors == dense; the written adapter loads and merges to target + tau
# ----------------------------------------------------------------------------------------------
def check_written(files, report, target_dir: Path, target, dense, out: Path, atol=2e-6):
    write(files, out)
    sd = merged(target_dir, out)
    got = to_canonical(sd, target.arch)
    for k, p in target.params.items():
        want = p + dense.get(k, torch.zeros_like(p))
        assert (got[k] - want).abs().max() <= atol, k
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == target.ref
    return cfg


def test_transfusion_moves_factors_exactly(vits, tmp_path):
    A, B = load_model(str(vits / "A")), load_model(str(vits / "B"))
    ad = read_adapter(vits / "lora", A)
    info, al, opts = run("transfusion", A, B)
    moved = transport_lowrank(ad.tau, [(info, al, opts)], B.arch)
    dense = info.apply(al, ad.tau.to_task_vector(), 1.0, opts).tensors
    assert set(moved.factors) == set(ad.tau.factors) and not moved.densified
    for k, f in moved.factors.items():
        assert f.rank == 4 and torch.allclose(f.dense(), dense[k], rtol=0, atol=1e-6), k
    assert sum(not torch.equal(al.perms[s], torch.arange(len(al.perms[s]))) for s in al.perms
               if isinstance(al.perms[s], torch.Tensor)) > 0  # a real permutation was applied
    files, report = adapter_files(ad, moved, B)
    assert len(report["exact_low_rank"]) == 10 and report["refactorised"] == {} and report["ranks"] == [4]
    cfg = check_written(files, report, vits / "B", B, moved.tensors(), tmp_path / "out")
    assert sorted(cfg["target_modules"]) == sorted(f"vit.layers.{l}.{m}" for l in range(2) for m in
                                                   ("attention.q_proj", "attention.v_proj", "attention.o_proj",
                                                    "mlp.fc1", "mlp.fc2")) and cfg["r"] == 4


def test_theseus_across_widths_keeps_rank_and_takes_target_shapes(vits, tmp_path):
    A, W = load_model(str(vits / "A")), load_model(str(vits / "W"))
    ad = read_adapter(vits / "lora", A)
    info, al, opts = run("theseus", A, W, noise_task())
    moved = transport_lowrank(ad.tau, [(info, al, opts)], W.arch)
    dense = info.apply(al, ad.tau.to_task_vector(), 1.0, opts).tensors
    assert set(moved.factors) == set(ad.tau.factors)
    for k, f in moved.factors.items():
        assert f.rank == 4 and f.shape == tuple(W.params[k].shape) and rel(f.dense(), dense[k]) < 1e-5, k
    assert moved.factors["blocks.0.mlp.fc1.weight"].shape == (96, 48)
    files, report = adapter_files(ad, moved, W)
    assert report["refactorised"] == {} and len(report["exact_low_rank"]) == 10
    check_written(files, report, vits / "W", W, moved.tensors(), tmp_path / "out")


def test_gradfix_refactorisation_error_is_the_svd_tail(vits, tmp_path):
    A, B = load_model(str(vits / "A")), load_model(str(vits / "B"))
    ad = read_adapter(vits / "lora", A)
    info, al, opts = run("gradfix", A, B, noise_task())
    moved = transport_lowrank(ad.tau, [(info, al, opts)], B.arch)
    dense = info.apply(al, ad.tau.to_task_vector(), 1.0, opts).tensors
    assert not moved.factors and set(moved.densified) == set(ad.tau.factors)
    files, report = adapter_files(ad, moved, B, rank=2)
    assert report["exact_low_rank"] == [] and len(report["refactorised"]) == 10 and report["ranks"] == [2]
    for row in report["modules"]:
        D = dense[row["tensors"][0]].double()
        s = torch.linalg.svdvals(D)
        tail = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert 0.05 < tail < 1  # a sign mask is not low rank: the truncation really loses something
        assert row["svd_tail"] == pytest.approx(tail, rel=1e-9)
        assert row["rel_error"] == pytest.approx(tail, rel=1e-4)
    # the adapter holds exactly the truncated updates
    want = {k: truncated(v, 2, 8 / 2).factors.dense() for k, v in dense.items() if k in moved.densified}
    check_written(files, report, vits / "B", B, want, tmp_path / "r2")
    # full rank is exact
    files, report = adapter_files(ad, moved, B, rank="full")
    assert max(report["refactorised"].values()) < 1e-6
    check_written(files, report, vits / "B", B, moved.tensors(), tmp_path / "full", atol=1e-5)


def test_gradfix_on_transfusion_composes_and_matches_the_pipeline(vits):
    A, B = load_model(str(vits / "A")), load_model(str(vits / "B"))
    ad, ft = adapter_source(str(vits / "lora"), A)
    r = transfer_adapter(ad, A, ft, B, "gradfix", on="transfusion", task=noise_task(), alpha=1.0, evaluate=False)
    files, section = adapter_outputs(r, B, rank="full")
    assert section["factor_vs_dense"] < 1e-6 and len(section["refactorised"]) == 10
    f = r.moved.tensors()
    for k, t in r.result.transported.tensors.items():
        assert torch.allclose(f.get(k, torch.zeros_like(t)), t, rtol=0, atol=1e-6), k


def test_bias_all_and_modules_to_save_are_dense_updates(vits, tmp_path):
    A, B = load_model(str(vits / "A")), load_model(str(vits / "B"))
    attach_lora(vit(0), tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj", "fc2"], bias="lora_only",
                modules_to_save=["layernorm", "classifier"])
    ad = read_adapter(tmp_path / "ad", A)
    assert set(ad.tau.dense) == {"blocks.0.attn.q.bias", "blocks.1.attn.q.bias", "blocks.0.mlp.fc2.bias",
                                 "blocks.1.mlp.fc2.bias", "ln_post.weight", "ln_post.bias"}
    assert ad.outside == ["classifier.bias", "classifier.weight"]  # the head is not transported
    ft = to_canonical(merged(vits / "A", tmp_path / "ad"), A.arch)
    tau = ad.tau.to_task_vector().tensors
    assert max(float((ft[k] - A.params[k] - tau.get(k, 0)).abs().max()) for k in A.params) < 1e-6
    info, al, opts = run("transfusion", A, B)
    moved = transport_lowrank(ad.tau, [(info, al, opts)], B.arch)
    files, report = adapter_files(ad, moved, B)
    assert "classifier.weight" in report["not_transported"]
    cfg = check_written(files, report, vits / "B", B, moved.tensors(), tmp_path / "out")
    assert cfg["modules_to_save"] == ["vit.layernorm"] and cfg["bias"] == "lora_only"


def test_llama_adapter_moves_and_loads(tmp_path):
    for name, seed in (("A", 0), ("B", 1)):
        llama(seed).save_pretrained(str(tmp_path / name))
    attach_lora(llama(0), tmp_path / "lora", r=3, lora_alpha=6,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    A, B = load_model(str(tmp_path / "A")), load_model(str(tmp_path / "B"))
    ad = read_adapter(tmp_path / "lora", A)
    assert len(ad.modules) == 14 and ad.prefix == ""
    info, al, opts = run("transfusion", A, B)
    moved = transport_lowrank(ad.tau, [(info, al, opts)], B.arch)
    dense = info.apply(al, ad.tau.to_task_vector(), 1.0, opts).tensors
    assert all(torch.allclose(f.dense(), dense[k], rtol=0, atol=1e-6) for k, f in moved.factors.items())
    files, report = adapter_files(ad, moved, B)
    assert len(report["exact_low_rank"]) == 14
    write(files, tmp_path / "out")
    got = to_canonical(merged(tmp_path / "B", tmp_path / "out", transformers.LlamaForCausalLM), B.arch)
    assert max(float((got[k] - B.params[k] - dense.get(k, 0)).abs().max()) for k in B.params) < 2e-6


def test_gpt2_fused_conv1d_round_trip(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "A"))
    torch.manual_seed(0)
    attach_lora(transformers.GPT2LMHeadModel(cfg), tmp_path / "lora", r=2, lora_alpha=4,
                target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    A = load_model(str(tmp_path / "A"))
    ad = read_adapter(tmp_path / "lora", A)
    assert {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"} <= set(ad.tau.factors)
    ft = to_canonical(merged(tmp_path / "A", tmp_path / "lora", transformers.GPT2LMHeadModel), A.arch)
    tau = ad.tau.to_task_vector().tensors
    assert max(float((ft[k] - A.params[k] - tau.get(k, 0)).abs().max()) for k in A.params) < 1e-6
    # written back for the same model: q, k, v re-fuse into one c_attn module sharing lora_A
    files, report = adapter_files(ad, ad.tau, A)
    assert len(report["exact_low_rank"]) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    write(files, tmp_path / "out")
    again = to_canonical(merged(tmp_path / "A", tmp_path / "out", transformers.GPT2LMHeadModel), A.arch)
    assert max(float((again[k] - ft[k]).abs().max()) for k in A.params) < 1e-6


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------
def cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args] + (["--no-progress"] if args and args[0] == "run" else []))
    return rc, out.getvalue(), err.getvalue()


def test_cli_writes_the_target_adapter_and_reports_it(vits, tmp_path):
    base = ["run", "--source-pre", vits / "A", "--source-ft", vits / "lora", "--target", vits / "B",
            "--method", "transfusion", "--alpha", "1.5"]
    rc, out, err = cli(*base, "--out", tmp_path / "o")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "report.json"]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())["lora"]
    assert len(rep["exact_low_rank"]) == 10 and rep["refactorised"] == {} and rep["ranks"] == [4]
    assert "multiply lora_alpha and alpha_pattern by 1.5" in out
    md = safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), "pt").metadata()
    assert md["alpha"] == "1.5" and md["format"] == "pt"
    # --task-vector takes the adapter too; --dense-task-vector adds the dense file, equal to the adapter's update
    rc, out, err = cli(*base[:3], "--task-vector", vits / "lora", *base[5:], "--dense-task-vector", "--out",
                       tmp_path / "d")
    assert rc == 0, err
    B = load_model(str(vits / "B"))
    tv = load_task_vector(tmp_path / "d" / "task_vector.safetensors")
    got = to_canonical(merged(vits / "B", tmp_path / "d"), B.arch)
    assert max(float((got[k] - B.params[k] - tv.tensors[k]).abs().max()) for k in B.params) < 2e-6
    assert (tmp_path / "d" / "adapter_config.json").read_bytes() == (tmp_path / "o" / "adapter_config.json").read_bytes()
    # --force replaces an adapter output this tool wrote; the same inputs give the same bytes
    first = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    rc, _, err = cli(*base, "--out", tmp_path / "o", "--force")
    assert rc == 0, err
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == first


def image_folder(data: Path, per_class: int = 4) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(10):  # the models' heads have 10 classes
        (data / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(data / f"c{c}" / f"{i}.png")
    return data


def test_cli_gradfix_rank_is_the_users(vits, tmp_path):
    data = image_folder(tmp_path / "data")
    base = ["run", "--source-pre", vits / "A", "--source-ft", vits / "lora", "--target", vits / "B",
            "--method", "gradfix", "--data", data, "--alpha", "1"]
    rc, out, err = cli(*base, "--adapter-rank", "3", "--out", tmp_path / "o")
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())["lora"]
    assert rep["ranks"] == [3] and len(rep["refactorised"]) == 10 and rep["max_rel_error"] > 0
    assert "truncation: largest relative error" in out
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 3


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def edit_adapter(src: Path, dst: Path, config=None, drop=(), add=None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if not any(d in k for d in drop)}
    t.update(add or {})
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_refused_variants_are_one_line(vits, tmp_path):
    src = vits / "lora"
    q0 = "base_model.model.vit.layers.0.attention.q_proj"
    cases = {
        "dora": ({"use_dora": True}, (), None, "DoRA (use_dora) is not supported"),
        "ia3": ({"peft_type": "IA3"}, (), None, 'peft_type "IA3" is not supported (only LORA adapters are)'),
        "rank": ({"r": 8}, (), None, "has rank 4 but adapter_config.json gives it 8"),
        "nob": ({}, (q0 + ".lora_B",), None, "module vit.layers.0.attention.q_proj has no lora_B.weight"),
        "emb": ({}, (), {"base_model.model.vit.embeddings.lora_embedding_A": torch.zeros(4, 3)},
                "LoRA on an embedding is not supported"),
        "whole": ({}, (), {"base_model.model.vit.layernorm.weight": torch.ones(32)},
                  "holds whole tensors (vit.layernorm.weight) but adapter_config.json has bias 'none'"),
        "shape": ({}, (q0 + ".lora_A",), {q0 + ".lora_A.weight": torch.zeros(4, 16)},
                  "do not fit layers.0.attention.q_proj.weight"),
        "nan": ({}, (q0 + ".lora_B",), {q0 + ".lora_B.weight": torch.full((32, 4), float("nan"))},
                "lora_B.weight contains NaN or Inf values"),
    }
    base = ["run", "--source-pre", vits / "A", "--target", vits / "B", "--method", "naive", "--alpha", "1"]
    for name, (cfg, drop, add, msg) in cases.items():
        d = edit_adapter(src, tmp_path / name, cfg, drop, add)
        rc, _, err = cli(*base, "--source-ft", d, "--out", tmp_path / f"o-{name}")
        assert rc == 2 and msg in one_line(err), (name, err)
        assert not (tmp_path / f"o-{name}").exists()
    # flags that need an adapter input, a bad rank, an adapter where a model is expected
    rc, _, err = cli("run", "--source-pre", vits / "A", "--source-ft", vits / "A", "--target", vits / "B",
                     "--method", "naive", "--adapter-rank", "2", "--out", tmp_path / "x")
    assert rc == 2 and "--adapter-rank is only for a LoRA adapter" in one_line(err)
    rc, _, err = cli(*base, "--source-ft", src, "--adapter-rank", "zero", "--out", tmp_path / "x")
    assert rc == 2 and "--adapter-rank: expected same, full or a positive integer, got 'zero'" in one_line(err)
    rc, _, err = cli("run", "--source-pre", src, "--source-ft", src, "--target", vits / "B", "--method", "naive",
                     "--out", tmp_path / "x")
    assert rc == 2 and "a PEFT LoRA adapter, not a model" in one_line(err)
    # an adapter of another model: the wider W
    rc, _, err = cli("run", "--source-pre", vits / "W", "--source-ft", src, "--target", vits / "W", "--method",
                     "naive", "--alpha", "1", "--out", tmp_path / "x")
    assert rc == 2 and "do not fit" in one_line(err)
    with pytest.raises(TransportError, match="rank must be >= 1"):
        truncated(torch.ones(3, 3), 0)


def test_app_reads_an_adapter_source_and_reports_the_rank_kept(vits, tmp_path):
    from app import logic

    data = str(image_folder(tmp_path / "data", per_class=6))
    setup = logic.Setup(logic.ModelRef(str(vits / "A")), logic.ModelRef(str(vits / "lora"), task_vector=True),
                        logic.ModelRef(str(vits / "B")), data)
    cache = logic.MemoryCache()
    tf = logic.run_transfer(setup, "transfusion", shots=2, cache=cache, alpha=1.0)
    assert tf.loaded.adapter is not None and logic.rank_kept(tf) == "4 (exact)"
    gf = logic.run_transfer(setup, "gradfix", shots=2, cache=cache, alpha=1.0)
    kept = logic.rank_kept(gf)
    assert kept.startswith("4 (SVD, error 0.") and kept.endswith(")")
    import dataclasses

    plain = dataclasses.replace(tf, loaded=dataclasses.replace(tf.loaded, adapter=None), memo={})
    assert logic.rank_kept(plain) == ""  # not an adapter source: no rank column entry


def test_app_compare_page_shows_the_rank_kept(vits, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("TRANSPORT_ZOO_DIR", str(tmp_path / "no-zoo"))
    monkeypatch.setenv("TRANSPORT_TEXT_ZOO_DIR", str(tmp_path / "no-text-zoo"))
    monkeypatch.setenv("TRANSPORT_APP_DIR", str(tmp_path / "app-out"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=240).run()
    for key, ref in (("src", vits / "A"), ("tgt", vits / "B")):
        at.selectbox(key=f"{key}-kind").set_value("Hugging Face").run()
        at.text_input(key=f"{key}-hf").set_value(str(ref)).run()
    at.selectbox(key="ft-kind").set_value("task-vector file").run()
    at.text_input(key="ft-path").set_value(str(vits / "lora")).run()
    at.radio(key="task-kind").set_value("ImageFolder directory").run()
    at.text_input(key="task-dir").set_value(str(image_folder(tmp_path / "data", per_class=6))).run()
    at.text_input(key="setup-grid").set_value("0:2:3").run()
    at.switch_page("views/compare.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.multiselect(key="cmp-methods").set_value(["transfusion"]).run()
    at.button(key="cmp-run").click().run()
    job = at.session_state["job"] if "job" in at.session_state else None
    assert job is None or job.join(240)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    rows = dict(zip(table["model"], table["LoRA rank kept"]))
    assert [v for k, v in rows.items() if "transfusion" in str(k).lower()] == ["4 (exact)"]


@pytest.mark.parametrize("field", sorted(__import__("transport.lora", fromlist=["REFUSED"]).REFUSED))
def test_every_refused_config_field_is_one_line(vits, tmp_path, field):
    from transport.lora import REFUSED, read_config

    d = edit_adapter(vits / "lora", tmp_path / "a", {field: {"x": 1} if field.endswith("_config") else True})
    with pytest.raises(TransportError) as e:
        read_config(d)
    assert str(e.value) == f"{d / 'adapter_config.json'}: {REFUSED[field]}" and "\n" not in str(e.value)


def test_open_clip_tower_linear_lora_reads_and_attention_lora_is_refused(tmp_path):
    from transport.core.model import Model
    from transport.families.open_clip import build_open_clip_tower, tiny_arch
    from transport.sources import save_model

    arch = tiny_arch(32, 2, 4, output_dim=16)
    torch.manual_seed(0)
    save_model(Model(arch, to_canonical(build_open_clip_tower(arch).state_dict(), arch), "A"), tmp_path / "A.safetensors")
    A = load_model(str(tmp_path / "A.safetensors"))
    for name, modules in (("mlp", ["c_fc", "c_proj"]), ("attn", ["attn", "c_fc"])):
        torch.manual_seed(0)
        attach_lora(build_open_clip_tower(arch), tmp_path / name, r=2, lora_alpha=4, target_modules=modules)
    ad = read_adapter(tmp_path / "mlp", A)
    assert sorted(ad.tau.factors) == [f"blocks.{l}.mlp.{f}.weight" for l in range(2) for f in ("fc1", "fc2")]
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(build_open_clip_tower(arch), str(tmp_path / "mlp"))
    ft = to_canonical(pm.merge_and_unload().state_dict(), arch)
    tau = ad.tau.to_task_vector().tensors
    assert max(float((ft[k] - A.params[k] - tau.get(k, 0)).abs().max()) for k in A.params) < 1e-6
    with pytest.raises(TransportError, match=r"transformer\.resblocks\.0\.attn: LoRA on a multi-head attention "
                                             r"module is not supported") as e:
        read_adapter(tmp_path / "attn", A)
    assert "\n" not in str(e.value)
