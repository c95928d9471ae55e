"""Theseus (and TransFusion's activation matching) on language models: the tiny planted cases, and the cost of
the structured head maps and the depth map at Qwen2.5-0.5B -> 1.5B shapes.

Planted cases (random decoders of family "test" built by ``tests/planted_decoders.py``; 40 random texts of
6-14 tokens): per case what is recovered and the max error (maps: max |T - T_true| over the listed
spaces; function: max |logits(theta_B + tau_B) - logits(theta_A + tau_A)| / max |change tau makes|).
Cost (``--cost``): CPU seconds (process time, all threads) of one layer's head maps from random
cross-covariances of the 0.5B / 1.5B shapes (14 query / 2 kv heads of 64 -> 12 / 2 of 128), and of the
block similarity + depth map for 24 -> 28 blocks on 1024 rows (widths 896 -> 1536).

    python -m bench.theseus_text [--cost]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _err(A, B, al, task, seed=3):
    from planted_decoders import logits, random_tau
    from transport.methods.theseus import apply

    tau = random_tau(A.arch, seed)
    batch = task.split("train")[0]
    f_ft = logits(tau.apply_to(A.params), A.arch, batch)
    change = (f_ft - logits(B.params, B.arch, batch)).abs().max()
    return float((logits(apply(al, tau, 1.0).apply_to(B.params), B.arch, batch) - f_ft).abs().max() / change)


def _map_err(al, maps) -> float:
    return max(float((al.maps["res:0" if s == "res" else s].double() - E).abs().max()) for s, E in maps.items())


def planted_table() -> list[tuple[str, str, str]]:
    from planted_decoders import decoder, identity_block, model, planted, random_params, text_task
    from transport.core.model import Model
    from transport.core.symmetry import apply_permutation, perm_equal, random_permutation
    from transport.methods import TransportInputs
    from transport.methods.theseus import prepare
    from transport.methods.transfusion import align

    task = text_task(50, n=40)

    def fit(A, B, **o):
        return prepare(TransportInputs(A, B, task, seed=0), {"calib_size": 40, **o})

    a = decoder()
    rows = []
    cases = [("same width: GQA 4q/2kv, rotary, tied; residual perm, kv+query perms, pair rotations, v/o orth", a),
             ("widen x2: width 32->64, kv groups 2->4", decoder(width=64, heads=8, kv_heads=4, mlp_width=96,
                                                                norm_eps=a.norm_eps / 2, name="b")),
             ("widen x2, query heads per group 2->3 (4q/2kv -> 12q/4kv)",
              decoder(width=64, heads=12, kv_heads=4, head_dim=8, mlp_width=96, norm_eps=a.norm_eps / 2, name="b"))]
    A = model(a, 1)
    for name, b in cases:
        B, maps = planted(A, b, seed=2)
        al = fit(A, B)
        rows.append((name, f"all {len(maps)} maps", f"maps {_map_err(al, maps):.1e}, function {_err(A, B, al, task):.1e}"))
    q = decoder(head_dim=16)
    Aq = model(q, 1)
    B, maps = planted(Aq, q, seed=2)
    for mode in ("grouped", "free"):
        al = fit(Aq, B, heads=mode)
        rows.append((f"q width 64 > residual 32, heads={mode}", "q map",
                     f"q map {float((al.maps['q:0'].double() - maps['q:0']).abs().max()):.1e}, "
                     f"function {_err(Aq, B, al, task):.1e}"))
    b = decoder(width=64, head_dim=16, mlp_width=96, norm_eps=a.norm_eps / 2, name="b")
    B, maps = planted(A, b, seed=2)
    al = fit(A, B)
    rows.append(("head width 8 -> 16 (pair i -> 2i), reported APPROXIMATE", "all maps",
                 f"maps {_map_err(al, maps):.1e}, function {_err(A, B, al, task):.1e} (q/k approximate)"))
    a4 = decoder(layers=4)
    A4 = model(a4, 1)
    W, _ = planted(A4, decoder(layers=4, width=64, heads=8, kv_heads=4, mlp_width=96, norm_eps=a.norm_eps / 2,
                               name="w"), seed=2)
    params, arch = identity_block(W.params, W.arch, 1, seed=9)
    D = Model(arch, params, "deeper")
    for mode in ("similarity", "relative"):
        al = fit(A4, D, depth=mode)
        rows.append((f"depth 4 -> 5 (widened, identity block inserted at 1), depth={mode}",
                     f"map {al.diagnostics()['depth']['map']}", f"function {_err(A4, D, al, task):.1e}"))
    arch = decoder(width=32, heads=4, mlp_width=48)
    pa = {k: v.float() for k, v in random_params(arch, seed=7).items()}
    Pi = random_permutation(arch, seed=8, kinds=("res_shared", "mlp", "heads", "query", "within_vo"))
    al = align(pa, apply_permutation(pa, Pi, arch), arch, matching="activation", calibration=task.split("train")[0])
    ok = sum(perm_equal(al.perms[s], p) for s, p in Pi.items())
    rows.append(("TransFusion activation matching, GQA rotary decoder, planted symmetry",
                 f"{ok}/{len(Pi)} permutations", "exact" if ok == len(Pi) else "not exact"))
    return rows


def cost() -> list[tuple[str, float]]:
    from transport.methods.theseus_depth import block_similarity, similarity_depth
    from transport.methods.theseus_maps import head_maps

    from planted_decoders import decoder

    a = decoder(width=896, heads=14, kv_heads=2, mlp_width=4864, vocab_size=64, name="0.5B-shaped")
    b = decoder(width=1536, heads=12, kv_heads=2, mlp_width=8960, vocab_size=64, name="1.5B-shaped")
    g = torch.Generator().manual_seed(0)
    C = {s: torch.randn(a.q_width if s in ("q", "ctx") else a.kv_width, b.q_width if s in ("q", "ctx") else
                        b.kv_width, generator=g, dtype=torch.float64) for s in ("q", "k", "v", "ctx")}
    out = []
    c0 = time.process_time()
    head_maps(C, a, b)
    out.append(("head maps of one layer (q 896x1536, k/v 128x256)", time.process_time() - c0))
    sa = [torch.randn(1024, 896, generator=g, dtype=torch.float64) for _ in range(25)]
    sb = [torch.randn(1024, 1536, generator=g, dtype=torch.float64) for _ in range(29)]
    c0 = time.process_time()
    similarity_depth(block_similarity(sa, sb))
    out.append(("block similarity + depth map, 24 -> 28 blocks, 1024 rows", time.process_time() - c0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost", action="store_true", help="also the cost at Qwen2.5-0.5B -> 1.5B shapes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = planted_table()
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  recovered / max error")
    for name, what, err in rows:
        print(f"{name:<{w}}  {what}: {err}")
    if args.cost:
        torch.set_num_threads(2)
        for name, s in cost():
            print(f"{name:<{w}}  {s:.2f} CPU s")


if __name__ == "__main__":
    main()
