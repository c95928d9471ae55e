"""Symmetries of the generic core, for the switches language models need (no family involved).

A pre-norm decoder with grouped-query attention, rotary positions, a gated MLP, RMSNorm and tied embeddings
is built from random canonical tensors; the axis table's symmetries must keep its logits exactly, and the
moves that are NOT symmetries (q/k dims inside a rotary head, a query head leaving its group, the gate
permuted alone) must change them. TransFusion recovers planted symmetries of such models.
"""
from __future__ import annotations

import json

import pytest
import torch

from transport.core.arch import Arch
from transport.core.forward import encode
from transport.core.layout import canonical_shapes, param_axes, res_out
from transport.core.symmetry import (
    HeadPermutation,
    apply_permutation,
    check_permutations,
    compose,
    invert,
    perm_equal,
    permutation_spec,
    random_permutation,
)
from transport.errors import TransportError
from transport.methods.transfusion import align

from planted_decoders import decoder, random_params

Tensor = torch.Tensor


def logits(params, arch, ids):
    return encode(params, arch, ids)


IDS = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
SYMMETRY = ("res_shared", "mlp", "heads", "query", "within_vo")


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"tied_embeddings": False}, {"kv_heads": 4},
                                {"kv_heads": 1}, {"position": "learned", "context": 16},
                                {"norm": "layer", "mlp": "plain", "act": "gelu_tanh", "qkv_bias": True,
                                 "o_bias": True, "mlp_bias": True, "position": "learned", "context": 16}])
def test_decoder_symmetries_keep_the_logits(kw):
    arch = decoder(**kw)
    params = random_params(arch)
    kinds = SYMMETRY + (("within_qk",) if arch.position != "rope" else ())
    perms = random_permutation(arch, seed=3, kinds=kinds)
    moved = apply_permutation(params, perms, arch)
    assert sum(not torch.equal(moved[k], params[k]) for k in params) >= len(params) - 3
    ref = logits(params, arch, IDS)
    assert torch.allclose(logits(moved, arch, IDS), ref, atol=1e-12, rtol=0)


def _raw(arch: Arch, perms, name: str, index: Tensor, role: str, params):
    """params with one tensor's heads axis re-indexed by ``index`` instead of the structured permutation."""
    out = apply_permutation(params, perms, arch)
    info = param_axes(arch)[name]
    axis = next(i for i, a in enumerate(info.axes) if a is not None and a.role == role)
    out[name] = apply_permutation({name: params[name]}, {k: v for k, v in perms.items() if not k.startswith("heads")},
                                  arch)[name].index_select(axis, index)
    return out


