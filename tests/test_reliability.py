"""Nothing lost, nothing silently wrong: --force and --out, exact one-line errors instead of tracebacks,
the cache's content hashes, pickles, data that cannot be honoured, text towers in files, task-vector
forms, unlabelled data and byte-identical outputs."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from collections import UserDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transport.core.arch import CLIP_MEAN
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.sources import from_canonical, to_canonical
from transport.cli import main
from transport.data import DIGIT_NAMES, load_image_folder
from transport.errors import TransportError, TransportWarning
from transport.core.heads import Classifier
from transport.files import read_checkpoint, write_safetensors
from transport.sources import load_model, save_model
from transport.core.model import Model
from transport.core.task_vector import TaskVector

ARCH = tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:rel-tiny")
WIDE = tiny_arch(width=64, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:rel-wide")
SHAPES = ["circle", "cross", "square"]
REPO = Path(__file__).resolve().parents[1]


def _params(arch, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    tower = build_open_clip_tower(arch)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return to_canonical(tower.state_dict(), arch)


def _head(classes: list[str], seed: int) -> Classifier:
    g = torch.Generator().manual_seed(seed)
    return Classifier(torch.randn(len(classes), 16, generator=g), normalize=True, logit_scale=10.0,
                      classnames=list(classes))


def _images(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Noisy 12x12 shapes; ``per_class`` maps a class folder ('' = straight into root) to a count."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    masks = [(yy - 5.5) ** 2 + (xx - 5.5) ** 2 < 16, (abs(yy - 5.5) < 1.5) | (abs(xx - 5.5) < 1.5),
             (abs(yy - 5.5) < 4) & (abs(xx - 5.5) < 4)]
    for c, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(masks[c % 3][..., None] * 200 + rng.normal(0, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name or 'img'}{i}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny open_clip towers as files: A, A fine-tuned, B (10-class digit head, and a 3-class head: '3'),
    the same without any head ('_bare'), W (wider); a labelled and an unlabelled image folder."""
    d = tmp_path_factory.mktemp("rel_models")
    out: dict[str, Path] = {}
    pre = _params(ARCH, 0)
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    b = _params(ARCH, 2)
    for name, params in (("A", pre), ("A_ft", ft), ("B", b)):
        out[name] = save_model(Model(ARCH, params, ref=name, head=_head(DIGIT_NAMES, 7)), d / f"{name}.safetensors")
        out[name + "3"] = save_model(Model(ARCH, params, ref=name, head=_head(SHAPES, 7)), d / f"{name}3.safetensors")
        out[name + "_bare"] = save_model(Model(ARCH, params, ref=name), d / f"{name}_bare.safetensors")
    out["W"] = save_model(Model(WIDE, _params(WIDE, 3), ref="W", head=_head(DIGIT_NAMES, 7)), d / "W.safetensors")
    out["shapes"] = _images(d / "shapes", {c: 12 for c in SHAPES})
    out["loose"] = _images(d / "loose", {"": 12})
    return out


def _run(args: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args] + (["--no-progress"] if args and args[0] == "run" else []))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _base(files, out, **over) -> list:
    args = {"--source-pre": files["A"], "--source-ft": files["A_ft"], "--target": files["B"], "--method": "naive",
            "--out": out}
    args.update(over)
    flat: list = ["run"]
    for k, v in args.items():
        if v is None:
            continue
        flat += [k] if v is True else [k, v]
    return flat


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def no_transfer(monkeypatch):
    """The pipeline's transfer replaced by a call counter: a check 'before computing' must not reach it."""
    import transport.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "transfer", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("transfer must not run")))
    return calls


