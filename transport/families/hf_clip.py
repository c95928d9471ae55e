"""Hugging Face CLIP vision towers: ``CLIPModel`` (vision tower + ``visual_projection``; a zero-shot head
from its text tower when the directory has a tokenizer), ``CLIPVisionModel`` and
``CLIPVisionModelWithProjection``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from transport.core.arch import CLIP_MEAN, CLIP_STD, Arch
from transport.core.heads import Classifier, ZeroShotHeads, zero_shot_classifier
from transport.core.model import Model
from transport.errors import TransportError
from transport.families.base import Family
from transport.families.hf_common import activation_name, has_tokenizer, processor_stats

Tensor = torch.Tensor


class HFClipFamily(Family):
    name = "hf_clip"
    table_name = "hf_clip_vision"
    model_types = ("clip", "clip_vision_model")

    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        if not any(k.startswith("vision_model.") for k in sd) and any(
                k.startswith(("embeddings.", "encoder.layers.")) for k in sd):
            # transformers >= 5 saves a CLIPVisionModel without its ``vision_model.`` wrapper
            sd = {(k if k.startswith(("visual_projection.", "classifier.")) else f"vision_model.{k}"): v
                  for k, v in sd.items()}
        if any(k.startswith(("text_model.", "text_projection.", "logit_scale")) for k in sd):
            return {k: v for k, v in sd.items() if k.startswith("vision_model.")
                    or (k.startswith("visual_projection.") and arch.output_dim)}
        return {k: v for k, v in sd.items() if not k.startswith("classifier.")}

    def checkpoint_names(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str],
                         full_model: bool = False) -> tuple[dict[str, Tensor], str]:
        if full_model:
            return super().checkpoint_names(tensors, meta, full_model)
        classes = meta.get("hf_architectures", "").split(",")
        if "CLIPVisionModel" in classes:  # transformers >= 5 names it without the vision_model. wrapper
            return ({k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in tensors.items()},
                    "CLIPVisionModel names")
        which = next((c for c in classes if c), "CLIPModel / CLIPVisionModelWithProjection")
        return dict(tensors), f"{which} names (vision_model.*)"

    def arch_from_config(self, cfg: Any, directory: Path, name: str, keys: Optional[set[str]]) -> Arch:
        mt = getattr(cfg, "model_type", "")
        v = cfg.vision_config if mt == "clip" else cfg
        if keys is not None:
            has_proj = any(k.endswith("visual_projection.weight") for k in keys)
        else:
            has_proj = mt == "clip" or any("WithProjection" in a for a in (getattr(cfg, "architectures", None) or []))
        proj_dim = int(getattr(cfg, "projection_dim", 0) or 0) if has_proj else 0
        mean, std = processor_stats(directory, CLIP_MEAN, CLIP_STD)
        return Arch(family=self.name, name=name, image_size=int(v.image_size), patch_size=int(v.patch_size),
                    width=int(v.hidden_size), layers=int(v.num_hidden_layers), heads=int(v.num_attention_heads),
                    mlp_width=int(v.intermediate_size), output_dim=proj_dim, in_chans=int(v.num_channels),
                    act=activation_name(v, name), norm_eps=float(v.layer_norm_eps), ln_pre=True, patch_bias=False,
                    mean=mean, std=std)

    def load_directory(self, directory: Path, cfg: Any, ref: str, sd: dict[str, Tensor], arch: Arch,
                       stream: bool = False) -> Model:
        params = (self.streamed(sd, arch, str(directory)) if stream else
                  {k: v.float() for k, v in self.to_canonical(sd, arch, str(directory)).items()})
        zero_shot = None
        if cfg.model_type == "clip" and "text_projection.weight" in sd and has_tokenizer(directory):
            scale = float(sd["logit_scale"].float().exp()) if "logit_scale" in sd else 100.0
            zero_shot = ZeroShotHeads(_text_tower(directory, scale))
        meta = {"family": self.name, "hf_model_type": str(cfg.model_type),
                "hf_architectures": ",".join(getattr(cfg, "architectures", None) or [])}
        return Model(arch, params, ref=ref, zero_shot=zero_shot, meta=meta)

    def tiny_arch(self) -> Arch:
        return Arch(family=self.name, name="hf:tiny-clip-vision", image_size=8, patch_size=2, width=32, layers=2,
                    heads=4, mlp_width=64, output_dim=16, act="quick_gelu", norm_eps=1e-5, ln_pre=True)

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig(hidden_size=arch.width, num_hidden_layers=arch.layers,
                               num_attention_heads=arch.heads, intermediate_size=arch.mlp_width,
                               image_size=arch.image_size, patch_size=arch.patch_size,
                               projection_dim=arch.output_dim or 16, hidden_act=arch.act,
                               layer_norm_eps=arch.norm_eps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIPVisionModelWithProjection(cfg)

    def module_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(pixel_values=inputs).image_embeds


def _text_tower(directory: Path, logit_scale: float):
    """A zero-shot head builder from a CLIPModel directory's text tower and tokenizer (loaded on first use)."""
    state: dict[str, Any] = {}

    def build(classnames: list[str]) -> Classifier:
        if "model" not in state:
            from transformers import AutoTokenizer, CLIPModel
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = CLIPModel.from_pretrained(str(directory), local_files_only=True).float().eval()
                state["tokenizer"] = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise TransportError(f"{directory}: could not load the CLIP text tower: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            model.vision_model = None  # only the text tower is needed from here on
            state["model"] = model
        model, tok = state["model"], state["tokenizer"]
        max_len = int(model.config.text_config.max_position_embeddings)

        def encode_text(texts: list[str]) -> Tensor:
            enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return out.pooler_output if hasattr(out, "pooler_output") else out

        return zero_shot_classifier(encode_text, classnames, logit_scale)

    return build


FAMILY = HFClipFamily()

__all__ = ["FAMILY", "HFClipFamily"]
