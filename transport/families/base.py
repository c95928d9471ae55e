"""What a model family provides: its name table, how to find the transported tower in a state dict, and
(for the contract tests) a real module of a tiny configuration to compare the functional forward with."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.model import Model
from transport.errors import TransportError
from transport.files import LazyWeights
from transport.families.table import NameTable, load_table

Tensor = torch.Tensor

#: a head a checkpoint carries next to its tower: ours (``classifier.``) or WiSE-FT / task_vectors'
HEAD_PREFIXES = ("classifier.", "classification_head.")


class Family:
    """One family's adapter. Subclasses set ``name`` and ``table_name`` and override what differs.

    ``model_types``: Hugging Face ``config.model_type`` values this adapter reads (for directories and
    ``hf:`` references).
    """

    name: str = ""
    table_name: str = ""
    model_types: tuple[str, ...] = ()
    squeezable: bool = False  # checkpoints may carry or drop singleton axes (e.g. [1, 1, d] class tokens)
    streams: bool = False  # safetensors checkpoints are read one tensor at a time (large language models)

    @property
    def table(self) -> NameTable:
        return load_table(self.table_name)

    # -- names ----------------------------------------------------------------------------------
    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        """The transported tower's tensors from a (prefix-stripped) state dict of this family."""
        if isinstance(sd, LazyWeights):
            return sd.subset(lambda k: not k.startswith(HEAD_PREFIXES))
        return {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}

    def file_zero_shot(self, sd: Mapping[str, Tensor], arch: Arch, what: str):
        """Zero-shot heads a checkpoint FILE carries (e.g. a CLIP text tower next to the image tower), or None."""
        return None

    def file_tokenizer(self, arch: Arch, explicit: bool) -> Any:
        """The tokenizer of a model read from a file as ``arch`` (``explicit``: the user named the architecture),
        or None."""
        return None

    def to_canonical(self, sd: Mapping[str, Tensor], arch: Arch, what: str = "checkpoint") -> dict[str, Tensor]:
        tower = self.tower(sd, arch)
        self.table.check_tensors(tower, arch, what, self.squeezable)
        return self.table.to_canonical(tower, arch, what)

    def streamed(self, sd: Mapping[str, Tensor], arch: Arch, what: str = "checkpoint") -> Mapping[str, Tensor]:
        """:meth:`to_canonical` read block by block when asked for (:class:`~transport.core.streamed.StreamedParams`)
        when ``sd`` is a :class:`~transport.files.LazyWeights`; else the same tensors, resident."""
        tower = self.tower(sd, arch)
        if not isinstance(tower, LazyWeights):
            return {k: v.float() for k, v in self.to_canonical(sd, arch, what).items()}
        self.table.check_tensors(tower, arch, what, self.squeezable)
        return self.table.streamed(tower, arch, what)

    def from_canonical(self, params: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        return self.table.from_canonical(params, arch)

    def family_shapes(self, arch: Arch) -> dict[str, tuple[int, ...]]:
        return self.table.family_shapes(arch)

    def checkpoint_names(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str],
                         full_model: bool = False) -> tuple[dict[str, Tensor], str]:
        """Family-named tensors under the names the target checkpoint's own class loads (``meta``: the target
        model's), and a phrase saying which names those are. ``full_model``: a whole multi-tower model's names
        (families that have such a wrapper override this)."""
        if full_model:
            raise TransportError(f"{self.name}: there is no full-model naming other than its own; drop the option")
        return dict(tensors), f"{self.name} names"

    # -- loading ----------------------------------------------------------------------------------
    def arch_from_config(self, cfg: Any, directory: Any, name: str, keys: Optional[set[str]]) -> Arch:
        raise NotImplementedError

    def load_directory(self, directory: Any, cfg: Any, ref: str, sd: dict[str, Tensor], arch: Arch,
                       stream: bool = False) -> Model:
        raise NotImplementedError

    # -- contract tests -------------------------------------------------------------------------
    def tiny_arch(self) -> Arch:
        """A small random-init configuration of this family (for tests)."""
        raise NotImplementedError

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        """The family's real module for ``arch`` with its own random initialisation (seeded; global RNG untouched)."""
        raise NotImplementedError

    def build_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        """:meth:`init_module` in eval mode with every parameter perturbed (families zero-init some tensors;
        random values make every check of the contract tests meaningful)."""
        module = self.init_module(arch, seed).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return module

    def module_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        """The module's state dict in the names this adapter reads."""
        return dict(module.state_dict())

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        """What the functional forward must reproduce (features, or logits for a language model)."""
        raise NotImplementedError

    def example_inputs(self, arch: Arch, n: int = 3, seed: int = 0) -> Tensor:
        """Inputs the functional forward takes (preprocessed pixels or token ids) for the contract test."""
        g = torch.Generator().manual_seed(seed)
        if arch.stem == "image":
            return torch.randn(n, arch.in_chans, arch.image_size, arch.image_size, generator=g)
        return torch.randint(0, arch.vocab_size, (n, min(arch.context or 16, 16)), generator=g)


__all__ = ["Family", "HEAD_PREFIXES"]