# ----------------------------------------------------------------------------------------------
# 2. --out and --force
# ----------------------------------------------------------------------------------------------
def test_out_equal_to_or_containing_an_input_or_the_cwd_is_refused(files, tmp_path, capsys, monkeypatch):
    models = files["A"].parent
    before = sorted(p.name for p in models.iterdir())
    rc, _, err = _run(_base(files, models, **{"--force": True}), capsys)
    assert rc == 2 and err == (f"error: --out {models}: contains the input --source-pre {files['A']}; "
                               "choose another output directory\n")
    rc, _, err = _run(_base(files, files["shapes"], **{"--force": True, "--data": files["shapes"],
                                                       "--source-pre": files["A3"], "--source-ft": files["A_ft3"],
                                                       "--target": files["B3"]}), capsys)
    assert rc == 2 and err.startswith(f"error: --out {files['shapes']}: is the input --data {files['shapes']}")
    cache = Path(os.environ["TRANSPORT_CACHE_DIR"])
    rc, _, err = _run(_base(files, cache, **{"--force": True}), capsys)
    assert rc == 2 and err == f"error: --out {cache}: is the cache directory {cache}; choose another output directory\n"
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    rc, _, err = _run(_base(files, ".", **{"--force": True}), capsys)
    assert rc == 2 and err == "error: --out .: is the working directory; choose another output directory\n"
    rc, _, err = _run(_base(files, "..", **{"--force": True}), capsys)
    assert rc == 2 and err == "error: --out ..: contains the working directory; choose another output directory\n"
    # a task vector read from an earlier run's directory: that directory is not replaced by the new run
    run = tmp_path / "run"
    assert _run(_base(files, run), capsys)[0] == 0
    tv = run / "task_vector.safetensors"
    rc, _, err = _run(_base(files, run, **{"--force": True, "--source-ft": None, "--task-vector": tv}), capsys)
    assert rc == 2 and err == (f"error: --out {run}: contains the input --task-vector {tv}; "
                               "choose another output directory\n")
    assert sorted(p.name for p in models.iterdir()) == before and (work / "mine.txt").read_text() == "keep"


def test_out_writability_is_checked_before_computing(files, tmp_path, capsys, monkeypatch, no_transfer):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = _run(_base(files, blocker / "sub" / "out"), capsys)
    assert rc == 2 and err == f"error: --out {blocker / 'sub' / 'out'}: {blocker} is not a directory\n"
    # a read-only directory, as the file system reports it (root bypasses permission bits, so the
    # refusal is simulated where it comes from: creating the probe directory)
    import transport.cli as cli

    ro = tmp_path / "readonly"
    ro.mkdir()
    real = cli.tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(cli.tempfile, "mkdtemp", mkdtemp)
    rc, _, err = _run(_base(files, ro / "out"), capsys)
    assert rc == 2 and err == f"error: --out {ro / 'out'}: cannot write in {ro} (Read-only file system)\n"
    assert no_transfer == [] and not (ro / "out").exists()


def test_out_in_a_really_read_only_directory(files, capsys, no_transfer):
    """/sys is read-only for every user on Linux, root included."""
    try:
        os.mkdir("/sys/transport-probe")
        os.rmdir("/sys/transport-probe")
        pytest.skip("/sys is writable here")
    except FileNotFoundError:
        pytest.skip("no /sys")
    except OSError:
        pass
    rc, _, err = _run(_base(files, "/sys/transport-out"), capsys)
    assert rc == 2 and err.startswith("error: --out /sys/transport-out: cannot write in /sys (")
    assert err.count("\n") == 1 and no_transfer == []


