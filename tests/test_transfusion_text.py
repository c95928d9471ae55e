"""TransFusion's activation matching on token-stem models: rows are the real tokens of a TextBatch, and a
planted symmetry of a random decoder with grouped-query attention and rotary positions is recovered."""
from __future__ import annotations

import pytest
import torch
from planted_decoders import decoder, random_params, text_task

from transport.core.model import Model
from transport.core.symmetry import apply_permutation, perm_equal, random_permutation
from transport.methods import TransportInputs
from transport.methods.transfusion import activation_similarity, align, prepare

torch.set_num_threads(1)


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 1}, {"tied_embeddings": False}])
def test_activation_matching_recovers_a_planted_decoder_symmetry(kw):
    arch = decoder(width=32, heads=4, mlp_width=48, **kw)
    A = {k: v.float() for k, v in random_params(arch, seed=7).items()}
    Pi = random_permutation(arch, seed=8, kinds=("res_shared", "mlp", "heads", "query", "within_vo"))
    B = apply_permutation(A, Pi, arch)
    batch = text_task(arch.vocab_size, n=48).split("train")[0]
    al = align(A, B, arch, matching="activation", calibration=batch)
    assert al.diagnostics()["matching"] == "activation"
    for s, p in Pi.items():
        assert perm_equal(al.perms[s], p), s


def test_rows_are_the_real_tokens_only():
    arch = decoder()
    A, B = random_params(arch, seed=1), random_params(arch, seed=2)
    batch = text_task(arch.vocab_size, n=16).split("train")[0]
    other = text_task(arch.vocab_size, n=16, pad_id=9).split("train")[0]
    assert not torch.equal(batch.ids, other.ids)
    one, two = activation_similarity(A, B, arch, batch), activation_similarity(A, B, arch, other)
    for s in one:
        for role in one[s]:
            assert torch.allclose(one[s][role], two[s][role], atol=1e-6), (s, role)
    # by hand: the residual stream's correlation over the real tokens
    from transport.core.forward import encode

    rec = {}
    for tag, p in (("A", A), ("B", B)):
        encode({k: v.float() for k, v in p.items()}, arch, batch,
               record=lambda site, x, tag=tag: rec.setdefault((tag, site), x[batch.mask].double()))
    a, b = rec[("A", "res:0a")], rec[("B", "res:0a")]
    a, b = (a - a.mean(0)) / (a.std(0, unbiased=False) + 1e-8), (b - b.mean(0)) / (b.std(0, unbiased=False) + 1e-8)
    assert torch.allclose(one["res:0a"]["all"].double(), b.t() @ a / a.shape[0], atol=1e-4)


def test_prepare_reads_a_text_task():
    arch = decoder()
    A = {k: v.float() for k, v in random_params(arch, seed=3).items()}
    Pi = random_permutation(arch, seed=4, kinds=("res_shared", "mlp", "heads", "query", "within_vo"))
    B = apply_permutation(A, Pi, arch)
    al = prepare(TransportInputs(Model(arch, A, "a"), Model(arch, B, "b"), text_task(arch.vocab_size, n=48)),
                 {"matching": "activation", "calibration": 48})
    assert all(perm_equal(al.perms[s], p) for s, p in Pi.items())