def test_what_is_not_a_symmetry_changes_the_logits():
    arch = decoder()
    params = random_params(arch)
    ref = logits(params, arch, IDS)
    ident = random_permutation(arch, seed=0, kinds=())
    G, r, dh = arch.kv_heads, arch.group_size, arch.head_dim
    # q/k dims reordered inside every head, even by whole rotary pairs (i, i + d_h / 2), changes the logits
    pair = torch.arange(dh // 2).roll(1)
    qk = torch.cat([pair, pair + dh // 2]).repeat(G, 1)
    bad = {**ident, "heads:0": HeadPermutation(ident["heads:0"].kv, ident["heads:0"].q, qk, ident["heads:0"].vo)}
    with pytest.raises(TransportError, match="rotary positions do not allow"):
        check_permutations(bad, arch)
    assert (logits(apply_permutation(params, bad, arch), arch, IDS) - ref).abs().max() > 1e-3
    # a query head moved to another group (with its o columns): no longer reads its own key/value head
    swap = torch.arange(arch.heads)
    swap[[0, r]] = swap[[r, 0]]  # first query head of group 0 <-> first of group 1
    rows = (swap[:, None] * dh + torch.arange(dh)).reshape(-1)
    moved = _raw(arch, ident, "blocks.0.attn.q.weight", rows, "q", params)
    moved = {**moved, "blocks.0.attn.o.weight": params["blocks.0.attn.o.weight"][:, rows]}
    assert (logits(moved, arch, IDS) - ref).abs().max() > 1e-3
    # within a group the same swap is a symmetry (checked above); the gate permuted alone is not
    p = torch.randperm(arch.mlp_width, generator=torch.Generator().manual_seed(2))
    gated = dict(params, **{"blocks.1.mlp.gate.weight": params["blocks.1.mlp.gate.weight"][p]})
    assert (logits(gated, arch, IDS) - ref).abs().max() > 1e-3


def test_query_heads_never_leave_their_group_and_rope_keeps_qk():
    arch = decoder(heads=6, kv_heads=2, width=48)
    perms = random_permutation(arch, seed=4, kinds=("heads", "query", "within"))
    G, r, dh = arch.kv_heads, arch.group_size, arch.head_dim
    for l in range(arch.layers):
        hp = perms[f"heads:{l}"]
        old_heads = hp.index("q").reshape(arch.heads, dh)[:, 0] // dh
        assert torch.equal(old_heads.reshape(G, r) // r, hp.kv[:, None].expand(G, r))  # each new group is one old
        assert not torch.equal(hp.q, torch.arange(r).repeat(G, 1))  # query heads did move inside groups
        assert torch.equal(hp.qk, torch.arange(dh).repeat(G, 1))  # rotary: q/k order is the identity
        assert not torch.equal(hp.vo, hp.qk)  # v/o order is free
        assert torch.equal(hp.index("k")[::dh] // dh, hp.kv) and hp.index("k").numel() == G * dh
    with pytest.raises(TransportError, match="rotary positions do not allow"):
        random_permutation(arch, seed=0, kinds=("within_qk",))


def test_gated_mlp_moves_gate_and_up_rows_with_down_columns():
    arch = decoder()
    spec = permutation_spec(arch)
    uses = {(n, ax, role) for n, ax, role in spec["mlp:0"].uses}
    assert uses == {("blocks.0.mlp.gate.weight", 0, "gate"), ("blocks.0.mlp.fc1.weight", 0, "up"),
                    ("blocks.0.mlp.fc2.weight", 1, "down")}
    params = random_params(arch)
    perms = random_permutation(arch, seed=1, kinds=("mlp",))
    moved = apply_permutation(params, perms, arch)
    p = perms["mlp:0"]
    assert torch.equal(moved["blocks.0.mlp.gate.weight"], params["blocks.0.mlp.gate.weight"][p])
    assert torch.equal(moved["blocks.0.mlp.fc1.weight"], params["blocks.0.mlp.fc1.weight"][p])
    assert torch.equal(moved["blocks.0.mlp.fc2.weight"], params["blocks.0.mlp.fc2.weight"][:, p])


def test_tied_embeddings_share_the_first_and_last_residual_space():
    arch = decoder()
    info = param_axes(arch)
    assert "head.unembed" not in info and res_out(arch) == "res:0"
    assert info["embed.tokens"].spaces == (None, "res:0") and info["ln_post.weight"].spaces == ("res:0",)
    assert f"res:{arch.layers - 1}m" not in permutation_spec(arch)
    assert info[f"blocks.{arch.layers - 1}.mlp.fc2.weight"].spaces[0] == "res:0"
    untied = decoder(tied_embeddings=False)
    assert param_axes(untied)["head.unembed"].spaces == (None, f"res:{untied.layers - 1}m")
    assert canonical_shapes(arch)["blocks.0.attn.k.weight"] == (arch.kv_heads * arch.head_dim, arch.width)


def test_key_bias_is_invariant_only_without_rotary_positions():
    assert param_axes(decoder(qkv_bias=True))["blocks.0.attn.k.bias"].invariant is False
    assert param_axes(decoder(qkv_bias=True, position="learned", context=16))["blocks.0.attn.k.bias"].invariant
    arch = decoder(qkv_bias=True)
    params = random_params(arch)
    bumped = dict(params, **{"blocks.0.attn.k.bias": params["blocks.0.attn.k.bias"] + 1.0})
    assert (logits(bumped, arch, IDS) - logits(params, arch, IDS)).abs().max() > 1e-6


def test_head_permutation_algebra_matches_index_vectors():
    arch = decoder(heads=6, kv_heads=3, width=48, position="learned", context=16)
    a = random_permutation(arch, seed=1, kinds=("heads", "query", "within_qk", "within_vo"))["heads:0"]
    b = random_permutation(arch, seed=2, kinds=("heads", "query", "within_qk", "within_vo"))["heads:0"]
    for role in "qkvo":
        ia, ib = a.index(role), b.index(role)
        assert torch.equal(a.inverse().index(role)[ia], torch.arange(ia.numel()))
        assert torch.equal(a.after(b).index(role), ib[ia])  # b first, then a
    assert invert({"heads:0": a})["heads:0"].after(a).equal(HeadPermutation.identity(3, 2, arch.head_dim))
    assert perm_equal(compose({"heads:0": a}, {"heads:0": b})["heads:0"], a.after(b))


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 4, "position": "learned", "context": 16}])
def test_transfusion_recovers_planted_decoder_symmetries(kw):
    arch = decoder(width=64, heads=8, mlp_width=96, **kw)
    A = {k: v.float() for k, v in random_params(arch, seed=7).items()}
    kinds = ("res", "mlp", "heads", "query", "within_vo") + (("within_qk",) if arch.position != "rope" else ())
    Pi = random_permutation(arch, seed=8, kinds=kinds)
    B = apply_permutation(A, Pi, arch)
    al = align(A, B, arch, within="separate")
    for s, p in Pi.items():
        assert perm_equal(al.perms[s], p), s
    d = al.diagnostics()
    assert d["within"] == "separate" and d["kv_heads"] == arch.kv_heads
    assert [layer["head_perm"] for layer in d["layers"]] == [Pi[f"heads:{l}"].kv.tolist() for l in range(arch.layers)]


def test_separate_within_head_orders_are_recovered_only_when_asked():
    """Without rotary positions q/k and v/o orders are independent symmetries (issue: the paper's shared order
    cannot express them); 'separate' recovers a target built with both, 'shared' cannot."""
    arch = decoder(width=64, heads=4, kv_heads=4, mlp_width=96, position="learned", context=16)
    A = {k: v.float() for k, v in random_params(arch, seed=9).items()}
    Pi = random_permutation(arch, seed=10, kinds=("res", "mlp", "heads", "within_qk", "within_vo"))
    B = apply_permutation(A, Pi, arch)
    sep = align(A, B, arch, within="separate")
    assert all(perm_equal(sep.perms[s], p) for s, p in Pi.items())
    shared = align(A, B, arch, within="shared")
    assert not all(perm_equal(shared.perms[s], p) for s, p in Pi.items())
    assert all(torch.equal(shared.perms[f"heads:{l}"].qk, shared.perms[f"heads:{l}"].vo) for l in range(arch.layers))


def test_older_vision_descriptions_still_read():
    old = {"family": "open_clip", "name": "open_clip:ViT-B-16", "image_size": 224, "patch_size": 16, "width": 768,
           "layers": 12, "heads": 12, "mlp_width": 3072, "output_dim": 512, "in_chans": 3, "act": "gelu",
           "ln_eps": 1e-5, "ln_pre": True, "patch_bias": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    arch = Arch.from_json(json.dumps(old))
    assert (arch.width, arch.norm_eps, arch.kv_heads, arch.head_dim, arch.mlp, arch.stem) == (768, 1e-5, 12, 64,
                                                                                              "plain", "image")
    assert Arch.from_json(arch.to_json()) == arch
    with pytest.raises(TransportError, match="unknown field"):
        Arch.from_json(json.dumps({**old, "bogus": 1}))
    with pytest.raises(TransportError, match="do not split into 3 key/value groups"):
        decoder(kv_heads=3)


def test_sliced_objective_equals_the_whole_tensor_objective(monkeypatch):
    """Large tensors are permuted and multiplied in row slices (an LLM's embedding); the objective is the same
    sum, whichever axes the permutation moves (the embedding's columns, the MLP rows, the heads)."""
    import transport.methods.weight_matching as wm

    arch = decoder(width=64, heads=8, mlp_width=96, vocab_size=300)
    A = {k: v.float() for k, v in random_params(arch, seed=1).items()}
    B = {k: v.float() for k, v in random_params(arch, seed=2).items()}
    Pi = random_permutation(arch, seed=3, kinds=("res", "mlp", "heads", "query", "within_vo"))
    whole = wm.matching_objective(A, B, Pi, arch)
    direct = sum(float((apply_permutation({k: A[k]}, Pi, arch)[k].double() * B[k].double()).sum()) for k in A)
    assert abs(whole - direct) <= 1e-12 * abs(direct) and whole != 0.0
    monkeypatch.setattr(wm, "INNER_WHOLE", 148)  # every tensor over 148 entries goes slice by slice
    monkeypatch.setattr(wm, "INNER_SLICE", 37)
    sliced = wm.matching_objective(A, B, Pi, arch)
    assert abs(sliced - whole) <= 1e-12 * abs(whole) and sliced != 0.0


def test_similarity_cache_keeps_the_dearest_rebuilds_first_whatever_the_order(monkeypatch):
    """With room for one wide MLP's similarity or for all the residual ones but not both, the residual
    segments (each entry a sum over hundreds of neighbour columns, against an MLP's 192) are the ones kept,
    in either visiting order, and the planted permutations still come back."""
    import transport.methods.weight_matching as wm

    arch = decoder(width=64, heads=8, mlp_width=192)
    A = {k: v.float() for k, v in random_params(arch, seed=7).items()}
    Pi = random_permutation(arch, seed=8, kinds=("res", "mlp", "heads", "query", "within_vo"))
    B = apply_permutation(A, Pi, arch)
    spec = permutation_spec(arch)
    res_bytes = sum(4 * v.size ** 2 for v in spec.values() if v.kind == "res")
    mlp_bytes = 4 * arch.mlp_width ** 2
    monkeypatch.setattr(wm, "CACHE_SHARE", 0.0)
    monkeypatch.setattr(wm, "CACHE_MIN_BYTES", res_bytes + mlp_bytes - 1)  # the default budget: one MLP fits alone
    plans = {}
    real = wm.WeightMatcher.run

    def run(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        plans[kwargs.get("order", args[4] if len(args) > 4 else "random")] = {
            s: v.cached for s, v in self.vars.items() if v.kind != "heads"}
        return out

    monkeypatch.setattr(wm.WeightMatcher, "run", run)
    for order in wm.ORDERS:
        al = align(A, B, arch, within="separate", order=order)
        kept = plans[order]
        assert all(kept[s] for s, v in spec.items() if v.kind == "res"), (order, kept)
        assert not any(kept[s] for s, v in spec.items() if v.kind == "mlp"), (order, kept)
        assert al.diagnostics()["similarity_cache"]["kept"] == sum(v.kind == "res" for v in spec.values())
        for s, p in Pi.items():
            assert perm_equal(al.perms[s], p), (order, s)


def test_weight_matching_without_cached_similarities_finds_the_same_permutations(monkeypatch):
    """Above the memory budget a variable's similarity is rebuilt at each visit instead of updated: the same
    planted permutations come back, and the recorded objective is still the true one."""
    import transport.methods.weight_matching as wm

    arch = decoder(width=64, heads=8, mlp_width=96)
    A = {k: v.float() for k, v in random_params(arch, seed=7).items()}
    Pi = random_permutation(arch, seed=8, kinds=("res", "mlp", "heads", "query", "within_vo"))
    B = apply_permutation(A, Pi, arch)
    kept: list[bool] = []
    real = wm.WeightMatcher._may_cache
    monkeypatch.setattr(wm.WeightMatcher, "_may_cache", lambda self, v: kept.append(real(self, v)) or kept[-1])
    full = align(A, B, arch, within="separate")
    assert kept and all(kept)
    assert full.diagnostics()["similarity_cache"]["rebuilt"] == 0
    kept.clear()
    lean = align(A, B, arch, within="separate", cache_mib=0)  # the option: no similarity kept
    assert kept and not any(kept)
    lean_cache, full_cache = lean.diagnostics()["similarity_cache"], full.diagnostics()["similarity_cache"]
    assert lean_cache["budget_mib"] == 0.0 and lean_cache["kept"] == 0
    assert lean_cache["rebuilt"] == full_cache["kept"] > 0
    for s, p in Pi.items():
        assert perm_equal(lean.perms[s], p) and perm_equal(full.perms[s], p), s
    obj = lean.diagnostics()["objective_per_sweep"]
    assert abs(obj[-1] - wm.matching_objective(A, B, lean.perms, arch)) <= 1e-6 * abs(obj[-1])  # float32 gains
