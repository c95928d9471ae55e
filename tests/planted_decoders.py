"""Random decoder LMs (family "test", no family code) and planted targets for the Theseus / activation tests.

A planted target computes EXACTLY the source's logits, through hidden maps that respect attention:
residual stream permuted (same width) or duplicated then permuted (twice the width, norm eps halved);
each key/value group of the source sits in its own target group, its query heads in distinct query
slots of that group; one q/k map per group (under rotary positions: a 2x2 rotation per rotary pair,
pair i -> the target pair of equal frequency) and one v/o map per group; MLP units embedded into
distinct target units (gate, up and down together); every other target head and unit is zero.
The planted transform is linear in the parameters, so a task vector moved by the true maps gives
exactly the source's fine-tuned logits.
"""
from __future__ import annotations

import math

import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.model import Model
from transport.core.stems import TextBatch
from transport.core.task_vector import TaskVector
from transport.text import TextTask

Tensor = torch.Tensor
F64 = torch.float64


def decoder(**kw) -> Arch:
    base = dict(family="test", name="test:decoder", width=32, layers=2, heads=4, kv_heads=2, mlp_width=48,
                mlp="gated", act="silu", norm="rms", norm_eps=1e-6, qkv_bias=False, o_bias=False, mlp_bias=False,
                position="rope", causal=True, stem="tokens", vocab_size=50, context=0, readout="lm",
                tied_embeddings=True, ln_pre=False)
    base.update(kw)
    return Arch(**base)