# ----------------------------------------------------------------------------------------------
# 5. no traceback, ever
# ----------------------------------------------------------------------------------------------
def test_an_unexpected_failure_is_one_line_and_a_saved_traceback(files, tmp_path, capsys, monkeypatch):
    import transport.pipeline as pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("boom in the pipeline")

    monkeypatch.setattr(pipeline, "transfer", boom)
    rc, out, err = _run(_base(files, tmp_path / "o"), capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1
    prefix = "error: unexpected ZeroDivisionError: boom in the pipeline (traceback saved to "
    assert err.startswith(prefix) and err.endswith(")\n")
    saved = Path(err[len(prefix):-2])
    assert saved.parent == Path(os.environ["TRANSPORT_CACHE_DIR"]) / "crashes"
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: boom in the pipeline" in text
    assert "command: python -m transport run" in text and not (tmp_path / "o").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (what a decompression bomb looks like to a reader)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_data_gives_one_line(files, tmp_path, capsys, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(files["shapes"], data)
    common = {"--source-pre": files["A3"], "--source-ft": files["A_ft3"], "--target": files["B3"], "--data": data}
    for seed in ("-1", str(2**64)):
        rc, _, err = _run(_base(files, tmp_path / "o", **common, **{"--seed": seed}), capsys)
        assert rc == 2 and err == f"error: --seed must be in 0..{2**63 - 1} (2**63 - 1), got {seed}\n"
    bomb = data / "cross" / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))
    rc, _, err = _run(_base(files, tmp_path / "o", **common), capsys)
    assert rc == 2 and err.startswith(f"error: {bomb}: refusing to decode, a possible decompression bomb (Image size "
                                      "(400000000 pixels) exceeds limit")
    assert err.count("\n") == 1
    bomb.unlink()
    locked = data / "square"  # as the OS answers a folder without read permission (root would bypass chmod)
    real = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    rc, _, err = _run(_base(files, tmp_path / "o", **common), capsys)
    assert rc == 2 and err == f"error: {locked}: cannot read the folder (Permission denied)\n"
    assert not (tmp_path / "o").exists()


def test_an_unwritable_cache_runs_without_it(files, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("TRANSPORT_CACHE_DIR", str(blocker / "cache"))
    out = tmp_path / "o"
    rc, _, err = _run(_base(files, out, **{"--method": "transfusion", "--alpha": "1"}), capsys)
    assert rc == 0, err
    assert err == (f"warning: cache directory {blocker / 'cache'} is not writable (Not a directory); "
                   "running without the cache\n")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "task_vector.safetensors"]


def test_store_on_a_read_only_cache_warns_and_the_run_goes_on(files, tmp_path, monkeypatch):
    import transport.cache as cache
    from transport.pipeline import prepare
    from transport.methods import TransportInputs

    a, b = load_model(str(files["A"])), load_model(str(files["B"]))

    def read_only(*args, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache.tempfile, "mkdtemp", read_only)
    with pytest.warns(TransportWarning, match=r"cache directory .* is not writable \(Read-only file system\); "
                                              "running without the cache"):
        prep = prepare("transfusion", TransportInputs(a, b), cache_dir=tmp_path)
    assert not prep.cache_hit and prep.alignment.perms
    assert not (tmp_path / "alignments").exists() or not any((tmp_path / "alignments").iterdir())


