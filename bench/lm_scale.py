"""Language models at full size: random-init Hugging Face decoders saved with ``save_pretrained``, loaded by
``transport.sources.load_model`` and moved by the three methods.

Pairs (written once per run into a temporary directory, or ``--dir`` to keep and reuse them):

- ``qwen``: two Qwen2.5-0.5B-shaped models (24 layers, width 896, 14 query / 2 key-value heads of 64, MLP 4864,
  vocabulary 151936, tied embeddings, q/k/v biases), seeds 0 and 1;
- ``qwen-1.5b``: a Qwen2.5-1.5B-shaped target (28 layers, width 1536, 12 / 2 heads of 128, MLP 8960) for Theseus;
- ``gpt2``: two GPT-2-small-shaped models (12 layers, width 768, 12 heads, vocabulary 50257, context 1024).

Rows, each measured in a fresh process (peak RSS is the process's high-water mark, VmHWM, imports and every
model it loaded included; ``base`` is the RSS after the imports, before any model; ``model`` is one source
model's float32 parameters): ``load`` (one directory streamed into canonical tensors), ``transfusion``
(both models loaded, then ``prepare``: weight matching), ``gradfix`` (``prepare``'s per-sample sign votes of
the next-token loss on 32 sequences of 128 tokens vs one bare forward + backward of the same loss on the
same batch, 8 sequences per backward with the gradients accumulated), ``theseus`` (0.5B-shaped -> 1.5B-shaped,
32 calibration sequences of 128 tokens). Seconds are
wall and CPU (user + system of the process, all threads: the robust measure on a shared machine).
``--stream`` loads both models streamed (``load_model(..., stream=True)``: read block by block from their
safetensors files when a method asks for them) instead of resident.

``--scale S`` shrinks every width (head counts kept, head widths scaled, even), MLP width, vocabulary and
layer count (at least 2) by S and the sequence length (at least 16): ``--scale 0.1`` runs in about a minute.

    python -m bench.lm_scale [--scale 1.0] [--rows load transfusion gradfix theseus] [--pairs qwen gpt2]
                             [--threads N] [--dir DIR] [--stream] [--order auto|random|chain]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from transport.methods.weight_matching import ORDERS

from bench.common import cpu_seconds, load_line, peak_bytes, run_child

SHAPES = {  # name: (model_type, layers, width, heads, kv_heads, head_dim, mlp_width, vocab, context)
    "qwen-0.5b": ("qwen2", 24, 896, 14, 2, 64, 4864, 151936, 32768),
    "qwen-1.5b": ("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, 32768),
    "gpt2-small": ("gpt2", 12, 768, 12, 12, 64, 3072, 50257, 1024),
}
PAIRS = {"qwen": ("qwen-0.5b", "qwen-1.5b"), "gpt2": ("gpt2-small", None)}
N_SEQ, SEQ_LEN = 32, 128


def scaled(name: str, scale: float) -> tuple:
    mt, layers, width, heads, kv, hd, mlp, vocab, ctx = SHAPES[name]
    if scale == 1.0:
        return SHAPES[name]
    hd = max(4, 2 * round(hd * scale / 2))
    return (mt, max(2, round(layers * scale)), heads * hd, heads, kv, hd, max(8, round(mlp * scale)),
            max(64, round(vocab * scale)), ctx)


def seq_len(scale: float) -> int:
    return max(16, round(SEQ_LEN * scale))


def make(name: str, scale: float, seed: int, directory: Path) -> dict:
    """A random-init model of shape ``name`` saved with save_pretrained (kept when already there)."""
    if (directory / "config.json").is_file():
        return {"made": False}
    import transformers

    mt, layers, width, heads, kv, hd, mlp, vocab, ctx = scaled(name, scale)
    if mt == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_inner=mlp, vocab_size=vocab,
                                      n_positions=ctx)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.Qwen2Config(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                                       num_key_value_heads=kv, head_dim=hd, intermediate_size=mlp, vocab_size=vocab,
                                       max_position_embeddings=ctx, tie_word_embeddings=True, rope_theta=1e6)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    cls(cfg).save_pretrained(str(directory))
    return {"made": True, "seconds": time.perf_counter() - t0}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _texts(vocab: int, n: int, t: int, seed: int = 0):
    from transport.core.stems import TextBatch
    from transport.text import TextTask

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    batch = TextBatch(ids, torch.ones_like(ids, dtype=torch.bool))
    return TextTask("random-text", {"train": (batch, None), "val": (batch[:0], None), "test": (batch[:0], None)})


def worker(row: str, a_dir: Path, b_dir: Path, scale: float, stream: bool = False,
           order: Optional[str] = None) -> dict:
    """One row in this process: JSON-able seconds, peak and sizes, or ``skip`` with the reason."""
    from transport.methods import TransportInputs, get_method
    from transport.sources import load_model

    import transformers  # noqa: F401 - imported before ``base``: the loader's own cost is what is measured
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    base = _rss()
    t0, c0 = time.perf_counter(), cpu_seconds()
    A = load_model(str(a_dir), stream=stream)
    out = {"base_gib": base / 2**30, "model_gib": _nbytes(A.params) / 2**30, "stream": stream,
           "files_gib": sum(f.stat().st_size for f in a_dir.glob("*.safetensors")) / 2**30,
           "load_s": time.perf_counter() - t0, "load_cpu_s": cpu_seconds() - c0}
    if row != "load":
        B = load_model(str(b_dir), stream=stream)
        out["target_gib"] = _nbytes(B.params) / 2**30
        t = seq_len(scale)
        if row == "gradfix":
            from transport.core import losses

            if not hasattr(losses, "lm_loss"):
                return {**out, "skip": "no next-token loss for GradFix on this branch (transport.core.losses."
                                       "lm_loss: the text-tasks work)"}
            task = _texts(B.arch.vocab_size, N_SEQ, t)
            params = {k: v.detach().clone().requires_grad_(True) for k, v in B.params.items()}
            batch = task.split("train")[0]
            labels = torch.zeros(len(batch), dtype=torch.long)
            step = 8  # sequences per backward, gradients accumulated: 32 at once need ~30 GB at the 0.5B shape
            for _ in range(2):  # the second pass is timed: the first pays one-time costs (allocator, threads)
                t1, c1 = time.perf_counter(), cpu_seconds()
                for s in range(0, len(batch), step):
                    (losses.lm_loss(B.arch)(params, batch[s:s + step], labels[s:s + step]).sum()
                     / len(batch)).backward()
                out["bare_s"], out["bare_cpu_s"] = time.perf_counter() - t1, cpu_seconds() - c1
            del params
            inputs = TransportInputs(A, B, task, shots=N_SEQ, seed=0)
            options = {}
        elif row == "theseus":
            inputs = TransportInputs(A, B, _texts(A.arch.vocab_size, N_SEQ, t), seed=0)
            options = {"calib_size": N_SEQ}
        else:
            inputs, options = TransportInputs(A, B, None, seed=0), ({"order": order} if order else {})
        method = get_method(row)
        t1, c1 = time.perf_counter(), cpu_seconds()
        alignment = method.prepare(inputs, method.resolve(options))
        out["prepare_s"], out["prepare_cpu_s"] = time.perf_counter() - t1, cpu_seconds() - c1
        if row == "transfusion":
            d = alignment.diagnostics()
            out["sweeps"], out["order"], out["confidence"] = d["sweeps"], d["order"], d.get("match_confidence")
        if row == "theseus":
            out["depth_map"] = alignment.diagnostics().get("depth", {}).get("map")
            out["phases"] = {k: [round(v, 1), round(alignment.info["cpu_timings"].get(k, 0.0), 1)]
                             for k, v in alignment.info["timings"].items()}
    out["peak_gib"] = peak_bytes("cpu") / 2**30
    return out


def _nbytes(params) -> int:
    """Bytes of a model's parameters, resident or streamed (without reading a streamed one)."""
    if hasattr(params, "nbytes"):
        return params.nbytes()
    return sum(v.numel() * v.element_size() for v in params.values())