def random_params(arch: Arch, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, info in param_axes(arch).items():
        t = torch.randn(info.shape, generator=g, dtype=F64)
        is_gain = info.block in ("ln1", "ln2", "ln_post", "ln_pre") and not info.is_bias
        out[k] = 1.0 + 0.2 * t if is_gain else 0.3 * t
    return out


def model(arch: Arch, seed: int = 0, ref: str = "", tokenizer=None) -> Model:
    return Model(arch, random_params(arch, seed), ref or f"{arch.name}-s{seed}", tokenizer=tokenizer)


def rand_orth(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """An isometric embedding (rows <= cols: T T^T = I) or a square orthogonal matrix."""
    M = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=F64)
    Q, R = torch.linalg.qr(M)
    Q = Q * torch.sign(torch.diagonal(R))
    return Q.t() if rows <= cols else Q


def pair_rotations(dh_a: int, dh_b: int, g: torch.Generator) -> Tensor:
    """[dh_a, dh_b]: rotary pair i -> target pair i * dh_b / dh_a (equal frequency) by a random 2x2 rotation."""
    M = torch.zeros(dh_a, dh_b, dtype=F64)
    ha, hb, s = dh_a // 2, dh_b // 2, dh_b // dh_a
    for i in range(ha):
        phi = float(torch.rand(1, generator=g, dtype=F64)) * 2 * math.pi
        c, sn, j = math.cos(phi), math.sin(phi), i * s
        M[i, j], M[i + ha, j + hb], M[i, j + hb], M[i + ha, j] = c, c, -sn, sn
    return M


def embedding(n: int, N: int, g: torch.Generator) -> Tensor:
    """[n, N]: unit i -> a distinct random unit of N (a permutation when n == N)."""
    E = torch.zeros(n, N, dtype=F64)
    E[torch.arange(n), torch.randperm(N, generator=g)[:n]] = 1.0
    return E


def head_maps(a: Arch, b: Arch, g: torch.Generator) -> dict[str, Tensor]:
    """The planted maps of one layer's q, k, v and ctx spaces (see the module docstring)."""
    da, db = a.head_dim, b.head_dim
    E = {"q": torch.zeros(a.q_width, b.q_width, dtype=F64), "k": torch.zeros(a.kv_width, b.kv_width, dtype=F64)}
    E["v"], E["ctx"] = torch.zeros_like(E["k"]), torch.zeros_like(E["q"])
    slots = torch.randperm(b.kv_heads, generator=g)[:a.kv_heads]
    for ga in range(a.kv_heads):
        gb = int(slots[ga])
        M = pair_rotations(da, db, g) if a.position == "rope" else rand_orth(da, db, g)
        D = rand_orth(da, db, g)
        E["k"][ga * da:(ga + 1) * da, gb * db:(gb + 1) * db] = M
        E["v"][ga * da:(ga + 1) * da, gb * db:(gb + 1) * db] = D
        qslots = torch.randperm(b.group_size, generator=g)[:a.group_size]
        for r in range(a.group_size):
            h, k = ga * a.group_size + r, gb * b.group_size + int(qslots[r])
            E["q"][h * da:(h + 1) * da, k * db:(k + 1) * db] = M
            E["ctx"][h * da:(h + 1) * da, k * db:(k + 1) * db] = D
    return E


def planted(A: Model, b: Arch, seed: int = 0) -> tuple[Model, dict[str, Tensor]]:
    """A target of architecture ``b`` computing exactly A's logits; returns it and the hidden maps by space."""
    a = A.arch
    assert not (a.o_bias or a.mlp_bias or b.o_bias or b.mlp_bias) and a.norm == "rms" and a.mlp == "gated"
    g = torch.Generator().manual_seed(seed)
    # the attention logits scale by 1/sqrt(d_h): a wider head needs its queries scaled to keep the function
    q_scale = math.sqrt(b.head_dim / a.head_dim)
    if b.width == a.width:
        E_res = embedding(a.width, a.width, g)
    else:
        assert b.width == 2 * a.width and b.norm_eps == a.norm_eps / 2
        E_res = (torch.cat([torch.eye(a.width), torch.eye(a.width)], 1).double() / math.sqrt(2))
        E_res = E_res[:, torch.randperm(b.width, generator=g)]
    maps: dict[str, Tensor] = {"res": E_res}
    p = {k: v.double() for k, v in A.params.items()}
    w = {"embed.tokens": p["embed.tokens"] @ E_res, "ln_post.weight": p["ln_post.weight"] @ E_res}
    if not a.tied_embeddings:
        w["head.unembed"] = p["head.unembed"] @ E_res
    for l in range(a.layers):
        pre = f"blocks.{l}"
        E = head_maps(a, b, g)
        E_h = embedding(a.mlp_width, b.mlp_width, g)
        maps.update({f"{s}:{l}": E[s] for s in E})
        maps[f"act:{l}"] = E_h
        for n in ("ln1", "ln2"):
            w[f"{pre}.{n}.weight"] = p[f"{pre}.{n}.weight"] @ E_res
        for x in "qkv":
            c = q_scale if x == "q" else 1.0
            w[f"{pre}.attn.{x}.weight"] = c * E[x].t() @ p[f"{pre}.attn.{x}.weight"] @ E_res
            if a.qkv_bias:
                w[f"{pre}.attn.{x}.bias"] = c * p[f"{pre}.attn.{x}.bias"] @ E[x]
        w[f"{pre}.attn.o.weight"] = E_res.t() @ p[f"{pre}.attn.o.weight"] @ E["ctx"]
        for x in ("gate", "fc1"):
            w[f"{pre}.mlp.{x}.weight"] = E_h.t() @ p[f"{pre}.mlp.{x}.weight"] @ E_res
        w[f"{pre}.mlp.fc2.weight"] = E_res.t() @ p[f"{pre}.mlp.fc2.weight"] @ E_h
    return Model(b, w, ref=f"planted:{b.name}"), maps


def identity_block(params: dict[str, Tensor], arch: Arch, at: int, seed: int = 0) -> tuple[dict[str, Tensor], Arch]:
    """The same function with one more block inserted before block ``at``: random weights but zero output
    projections (o and fc2), so it adds nothing to the residual stream."""
    deeper = arch.replace(layers=arch.layers + 1, name=f"{arch.name}+id{at}")
    fresh = random_params(deeper, seed)
    out = {}
    for k in param_axes(deeper):
        if not k.startswith("blocks."):
            out[k] = params[k]
            continue
        l, rest = int(k.split(".")[1]), k.split(".", 2)[2]
        if l == at:
            out[k] = torch.zeros_like(fresh[k]) if rest.startswith(("attn.o.", "mlp.fc2.")) else fresh[k]
        else:
            out[k] = params[f"blocks.{l - (l > at)}.{rest}"]
    return out, deeper


def text_task(vocab: int, n: int = 24, lo: int = 6, hi: int = 14, seed: int = 0, pad_id: int = 0,
              tokenizer_id: str = "") -> TextTask:
    """Random token sequences of varied lengths (right-padded with ``pad_id``), one train split."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    batch = TextBatch.from_lists(seqs, pad_id=pad_id)
    return TextTask("random-text", {"train": (batch, None), "val": (batch[:0], None), "test": (batch, None)},
                    tokenizer_id=tokenizer_id)


def random_tau(arch: Arch, seed: int, scale: float = 0.05) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector(arch, {k: scale * torch.randn(i.shape, generator=g, dtype=F64) for k, i in
                             param_axes(arch).items()})


def logits(params: dict[str, Tensor], arch: Arch, batch: TextBatch) -> Tensor:
    """Next-token logits of the real tokens only [n_real, V] (float64)."""
    from transport.core.forward import encode

    out = encode({k: v.double() for k, v in params.items()}, arch, batch)
    return out[batch.mask]