# ----------------------------------------------------------------------------------------------
# 3. the cache's content hashes
# ----------------------------------------------------------------------------------------------
def _flip_one_value(path: Path, prefix: str) -> str:
    """Flip the lowest bit of the first value of the first tensor named ``prefix...`` in a safetensors file."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k.startswith(prefix) and header[k]["data_offsets"][1] > header[k]["data_offsets"][0])[0]
    raw[8 + n + header[name]["data_offsets"][0]] ^= 1
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("method,file,prefix", [("gradfix", "votes.safetensors", "counts/"),
                                                ("theseus", "theseus.safetensors", "map/")])
def test_one_flipped_value_in_a_cache_entry_is_caught(method, file, prefix, files, tmp_path):
    from transport.data import digits_task
    from transport.methods import TransportInputs, get_method
    from transport.pipeline import prepare

    a, b = load_model(str(files["A"])), load_model(str(files["B" if method == "gradfix" else "W"]))
    inputs = TransportInputs(a, b, digits_task("rot90"), 2, 0)
    opts = {"calib_size": 8} if method == "theseus" else {}
    fresh = prepare(method, inputs, opts, cache_dir=tmp_path)
    entry = tmp_path / "alignments" / fresh.key
    f = next(entry.rglob(file))
    name = _flip_one_value(f, prefix)
    info = get_method(method)
    poisoned = info.load_alignment(entry)  # the file still reads: only the hash can tell
    held = poisoned.counts if method == "gradfix" else poisoned.maps
    key = name[len(prefix):]
    want = fresh.alignment.counts[key] if method == "gradfix" else fresh.alignment.maps[key]
    assert not torch.equal(held[key], want)
    with pytest.warns(TransportWarning, match=rf"cache entry {entry} is corrupted \({file} does not match its "
                                              r"recorded sha256\); recomputing it"):
        again = prepare(method, inputs, opts, cache_dir=tmp_path)
    assert not again.cache_hit
    now = again.alignment.counts if method == "gradfix" else again.alignment.maps
    assert all(torch.equal(now[k], v) for k, v in (fresh.alignment.counts if method == "gradfix"
                                                   else fresh.alignment.maps).items())
    third = prepare(method, inputs, opts, cache_dir=tmp_path)  # the recomputed entry replaced the bad one
    assert third.cache_hit


def test_an_alignment_of_other_code_is_never_served(files, tmp_path, monkeypatch):
    import transport.cache as cache
    from transport.methods import TransportInputs
    from transport.pipeline import prepare

    inputs = TransportInputs(load_model(str(files["A"])), load_model(str(files["B"])))
    first = prepare("transfusion", inputs, cache_dir=tmp_path)
    assert prepare("transfusion", inputs, cache_dir=tmp_path).cache_hit
    monkeypatch.setattr(cache, "code_version", lambda: "an upgraded package")
    upgraded = prepare("transfusion", inputs, cache_dir=tmp_path)
    assert not upgraded.cache_hit and upgraded.key != first.key


def test_the_code_version_follows_every_source_file_and_nothing_else(tmp_path):
    from transport.cache import code_version

    pkg = tmp_path / "pkg"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "m.py").write_text("X = 1\n")
    v0 = code_version.__wrapped__(pkg)
    (pkg / "methods" / "notes.txt").write_text("not code")
    (pkg / "methods" / "__pycache__").mkdir()
    (pkg / "methods" / "__pycache__" / "m.cpython.pyc").write_bytes(b"\0")
    assert code_version.__wrapped__(pkg) == v0
    (pkg / "methods" / "m.py").write_text("X = 2\n")
    v1 = code_version.__wrapped__(pkg)
    assert v1 != v0
    (pkg / "methods" / "m.py").rename(pkg / "n.py")  # same bytes, another module
    assert code_version.__wrapped__(pkg) not in (v0, v1)


# ----------------------------------------------------------------------------------------------
# 4. pickles
# ----------------------------------------------------------------------------------------------
def _tower_sd(seed: int = 6) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in from_canonical(_params(ARCH, seed), ARCH).items()}


def test_a_pickle_that_runs_code_is_named_by_its_global(tmp_path, monkeypatch):
    sd = _tower_sd()
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "hook": os.system}, evil)  # references posix.system; nothing calls it
    msg = f"{evil}: this file runs code when loaded (GLOBAL posix.system); pass --trust-pickle only if you trust it"
    with pytest.raises(TransportError) as e:
        load_model(str(evil), ARCH)
    assert str(e.value) == msg
    # found from the exception's type and the file's opcodes, whatever torch's message says
    real = torch.load

    def terse(*a, **k):
        if k.get("weights_only"):
            raise pickle.UnpicklingError("weights-only load refused this file")
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", terse)
    with pytest.raises(TransportError) as e:
        load_model(str(evil), ARCH)
    assert str(e.value) == msg


def test_trust_pickle_loads_a_blocked_but_harmless_global(tmp_path):
    sd = _tower_sd()
    f = tmp_path / "userdict.pt"
    torch.save(UserDict(sd), f)  # weights_only refuses collections.UserDict; loading it runs nothing harmful
    with pytest.raises(TransportError) as e:
        load_model(str(f), ARCH)
    assert str(e.value) == (f"{f}: this file runs code when loaded (GLOBAL collections.UserDict); "
                            "pass --trust-pickle only if you trust it")
    m = load_model(str(f), ARCH, trust_pickle=True)
    want = to_canonical(sd, ARCH)
    assert all(torch.equal(m.params[k], want[k]) for k in want)


def test_a_raw_pickle_is_one_line_without_torch_warnings(tmp_path):
    sd = _tower_sd()
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as fh:
        pickle.dump(sd, fh)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TransportError) as e:
            read_checkpoint(raw)
    assert [str(w.message) for w in seen] == []
    assert str(e.value) == (f"{raw}: this file runs code when loaded (GLOBAL torch.storage._load_from_bytes); "
                            "pass --trust-pickle only if you trust it")
    back, _ = read_checkpoint(raw, trust_pickle=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------------------------
# 6. nothing silently wrong
# ----------------------------------------------------------------------------------------------
def test_integer_weights_are_refused(tmp_path):
    sd = _tower_sd()
    sd["conv1.weight"] = (sd["conv1.weight"] * 100).to(torch.int64)
    save_file(sd, str(tmp_path / "int.safetensors"))
    with pytest.raises(TransportError) as e:
        load_model(str(tmp_path / "int.safetensors"), ARCH)
    assert str(e.value) == (f"{tmp_path / 'int.safetensors'}: tensor conv1.weight holds int64 values; "
                            "weights must be floating point")
    params = _params(ARCH, 0)
    params["embed.cls"] = params["embed.cls"].to(torch.int32)
    with pytest.raises(TransportError, match="tensor embed.cls holds int32 values; weights must be floating point"):
        Model(ARCH, params, ref="m")


def test_arch_contradicting_the_file_is_refused_naming_both_values(files, tmp_path, capsys):
    wrong = dataclasses.replace(ARCH, act="quick_gelu", mean=CLIP_MEAN)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(wrong.to_json())
    rc, _, err = _run(_base(files, tmp_path / "o", **{"--arch": arch_file}), capsys)
    assert rc == 2 and err == (f"error: {files['A']}: --arch zoo:rel-tiny contradicts the architecture the file "
                               "records (zoo:rel-tiny): act gelu in the file, quick_gelu by --arch; "
                               f"mean (0.5, 0.5, 0.5) in the file, {CLIP_MEAN} by --arch\n")
    assert load_model(str(files["A"]), dataclasses.replace(ARCH, name="open_clip:same")).arch.act == "gelu"


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path):
    from PIL import Image

    g = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "d" / "deep").mkdir(parents=True)
    (tmp_path / "d" / "float").mkdir()
    Image.fromarray(g).save(tmp_path / "d" / "deep" / "a.png")
    Image.fromarray(f).save(tmp_path / "d" / "float" / "b.tif")
    task = load_image_folder(tmp_path / "d", image_size=8)
    x, y = task.split("train")
    deep, flt = x[y == 0][0], x[y == 1][0]
    assert Image.open(tmp_path / "d" / "deep" / "a.png").mode == "I;16"
    assert torch.allclose(deep, torch.from_numpy(g / 65535.0).float().expand(3, 8, 8), atol=1e-7, rtol=0)
    assert torch.equal(flt, torch.from_numpy(f).expand(3, 8, 8))
    Image.fromarray(f * 2).save(tmp_path / "d" / "float" / "b.tif")
    with pytest.raises(TransportError, match=r"b.tif: floating-point image with values in \[0, 2\]; expected "
                                             r"intensities in \[0, 1\]"):
        load_image_folder(tmp_path / "d", image_size=8)


def test_more_shots_than_images_records_the_real_counts(files, tmp_path, capsys):
    out = tmp_path / "g"
    rc, stdout, err = _run(_base(files, out, **{"--source-pre": files["A3"], "--source-ft": files["A_ft3"],
                                                "--target": files["B3"], "--data": files["shapes"],
                                                "--method": "gradfix", "--shots": "100", "--alpha": "1"}), capsys)
    assert rc == 0, err
    assert err.splitlines()[0] == ("warning: --shots 100: the train split holds fewer images for 3 of 3 classes; "
                                   "using 7..7 per class (report.json: shots_per_class)")
    assert all(w.startswith("warning: the ") and "split has only" in w for w in err.splitlines()[1:])  # tiny splits
    report = json.loads((out / "report.json").read_text())
    assert report["shots_per_class"] == {"circle": 7, "cross": 7, "square": 7}
    assert report["diagnostics"]["n_samples"] == 21  # what the vote really used
    assert "labelled shots per class: 7 (asked for 100)" in stdout


def test_alphas_must_stay_finite_in_float32(files, tmp_path, capsys):
    cases = {("--alpha", "1e39"): "error: --alpha: 1e+39 is outside float32's range (largest 3.403e+38)\n",
             ("--alpha-grid", "nan:nan:3"): "error: --alpha-grid: LO and HI must be finite numbers, got 'nan:nan:3'\n",
             ("--alpha-grid", "0:inf:3"): "error: --alpha-grid: LO and HI must be finite numbers, got '0:inf:3'\n"}
    for (flag, value), want in cases.items():
        rc, _, err = _run(_base(files, tmp_path / "o", **{flag: value, "--task": "rot90"}), capsys)
        assert (rc, err) == (2, want)
    # representable, but theta + alpha * tau would overflow
    rc, _, err = _run(_base(files, tmp_path / "o", **{"--alpha": "3e38"}), capsys)
    assert rc == 2 and err.startswith("error: alpha 3e+38 is too large: theta + alpha * tau could overflow float32 (")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# 7. text towers in files, unlabelled data, task-vector forms
# ----------------------------------------------------------------------------------------------
TINY_OC = "transport-rel-tiny"
TINY_OC_CFG = {"embed_dim": 16, "quick_gelu": False,
               "vision_cfg": {"image_size": 8, "layers": 2, "width": 32, "patch_size": 2, "head_width": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


@pytest.fixture
def tiny_oc(monkeypatch):
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY_OC, json.loads(json.dumps(TINY_OC_CFG)))
    return TINY_OC


def test_a_full_clip_file_keeps_its_text_tower_for_zero_shot_heads(tiny_oc, tmp_path):
    from transport.families import open_clip as openclip
    from transport.sources import parse_arch

    ref = openclip.load_open_clip(f"open_clip:{tiny_oc}:none", seed=3)
    clip, _ = openclip.create_open_clip(tiny_oc, "", seed=3)
    full = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(full, str(tmp_path / "clip.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "clip.pt")
    names = ["cat", "dog", "car"]
    want = ref.zero_shot(names)
    for f in ("clip.safetensors", "clip.pt"):
        m = load_model(str(tmp_path / f), parse_arch(f"open_clip:{tiny_oc}"))
        head = m.classifier(names)
        assert torch.equal(head.weight, want.weight) and head.logit_scale == want.logit_scale, f
        assert head.normalize and head.classnames == names
        assert all(torch.equal(m.params[k], ref.params[k]) for k in ref.params)
    bad = dict(full, **{"ln_final.weight": torch.ones(7)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    m = load_model(str(tmp_path / "bad.safetensors"), parse_arch(f"open_clip:{tiny_oc}"))
    with pytest.raises(TransportError, match=r"bad.safetensors: the text tower does not fit "
                                             rf"open_clip:{tiny_oc}: size mismatch for ln_final.weight"):
        m.classifier(names)


def test_gradfix_on_full_clip_files_with_an_image_folder(tiny_oc, files, tmp_path, capsys):
    from transport.families import open_clip as openclip

    paths = {}
    for name, seed, shift in (("pre", 3, 0.0), ("ft", 3, 0.02), ("tgt", 4, 0.0)):
        clip, _ = openclip.create_open_clip(tiny_oc, "", seed=seed)
        sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
        g = torch.Generator().manual_seed(9)
        sd = {k: (v + shift * torch.randn(v.shape, generator=g) if k.startswith("visual.") else v) for k, v in sd.items()}
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    out = tmp_path / "gf"
    rc, stdout, err = _run(["run", "--source-pre", paths["pre"], "--source-ft", paths["ft"], "--target", paths["tgt"],
                            "--arch", f"open_clip:{tiny_oc}", "--method", "gradfix", "--data", files["shapes"],
                            "--shots", "2", "--alpha", "1", "--out", out], capsys)
    assert rc == 0, err
    acc = json.loads((out / "report.json").read_text())["accuracies"]
    assert set(acc) >= {"gradfix", "zero_shot_target", "naive", "source_finetuned"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())


@pytest.mark.parametrize("method,extra", [("naive", []), ("transfusion", ["--matching", "activation"]),
                                          ("theseus", ["--calib-size", "8"])])
def test_unlabelled_images_need_no_head(method, extra, files, tmp_path, capsys):
    out = tmp_path / method
    args = _base(files, out, **{"--source-pre": files["A_bare"], "--source-ft": files["A_ft_bare"],
                                "--target": files["B_bare"], "--method": method, "--data": files["loose"]}) + extra
    rc, stdout, err = _run(args, capsys)
    assert rc == 0, err
    assert err == f"note: {files['loose']} holds images without classes: no accuracy table (alpha = 1)\n"
    report = json.loads((out / "report.json").read_text())
    assert report["accuracies"] == {} and report["alpha"] == 1.0 and report["alpha_source"] == "default"
    assert "wrote" in stdout


def test_gradfix_refuses_unlabelled_images(files, tmp_path, capsys):
    rc, _, err = _run(_base(files, tmp_path / "o", **{"--method": "gradfix", "--data": files["loose"]}), capsys)
    assert rc == 2 and err == ("error: gradfix needs labelled data: loose holds images without classes (give an "
                               "ImageFolder with one sub-folder per class)\n")
    task = load_image_folder(files["loose"], image_size=8)
    assert not task.labelled and len(task.split("train")[0]) == 12


def test_task_vectors_in_every_checkpoint_form(files, tmp_path, capsys):
    pre, ft = load_model(str(files["A"])), load_model(str(files["A_ft"]))
    tau = TaskVector.from_models(pre.params, ft.params, ARCH)
    fam = {k: v.contiguous() for k, v in from_canonical(tau.tensors, ARCH).items()}
    text = {"token_embedding.weight": torch.zeros(10, 8), "ln_final.weight": torch.zeros(8)}
    blocks = {k: v for k, v in fam.items() if k.startswith("transformer.")}
    forms = {
        "clip_names.safetensors": {**{f"visual.{k}": v for k, v in fam.items()}, **text},
        "image_classifier.safetensors": {**{f"image_encoder.model.visual.{k}": v for k, v in fam.items()},
                                         "classification_head.weight": torch.zeros(3, 16),
                                         "classification_head.bias": torch.zeros(3)},
        "blocks_only.safetensors": {f"visual.{k}": v for k, v in blocks.items()},
    }
    for name, sd in forms.items():
        save_file(sd, str(tmp_path / name))
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in fam.items()}}, tmp_path / "wrapped.pt")
    ref = tmp_path / "ref"
    assert _run(_base(files, ref, **{"--alpha": "1"}), capsys)[0] == 0
    want = _tensors(ref / "task_vector.safetensors")
    for name in list(forms) + ["wrapped.pt"]:
        out = tmp_path / name.replace(".", "_")
        rc, _, err = _run(_base(files, out, **{"--alpha": "1", "--source-ft": None, "--task-vector": tmp_path / name,
                                               "--arch": files["A"]}), capsys)
        assert rc == 0, (name, err)
        got = _tensors(out / "task_vector.safetensors")
        for k, v in want.items():
            expect = v if name != "blocks_only.safetensors" or k.startswith("transformer.") else torch.zeros_like(v)
            assert torch.allclose(got[k], expect, atol=1e-7, rtol=0), (name, k)
        if name == "blocks_only.safetensors":
            absent = len(fam) - len(blocks)
            assert err == (f"note: {tmp_path / name}: {absent} of the {len(fam)} tensors of zoo:rel-tiny are absent "
                           "from the task vector and read as zero (e.g. conv1.weight)\n")
        else:
            assert err == "", (name, err)


def test_an_image_classifier_checkpoint_gives_its_tower_and_head(files, tmp_path):
    """WiSE-FT / task_vectors: ``image_encoder.model.visual.*`` plus ``classification_head.*``."""
    a = load_model(str(files["A"]))
    fam = {k: v.contiguous() for k, v in from_canonical(a.params, ARCH).items()}
    w, b = torch.randn(3, 16), torch.randn(3)
    sd = {**{f"image_encoder.model.visual.{k}": v for k, v in fam.items()},
          "image_encoder.model.logit_scale": torch.tensor(4.6), "classification_head.weight": w,
          "classification_head.bias": b}
    torch.save(sd, tmp_path / "classifier.pt")
    m = load_model(str(tmp_path / "classifier.pt"), ARCH)
    assert all(torch.equal(m.params[k], a.params[k]) for k in a.params)
    assert m.head.normalize and torch.equal(m.head.weight, w) and torch.equal(m.head.bias, b)
    f = torch.randn(5, 16)
    assert torch.allclose(m.head(f), torch.nn.functional.normalize(f, dim=-1) @ w.t() + b)


# ----------------------------------------------------------------------------------------------
# 8. byte-identical files
# ----------------------------------------------------------------------------------------------
def test_write_safetensors_is_readable_and_depends_only_on_content(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"b": torch.randn(3, 4, generator=g), "a": torch.arange(5), "h": torch.randn(7, generator=g).bfloat16(),
         "z": torch.zeros(0, 3), "s": torch.tensor(2.5), "m": torch.tensor([True, False])}
    md = {"zeta": "1", "alpha": "é", "arch": "{}"}
    one = write_safetensors(tmp_path / "one.safetensors", t, md)
    two = write_safetensors(tmp_path / "two.safetensors", dict(reversed(list(t.items()))), dict(reversed(list(md.items()))))
    assert one.read_bytes() == two.read_bytes()
    with safe_open(str(one), framework="pt") as f:
        assert f.metadata() == md and set(f.keys()) == set(t)
        assert all(torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype for k, v in t.items())
    from safetensors.torch import load_file

    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp_path / "theirs.safetensors"), metadata=md)
    theirs = tmp_path / "theirs.safetensors"
    n_ours, n_theirs = (int.from_bytes(p.read_bytes()[:8], "little") for p in (one, theirs))
    assert one.read_bytes()[8 + n_ours:] == theirs.read_bytes()[8 + n_theirs:]  # the same data layout
    assert set(load_file(str(one))) == set(t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "theirs.safetensors", "two.safetensors"]


_TWICE = r"""
import json, sys
from transport.cli import main
from transport.sources import load_model, save_model
for args in json.loads(sys.argv[1]):
    if main(args + ["--no-progress"]) != 0:
        sys.exit(1)
