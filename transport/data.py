"""Tasks: labelled images in [0, 1] with fixed train / val / test splits.

Built-in tasks come from scikit-learn's digits (8x8, shipped inside the package, nothing downloaded):
``digits`` (upright, the zoo's pretraining task) and downstream tasks made by fixed transforms of the
same images (``rot90``, ``invert``, ``hflip``, ...). ``load_image_folder`` reads a user's ImageFolder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from transport.errors import TransportError

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")


@dataclass
class Task:
    """A classification task. ``splits[name] = (images [N, C, H, W] in [0, 1], labels [N])``."""

    name: str
    classnames: list[str]
    splits: dict[str, tuple[Tensor, Tensor]]
    description: str = ""

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.splits:
            raise TransportError(f"task {self.name}: no '{name}' split")
        return self.splits[name]

    def shots(self, k: int, seed: int = 0, split: str = "train") -> tuple[Tensor, Tensor]:
        """K labelled samples per class from ``split`` (train by default, never test), seeded."""
        if k < 1:
            raise TransportError(f"shots must be >= 1, got {k}")
        if split == "test":
            raise TransportError("shots are never drawn from the test split")
        x, y = self.split(split)
        g = torch.Generator().manual_seed(seed)
        idx = []
        for c in range(len(self.classnames)):
            pool = torch.nonzero(y == c).flatten()
            if len(pool) == 0:
                raise TransportError(f"task {self.name}: class '{self.classnames[c]}' has no {split} samples")
            pick = pool[torch.randperm(len(pool), generator=g)[: min(k, len(pool))]]
            idx.append(pick)
        i = torch.cat(idx)
        return x[i], y[i]

    def stratified(self, n: int, seed: int = 0, split: str = "train") -> tuple[Tensor, Tensor]:
        """``n`` labelled images of ``split`` (seeded), classes taken in turn: any prefix is balanced, so no
        class is missing once ``n`` reaches the number of classes (for figures, never for fitting)."""
        if split == "test":
            raise TransportError("display samples are never drawn from the test split")
        x, y = self.split(split)
        g = torch.Generator().manual_seed(seed)
        pools = [p[torch.randperm(len(p), generator=g)] for p in
                 (torch.nonzero(y == c).flatten() for c in range(len(self.classnames)))]
        order = [p[i] for i in range(max((len(p) for p in pools), default=0)) for p in pools if i < len(p)]
        idx = torch.stack(order[:n]) if order and n > 0 else torch.zeros(0, dtype=torch.long)
        return x[idx], y[idx]

    def calibration(self, n: int, seed: int = 0, with_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` unlabelled train images (seeded): Theseus' calibration inputs.

        ``with_labels`` also returns their labels (for colouring figures only; never used to fit anything).
        """
        x, y = self.split("train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[: min(n, len(x))]
        return (x[idx], y[idx]) if with_labels else x[idx]


# ----------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    return x, torch.tensor(d.target, dtype=torch.long)


TRANSFORMS: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "digits": (lambda x: x, "upright digits (the zoo's pretraining task)"),
    "rot90": (lambda x: torch.rot90(x, 1, dims=(-2, -1)), "digits rotated by 90 degrees"),
    "invert": (lambda x: 1.0 - x, "digits with inverted intensities"),
    "hflip": (lambda x: torch.flip(x, dims=(-1,)), "digits mirrored left-right"),
    "rot180": (lambda x: torch.rot90(x, 2, dims=(-2, -1)), "digits rotated by 180 degrees"),
    "transpose": (lambda x: x.transpose(-2, -1), "digits transposed (mirrored on the diagonal)"),
}
DOWNSTREAM = ("rot90", "invert", "hflip")


def split_indices(n: int, seed: int = 1234, frac: tuple[float, float] = (0.6, 0.15)) -> dict[str, np.ndarray]:
    """Fixed train / val / test index split (same for every digits task, so a test image is never trained on)."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(frac[0] * n), int((frac[0] + frac[1]) * n)
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}


def digits_task(name: str) -> Task:
    if name not in TRANSFORMS:
        raise TransportError(f"unknown task '{name}' (built-in: {', '.join(TRANSFORMS)})")
    fn, desc = TRANSFORMS[name]
    x, y = _digits()
    x = fn(x).contiguous()
    idx = split_indices(len(x))
    return Task(name, list(DIGIT_NAMES), {s: (x[i], y[i]) for s, i in idx.items()}, desc)


def builtin_tasks() -> list[str]:
    return list(TRANSFORMS)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(root: str | Path, image_size: int = 224, seed: int = 0) -> Task:
    """An ImageFolder (one sub-folder per class) as a Task with a seeded 60/15/25 split per class."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise TransportError(f"{root}: not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TransportError(f"{root}: no class sub-folders found (expected one sub-folder per class)")
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise TransportError(f"{root / name}: class folder holds no images")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
                    images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
            except (UnidentifiedImageError, OSError) as e:
                raise TransportError(f"{f}: not a readable image ({type(e).__name__})") from None
            labels.append(c)
    x, y = torch.stack(images), torch.tensor(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(len(classes)):
        idx = rng.permutation(np.nonzero(y.numpy() == c)[0])
        n = len(idx)
        a = max(1, int(round(0.6 * n))) if n > 1 else n
        b = a + (max(1, int(round(0.15 * n))) if n - a > 1 else 0)
        parts["train"] += idx[:a].tolist()
        parts["val"] += idx[a:b].tolist()
        parts["test"] += idx[b:].tolist()
    splits = {s: (x[torch.tensor(i, dtype=torch.long)], y[torch.tensor(i, dtype=torch.long)]) for s, i in parts.items()}
    return Task(root.name, classes, splits, f"ImageFolder {root}")


def load_task(name_or_dir: str, image_size: int = 224, seed: int = 0) -> Task:
    """A built-in task by name, or an ImageFolder directory."""
    if name_or_dir in TRANSFORMS:
        return digits_task(name_or_dir)
    p = Path(name_or_dir)
    if p.exists():
        return load_image_folder(p, image_size, seed)
    raise TransportError(f"unknown task '{name_or_dir}' (built-in: {', '.join(TRANSFORMS)}; or an ImageFolder dir)")
