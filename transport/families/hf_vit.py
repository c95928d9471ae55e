"""Hugging Face ViTs: ``ViTModel`` and ``ViTForImageClassification`` (its classifier becomes the model's head)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from transport.core.arch import IMAGENET_HALF, Arch
from transport.core.heads import Classifier
from transport.core.model import Model
from transport.errors import TransportError
from transport.families.base import Family
from transport.families.hf_common import activation_name, processor_stats
from transport.files import strip_prefix_if_all

Tensor = torch.Tensor


class HFViTFamily(Family):
    name = "hf_vit"
    table_name = "hf_vit"
    model_types = ("vit",)
    squeezable = True

    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        sd = strip_prefix_if_all(sd, "vit.", keep=("classifier.",))
        return {k: v for k, v in sd.items() if not k.startswith("classifier.")}

    def checkpoint_names(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str],
                         full_model: bool = False) -> tuple[dict[str, Tensor], str]:
        if full_model:
            return super().checkpoint_names(tensors, meta, full_model)
        if "ViTForImageClassification" in meta.get("hf_architectures", "").split(","):
            return {f"vit.{k}": v for k, v in tensors.items()}, "ViTForImageClassification names (vit.*)"
        return dict(tensors), "ViTModel names"

    def arch_from_config(self, cfg: Any, directory: Path, name: str, keys: Optional[set[str]]) -> Arch:
        if not getattr(cfg, "qkv_bias", True):
            raise TransportError(f"{name}: ViT without q/k/v biases (qkv_bias=False) is not supported")
        mean, std = processor_stats(directory, IMAGENET_HALF, IMAGENET_HALF)
        return Arch(family=self.name, name=name, image_size=int(cfg.image_size), patch_size=int(cfg.patch_size),
                    width=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers), heads=int(cfg.num_attention_heads),
                    mlp_width=int(cfg.intermediate_size), output_dim=0, in_chans=int(cfg.num_channels),
                    act=activation_name(cfg, name), norm_eps=float(cfg.layer_norm_eps), ln_pre=False,
                    patch_bias=True, mean=mean, std=std)

    def load_directory(self, directory: Path, cfg: Any, ref: str, sd: dict[str, Tensor], arch: Arch,
                       stream: bool = False) -> Model:
        params = (self.streamed(sd, arch, str(directory)) if stream else
                  {k: v.float() for k, v in self.to_canonical(sd, arch, str(directory)).items()})
        body = {k[len("vit."):] if k.startswith("vit.") else k: sd[k] for k in sd  # the head alone: nothing else read
                if k.removeprefix("vit.").startswith("classifier.")}
        head = None
        if "classifier.weight" in body:
            w = body["classifier.weight"].float()
            id2label = getattr(cfg, "id2label", None) or {}
            names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(w.shape[0])]
            head = Classifier(w, body["classifier.bias"].float() if "classifier.bias" in body else None,
                              classnames=names)
        meta = {"family": self.name, "hf_model_type": str(cfg.model_type),
                "hf_architectures": ",".join(getattr(cfg, "architectures", None) or [])}
        return Model(arch, params, ref=ref, head=head, meta=meta)

    def tiny_arch(self) -> Arch:
        return Arch(family=self.name, name="hf:tiny-vit", image_size=8, patch_size=2, width=32, layers=2, heads=4,
                    mlp_width=64, act="gelu", norm_eps=1e-12, ln_pre=False, patch_bias=True, mean=IMAGENET_HALF,
                    std=IMAGENET_HALF)

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(hidden_size=arch.width, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                        intermediate_size=arch.mlp_width, image_size=arch.image_size, patch_size=arch.patch_size,
                        hidden_act=arch.act, layer_norm_eps=arch.norm_eps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ViTModel(cfg, add_pooling_layer=False)

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(pixel_values=inputs).last_hidden_state[:, 0]


FAMILY = HFViTFamily()

__all__ = ["FAMILY", "HFViTFamily"]
