"""Content hashes of every method's transported task vector on fixed inputs (a refactoring check).

Cases: the test zoo's control, next and wide_grown pairs (task rot90) and a planted random-init
ViT-B-16 pair (theta_B = Pi(theta_A), tau = seeded noise). For each case and method the sha256 of
the transported tau's tensors (alpha = 1, target canonical names) is printed; two code versions that
print the same lines compute bit-identical outputs.

    python -m bench.output_hashes [--zoo DIR] [--skip-vit]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

METHODS = ("naive", "transfusion", "gradfix", "theseus")


def _api():
    from transport.cache import hash_tensors
    from transport.core.symmetry import apply_permutation, random_permutation
    from transport.core.task_vector import TaskVector
    from transport.data import digits_task
    from transport.pipeline import transfer
    from transport.sources import load_model

    return load_model, TaskVector, apply_permutation, random_permutation, hash_tensors, digits_task, transfer


def _run(case: str, pre, ft, target, methods, task, options=None) -> None:
    _, _, _, _, hash_tensors, _, transfer = _api()
    for m in methods:
        r = transfer(pre, ft, target, m, task=task, options=(options or {}).get(m), shots=1, seed=0,
                     device="cpu", use_cache=False, evaluate=False)
        print(f"{case:<22} {m:<12} {hash_tensors(r.transported.tensors)[:24]}", flush=True)


def zoo_cases(root: str) -> None:
    load_model, *_, digits_task, _ = _api()
    from transport import zoo
    from transport.zoo.builder import build

    if not zoo.is_built(root):
        build(root, variant="test", progress=False, workers=1)
    os.environ["TRANSPORT_ZOO_DIR"] = root
    task = digits_task("rot90")
    A, A_ft = load_model("zoo:A"), load_model("zoo:A+rot90")
    for pair, target in (("control", "B_control"), ("next", "B_next"), ("wide_grown", "W_grown")):
        methods = ("theseus",) if pair == "wide_grown" else METHODS
        _run(f"zoo-test:{pair}", A, A_ft, load_model(f"zoo:{target}"), methods, task)


def vit_case() -> None:
    load_model, TaskVector, apply_permutation, random_permutation, _, digits_task, _ = _api()
    A = load_model("open_clip:ViT-B-16:none", seed=0)
    planted = random_permutation(A.arch, seed=7, kinds=("res", "mlp", "heads", "within"))
    B = A.with_params(apply_permutation(A.params, planted, A.arch), ref="planted:ViT-B-16")
    g = torch.Generator().manual_seed(3)
    ft = A.with_params({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in A.params.items()}, ref="ft")
    _run("planted:ViT-B-16", A, ft, B, METHODS, digits_task("rot90"),
         {"theseus": {"calib_size": 8}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", help="a built test zoo (default: built into a temporary directory)")
    ap.add_argument("--skip-vit", action="store_true", help="only the zoo cases")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRANSPORT_CACHE_DIR"] = tmp
        zoo_cases(args.zoo or os.path.join(tmp, "zoo"))
        if not args.skip_vit:
            vit_case()


if __name__ == "__main__":
    main()