save_model(load_model(sys.argv[2]), sys.argv[3])
"""


def test_two_runs_of_each_method_write_identical_bytes(files, tmp_path):
    """Separate processes (safetensors' own writer orders the metadata differently in each)."""
    runs = {"naive": ["--source-pre", files["A"], "--source-ft", files["A_ft"], "--target", files["B"]],
            "transfusion": ["--source-pre", files["A"], "--source-ft", files["A_ft"], "--target", files["B"]],
            "gradfix": ["--source-pre", files["A3"], "--source-ft", files["A_ft3"], "--target", files["B3"],
                        "--data", files["shapes"], "--shots", "2"],
            "theseus": ["--source-pre", files["A"], "--source-ft", files["A_ft"], "--target", files["W"],
                        "--task", "rot90", "--calib-size", "8"]}
    results = []
    for i in range(2):
        root = tmp_path / f"p{i}"
        args = [["run", *map(str, a), "--method", m, "--alpha", "1", "--out", str(root / m)] for m, a in runs.items()]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSPORT_CACHE_DIR": str(root / "cache")}
        p = subprocess.run([sys.executable, "-c", _TWICE, json.dumps(args), str(files["A"]), str(root / "model.safetensors")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        results.append({str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*.safetensors"))})
    first, second = results
    assert set(first) == set(second)
    assert sum(1 for k in first if k.endswith("task_vector.safetensors")) == 4
    assert sum(1 for k in first if k.startswith("cache/")) >= 3  # permutations, votes, maps
    for name in first:
        assert first[name] == second[name], name
