"""Models streamed from their safetensors files (``load_model(..., stream=True)``): the same tensors as a
resident load, read block by block with at most two blocks held, bad files refused in one line, and
Theseus's prepare on streamed models giving byte-identical maps while reading each block once per stage."""
from __future__ import annotations

import pytest
import torch
from planted_decoders import decoder, identity_block, model, planted, text_task

from transport.core.model import Model
from transport.core.streamed import StreamedParams, group_of
from transport.errors import TransportError
from transport.files import read_safetensors, write_safetensors
from transport.methods import TransportInputs
from transport.methods import theseus
from transport.sources import load_model, save_model

torch.set_num_threads(1)
A_ARCH = decoder(layers=6, family="hf_qwen2", name="hf:test-qwen", context=64, qkv_bias=True)
WIDE = decoder(layers=6, family="hf_qwen2", name="hf:test-qwen-wide", context=64, qkv_bias=True, width=64, heads=8,
               kv_heads=4, mlp_width=96, norm_eps=A_ARCH.norm_eps / 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 6-block source and a widened 7-block target (one identity block inserted), as safetensors files."""
    d = tmp_path_factory.mktemp("streamed")
    A = model(A_ARCH, 1)
    W, _ = planted(A, WIDE, seed=2)
    params, arch = identity_block(W.params, W.arch, 1, seed=9)
    B = Model(arch, params, "planted:deeper")
    return save_model(A, d / "a.safetensors"), save_model(B, d / "b.safetensors")


def test_streamed_tensors_equal_the_resident_ones_and_two_blocks_at_most_are_held(files):
    a, _ = files
    resident, streamed = load_model(str(a)), load_model(str(a), stream=True)
    assert isinstance(streamed.params, StreamedParams) and isinstance(resident.params, dict)
    assert list(streamed.params) == list(resident.params)
    assert streamed.params.reads == 0  # loading read nothing but the header
    block = max(sum(t.numel() * 4 for k, t in resident.params.items() if group_of(k) == layer)
                for layer in range(A_ARCH.layers))
    for k in resident.params:
        assert torch.equal(streamed.params[k], resident.params[k]), k
        if group_of(k) >= 0:
            assert streamed.params.held_bytes() <= 2 * block
    assert streamed.params.reads == len(resident.params)
    assert streamed.params.nbytes() == sum(t.numel() * 4 for t in resident.params.values())


def test_a_streamed_tensor_with_nan_is_one_line_naming_the_file(files, tmp_path):
    a, _ = files
    tensors, md = read_safetensors(a)
    key = "model.layers.2.mlp.down_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    path = write_safetensors(tmp_path / "nan.safetensors", tensors, md)
    m = load_model(str(path), stream=True)  # the headers are fine: loading succeeds and reads nothing
    assert torch.isfinite(m.params["blocks.0.mlp.fc2.weight"]).all()
    with pytest.raises(TransportError, match=r"nan\.safetensors: tensor model\.layers\.2\.mlp\.down_proj\.weight "
                                             r"contains NaN or Inf values$"):
        m.params["blocks.2.mlp.fc2.weight"]
    with pytest.raises(TransportError, match="contains NaN or Inf"):
        load_model(str(path))  # a resident load refuses the file at once


def test_theseus_on_streamed_models_gives_the_same_maps_reading_each_block_once_per_stage(files, monkeypatch):
    a, b = files
    task = text_task(A_ARCH.vocab_size, n=40)
    monkeypatch.setattr(theseus, "CHUNK_ROWS", 64)  # several chunks: block-major loops read a block once
    options = {"calib_size": 40, "depth": "similarity"}
    resident = theseus.prepare(TransportInputs(load_model(str(a)), load_model(str(b)), task, seed=0), options)
    A, B = load_model(str(a), stream=True), load_model(str(b), stream=True)
    streamed = theseus.prepare(TransportInputs(A, B, task, seed=0), options)
    assert len(resident.info["calibration"]) and streamed.depth_map() == resident.depth_map()
    assert resident.depth_map() == [0, None, 1, 2, 3, 4, 5]  # the inserted block found, so the similarity stage ran
    assert list(streamed.maps) == list(resident.maps)
    for k in resident.maps:
        assert torch.equal(streamed.maps[k], resident.maps[k]), k
    # depth stage + blocks stage: every tensor at most twice (the chunk-major loops read it once per chunk)
    assert A.params.reads <= 2 * len(A.params) and B.params.reads <= 2 * len(B.params)
    for m in (A, B):  # never the whole model alive: three blocks and what lies outside the blocks at most
        sizes = {k: 4 * torch.Size(m.params.shape(k)).numel() for k in m.params}
        block = max(sum(n for k, n in sizes.items() if group_of(k) == layer) for layer in range(m.arch.layers))
        outside = sum(n for k, n in sizes.items() if group_of(k) < 0)
        assert m.params.peak_live_bytes <= 3 * block + outside < m.params.nbytes(), m.ref


def test_keep_must_be_positive():
    with pytest.raises(ValueError):
        StreamedParams({}, lambda k: torch.zeros(0), "x", keep=0)


def test_an_open_clip_tower_file_streams_too(tmp_path):
    from transport.families.open_clip import tiny_arch
    from transport.sources import init_params

    arch = tiny_arch(width=32, layers=3, heads=4, image_size=8, patch_size=2, output_dim=16, name="zoo:test-tiny")
    path = save_model(Model(arch, init_params(arch, 4), "tiny"), tmp_path / "tower.safetensors")
    resident, streamed = load_model(str(path)), load_model(str(path), stream=True)
    assert isinstance(streamed.params, StreamedParams) and streamed.params.reads == 0
    assert list(streamed.params) == list(resident.params)
    assert all(torch.equal(streamed.params[k], resident.params[k]) for k in resident.params)
    # q, k and v are parts of one stored in_proj, each read on its own: each keeps only its part, not the
    # whole fused storage (three of which would be held for one in_proj)
    for k in resident.params:
        t = streamed.params[k]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
