"""Hugging Face decoder language models: the Llama-style family (``llama``, ``qwen2``, ``mistral``: RMSNorm,
rotary positions in the rotate-half convention, grouped-query attention, SwiGLU, tied or untied embeddings)
and GPT-2 (LayerNorm, learned positions, fused Conv1D ``c_attn``, tied embeddings).

One adapter class; each model type is a registered instance with its name table (``tables/*.json``).
Adding a decoder whose shape these already cover is one more instance (and a table when its names differ).
Encoder-decoders (T5) are out of scope and refused with one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.model import Model
from transport.core.vocab import check_tokenizer_fits
from transport.errors import TransportError
from transport.families.base import Family
from transport.families.hf_common import activation_name, has_tokenizer
from transport.files import LazyWeights
from transport.hub import local_dir

Tensor = torch.Tensor


def _rope_theta(cfg: Any, name: str) -> float:
    """The rotary base; scaled variants (llama3, yarn, dynamic, ...) are refused rather than silently ignored."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind != "default":
        raise TransportError(f"{name}: rotary scaling '{kind}' is not supported (only the default rotary "
                             "embedding)")
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise TransportError(f"{name}: partial rotary embeddings (partial_rotary_factor {partial}) are not "
                             "supported (only rotation of every head dimension)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _has(keys: Optional[set[str]], suffix: str, default: bool) -> bool:
    return default if keys is None or not keys else any(k.endswith(suffix) for k in keys)


def load_tokenizer(directory: Path, rows: int = 0):
    """The directory's own tokenizer (local files only, transformers' AutoTokenizer), or None when it has none.
    ``rows``: the embedding's rows; a tokenizer with ids beyond them is refused."""
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # notes about special tokens: what matters is checked below
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file is the directory's problem
        raise TransportError(f"{directory}: could not load its tokenizer: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if rows:
        check_tokenizer_fits(tok, rows, f"{directory}: its tokenizer")
    return tok


class DecoderFamily(Family):
    """A causal decoder LM read through its Hugging Face config; ``readout='lm'`` (next-token logits).

    ``base_prefix``: where the causal-LM class keeps its base model (``model.`` / ``transformer.``); a base
    model's own state dict (GPT-2's hub checkpoints, a ``LlamaModel``, a file whose one common prefix was
    stripped, as for a tied model saved without ``lm_head.weight``) gets it back. Checkpoints stream: tensors
    are read one at a time (:class:`~transport.files.LazyWeights`)."""

    module_class = ""
    streams = True

    def __init__(self, name: str, table_name: str, model_types: tuple[str, ...], module_class: str,
                 base_prefix: str = "model."):
        self.name, self.table_name, self.model_types, self.module_class = name, table_name, model_types, module_class
        self.base_prefix = base_prefix

    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> Mapping[str, Tensor]:
        base = self.base_prefix
        if not sd or any(k.startswith(base) for k in sd):
            return sd

        def rename(k: str) -> str:
            return k if k.startswith("lm_head.") else base + k

        return sd.renamed(rename) if isinstance(sd, LazyWeights) else {rename(k): v for k, v in sd.items()}

    def arch_from_config(self, cfg: Any, directory: Any, name: str, keys: Optional[set[str]]) -> Arch:
        mt = getattr(cfg, "model_type", "")
        if self.name == "hf_gpt2":
            return self._gpt2_arch(cfg, name)
        if getattr(cfg, "use_sliding_window", False):
            raise TransportError(f"{name}: sliding-window attention (use_sliding_window) is not supported")
        heads = int(cfg.num_attention_heads)
        width = int(cfg.hidden_size)
        head_dim = int(getattr(cfg, "head_dim", None) or width // heads)
        bias = bool(getattr(cfg, "attention_bias", False))
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        return Arch(family=self.name, name=name, width=width, layers=int(cfg.num_hidden_layers), heads=heads,
                    kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
                    mlp_width=int(cfg.intermediate_size), mlp="gated", act=activation_name(cfg, name), norm="rms",
                    norm_eps=float(cfg.rms_norm_eps), norm_bias=False,
                    qkv_bias=_has(keys, "self_attn.q_proj.bias", bias or mt == "qwen2"),
                    o_bias=_has(keys, "self_attn.o_proj.bias", bias), mlp_bias=_has(keys, "mlp.up_proj.bias", mlp_bias),
                    position="rope", rope_theta=_rope_theta(cfg, name), causal=True, stem="tokens",
                    vocab_size=int(cfg.vocab_size), context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
                    window=self._window(cfg), ln_pre=False, cls_token=False, readout="lm",
                    tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))

    @staticmethod
    def _window(cfg: Any) -> int:
        """The sliding attention window (0: none). Qwen2 configs name one that only ``use_sliding_window`` turns on."""
        if getattr(cfg, "model_type", "") == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            return 0
        return int(getattr(cfg, "sliding_window", None) or 0)

    def _gpt2_arch(self, cfg: Any, name: str) -> Arch:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(cfg, flag, False):
                raise TransportError(f"{name}: GPT-2 option {flag} is not supported")
        if not getattr(cfg, "scale_attn_weights", True):
            raise TransportError(f"{name}: GPT-2 without scaled attention weights is not supported")
        width = int(cfg.n_embd)
        act = {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}
        if cfg.activation_function not in act:
            raise TransportError(f"{name}: activation '{cfg.activation_function}' is not supported")
        return Arch(family=self.name, name=name, width=width, layers=int(cfg.n_layer), heads=int(cfg.n_head),
                    mlp_width=int(cfg.n_inner or 4 * width), act=act[cfg.activation_function],
                    norm_eps=float(cfg.layer_norm_epsilon), position="learned", causal=True, stem="tokens",
                    vocab_size=int(cfg.vocab_size), context=int(cfg.n_positions), ln_pre=False, cls_token=False,
                    readout="lm", tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)))

    def file_tokenizer(self, arch: Arch, explicit: bool) -> Any:
        """With ``--arch hf:ORG/NAME`` / a directory / its config.json: that directory's tokenizer (local files only)."""
        directory = local_dir(arch.name) if explicit else None
        return load_tokenizer(directory, arch.vocab_size) if directory is not None else None

    def load_directory(self, directory: Path, cfg: Any, ref: str, sd: dict[str, Tensor], arch: Arch,
                       stream: bool = False) -> Model:
        params = (self.streamed(sd, arch, str(directory)) if stream else
                  {k: v.float() for k, v in self.to_canonical(sd, arch, str(directory)).items()})
        meta = {"family": self.name, "hf_model_type": str(cfg.model_type),
                "hf_architectures": ",".join(getattr(cfg, "architectures", None) or [])}
        return Model(arch, params, ref=ref, meta=meta, tokenizer=load_tokenizer(directory, arch.vocab_size))

    # -- contract tests -------------------------------------------------------------------------
    def config(self, arch: Arch):
        """A transformers config of ``arch`` (what :meth:`init_module` builds)."""
        import transformers

        if self.name == "hf_gpt2":
            return transformers.GPT2Config(n_embd=arch.width, n_layer=arch.layers, n_head=arch.heads,
                                           n_inner=arch.mlp_width, vocab_size=arch.vocab_size,
                                           n_positions=arch.context, layer_norm_epsilon=arch.norm_eps,
                                           activation_function={"gelu_tanh": "gelu_new"}.get(arch.act, arch.act),
                                           tie_word_embeddings=arch.tied_embeddings, bos_token_id=0, eos_token_id=0)
        cls = getattr(transformers, {"hf_llama": "LlamaConfig", "hf_qwen2": "Qwen2Config",
                                     "hf_mistral": "MistralConfig"}[self.name])
        kw = dict(hidden_size=arch.width, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                  num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, intermediate_size=arch.mlp_width,
                  vocab_size=arch.vocab_size, max_position_embeddings=arch.context, rms_norm_eps=arch.norm_eps,
                  tie_word_embeddings=arch.tied_embeddings, hidden_act=arch.act,
                  rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta})
        if self.name == "hf_llama":
            kw.update(attention_bias=arch.qkv_bias, mlp_bias=arch.mlp_bias)
        if self.name == "hf_mistral":
            kw.update(sliding_window=arch.window or None)
        return cls(**kw)

    def tiny_arch(self) -> Arch:
        if self.name == "hf_gpt2":
            return Arch(family=self.name, name="hf:tiny-gpt2", width=32, layers=2, heads=4, mlp_width=64,
                        act="gelu_tanh", position="learned", causal=True, stem="tokens", vocab_size=64, context=32,
                        ln_pre=False, cls_token=False, readout="lm", tied_embeddings=True)
        return Arch(family=self.name, name=f"hf:tiny-{self.name[3:]}", width=32, layers=2, heads=4, kv_heads=2,
                    mlp_width=48, mlp="gated", act="silu", norm="rms", norm_eps=1e-6, norm_bias=False,
                    qkv_bias=self.name == "hf_qwen2", o_bias=False, mlp_bias=False, position="rope",
                    causal=True, stem="tokens", vocab_size=64, context=64, ln_pre=False, cls_token=False,
                    readout="lm", tied_embeddings=self.name == "hf_qwen2")

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        import transformers

        cls = getattr(transformers, self.module_class)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = cls(self.config(arch))
        return module.float()

    def module_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in module.state_dict().items() if not self.table.ignored(k)}

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(input_ids=inputs).logits


FAMILIES = (
    DecoderFamily("hf_llama", "hf_llama", ("llama",), "LlamaForCausalLM"),
    DecoderFamily("hf_qwen2", "hf_llama", ("qwen2",), "Qwen2ForCausalLM"),
    DecoderFamily("hf_mistral", "hf_llama", ("mistral",), "MistralForCausalLM"),
    DecoderFamily("hf_gpt2", "hf_gpt2", ("gpt2",), "GPT2LMHeadModel", base_prefix="transformer."),
)

__all__ = ["DecoderFamily", "FAMILIES", "load_tokenizer"]