def _table(results: list[tuple[str, str, dict]], scale: float) -> None:
    streamed = "streamed" if any(r.get("stream") for _, _, r in results) else "resident"
    print(f"\nlanguage models at scale {scale} ({N_SEQ} sequences of {seq_len(scale)} tokens, models {streamed}); "
          f"load {load_line()}")
    cols = ("row", "pair", "model GiB", "load s (cpu)", "prepare s (cpu)", "bare f+b s (cpu)", "peak GiB",
            "peak/model", "peak-base/model")
    print("  ".join(f"{c:>16}" if i else f"{c:<12}" for i, c in enumerate(cols)))
    for row, pair, r in results:
        if "skip" in r:
            print(f"{row:<12}  {pair:>16}  skipped: {r['skip']}")
            continue
        m = r["model_gib"]
        cells = [f"{m:.3f}", f"{r['load_s']:.1f} ({r['load_cpu_s']:.1f})",
                 f"{r['prepare_s']:.1f} ({r['prepare_cpu_s']:.1f})" if "prepare_s" in r else "-",
                 f"{r['bare_s']:.1f} ({r['bare_cpu_s']:.1f})" if "bare_s" in r else "-",
                 f"{r['peak_gib']:.3f}", f"{r['peak_gib'] / m:.2f}", f"{(r['peak_gib'] - r['base_gib']) / m:.2f}"]
        print(f"{row:<12}  {pair:>16}  " + "  ".join(f"{c:>16}" for c in cells))
        if "bare_s" in r:
            print(f"{'':<12}  {'':>16}  gradfix prepare / bare forward+backward: {r['prepare_cpu_s'] / r['bare_cpu_s']:.2f}x "
                  "CPU seconds")
        if r.get("order"):
            conf = r.get("confidence")
            print(f"{'':<12}  {'':>16}  weight matching: {r['sweeps']} sweeps, {r['order']} order"
                  + ("" if conf is None else f" (auto: first-space match confidence {conf['value']:.1f}, "
                                             f"threshold {conf['threshold']:.1f})"))
        if r.get("phases"):
            print(f"{'':<12}  {'':>16}  phases, wall s (cpu s): "
                  + ", ".join(f"{k} {w:.1f} ({c:.1f})" for k, (w, c) in r["phases"].items()))
        if r.get("depth_map") is not None:
            print(f"{'':<12}  {'':>16}  depth map (target layer -> source layer): {r['depth_map']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size by this factor (0.1: about a minute)")
    ap.add_argument("--rows", nargs="+", default=["load", "transfusion", "gradfix", "theseus"])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dir", default=None, help="keep the saved models here (reused when present)")
    ap.add_argument("--stream", action="store_true", help="load the models streamed (read block by block from "
                    "their safetensors files when asked for) instead of resident")
    ap.add_argument("--order", default=None, choices=ORDERS,
                    help="TransFusion's weight-matching visiting order (default: the method's)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not 0 < a.scale <= 1:
        raise SystemExit("--scale must lie in (0, 1]")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        kind, rest = a.worker.split(":", 1)
        if kind == "make":
            name, seed, d = rest.split(":", 2)
            print(json.dumps(make(name, a.scale, int(seed), Path(d))))
        else:
            da, db = rest.split("|")
            print(json.dumps(worker(kind, Path(da), Path(db), a.scale, a.stream, a.order)))
        return
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="lm_scale-")
    root = Path(a.dir or tmp.name) / f"scale-{a.scale:g}"
    common = ["--scale", repr(a.scale), "--threads", str(a.threads), *(["--stream"] if a.stream else []),
              *(["--order", a.order] if a.order else [])]
    results = []
    try:
        for pair in a.pairs:
            small, big = PAIRS[pair]
            dirs = {"a": root / f"{small}-0"}
            if set(a.rows) - {"load", "theseus"}:
                dirs["b"] = root / f"{small}-1"
            if big and "theseus" in a.rows:
                dirs["big"] = root / f"{big}-0"
            for key, d in dirs.items():
                name = big if key == "big" else small
                made = run_child("bench.lm_scale", ["--worker", f"make:{name}:{int(key == 'b')}:{d}", *common])
                if made["made"]:
                    print(f"saved {name} ({scaled(name, a.scale)[1:]}) in {made['seconds']:.1f} s", flush=True)
            for row in a.rows:
                if row == "theseus" and not big:
                    continue
                b = dirs["big"] if row == "theseus" else dirs.get("b", dirs["a"])
                r = run_child("bench.lm_scale", ["--worker", f"{row}:{dirs['a']}|{b}", *common])
                label = f"{small}->{big}" if row == "theseus" else small
                print(f"{row} {label}: {json.dumps(r)}", flush=True)
                results.append((row, label, r))
    finally:
        if tmp is not None:
            tmp.cleanup()
    _table(results, a.scale)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
