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

    @property
    def labelled(self) -> bool:
        """False for images without classes (an ImageFolder with no class sub-folders; labels are -1)."""
        return bool(self.classnames)

    def shot_counts(self, k: int, split: str = "train") -> dict[str, int]:
        """How many samples :meth:`shots` really draws per class: K, or fewer where the split has fewer."""
        _, y = self.split(split)
        return {c: min(k, int((y == i).sum())) for i, c in enumerate(self.classnames)}

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
        if not self.labelled:
            raise TransportError(f"task {self.name}: the images have no classes, so there are no labelled shots")
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


#: the largest seed every generator used here accepts (numpy's takes no negative seed, torch's 64 bits)
MAX_SEED = 2**63 - 1


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise TransportError(f"seed must be an integer in 0..{MAX_SEED} (2**63 - 1), got {seed}")


def load_image_folder(root: str | Path, image_size: int = 224, seed: int = 0) -> Task:
    """An ImageFolder as a Task: one sub-folder per class with a seeded 60/15/25 split per class, or
    images directly in ``root`` (no sub-folders) as an unlabelled task (every image in the train split)."""
    check_seed(seed)
    root = Path(root)
    if not root.is_dir():
        raise TransportError(f"{root}: not a directory (expected one sub-folder per class)")
    entries = _listdir(root)
    classes = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if classes and loose:
        raise TransportError(f"{root}: holds class sub-folders and also {len(loose)} image(s) outside them "
                             f"(e.g. {loose[0].name}); put every image in a class folder, or none for unlabelled data")
    if not classes:
        if not loose:
            raise TransportError(f"{root}: no class sub-folders found (expected one sub-folder per class, "
                                 "or images directly in it for unlabelled data)")
        x = torch.stack([load_image(f, image_size) for f in loose])
        y = torch.full((len(x),), -1, dtype=torch.long)
        empty = (x[:0], y[:0])
        return Task(root.name, [], {"train": (x, y), "val": empty, "test": empty}, f"unlabelled images {root}")
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in _listdir(root / name) if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise TransportError(f"{root / name}: class folder holds no images")
        for f in files:
            images.append(load_image(f, image_size))
            labels.append(c)
    x, y = torch.stack(images), torch.tensor(labels)
    parts = split_groups(y.numpy(), seed)  # every class holds images (checked above): the same order as its index
    splits = {s: (x[torch.tensor(i, dtype=torch.long)], y[torch.tensor(i, dtype=torch.long)]) for s, i in parts.items()}
    return Task(root.name, classes, splits, f"ImageFolder {root}")


def split_groups(labels: np.ndarray, seed: int) -> dict[str, list[int]]:
    """Seeded 60 / 15 / 25 % split per label value, in increasing label order (with two or more items a label
    keeps one in train, with three or more one in validation); the ImageFolder and text-file loaders' rule."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n = len(idx)
        a = max(1, int(round(0.6 * n))) if n > 1 else n
        b = a + (max(1, int(round(0.15 * n))) if n - a > 1 else 0)
        parts["train"] += idx[:a].tolist()
        parts["val"] += idx[a:b].tolist()
        parts["test"] += idx[b:].tolist()
    return parts


def _listdir(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError as e:
        raise TransportError(f"{d}: cannot read the folder ({e.strerror or type(e).__name__})") from None


def load_image(f: Path, image_size: int) -> Tensor:
    """One image file -> [3, S, S] float32 in [0, 1], each mode scaled by its own range (8-bit, 16-bit,
    32-bit integers holding 16-bit data, floats in [0, 1]); decompression bombs are refused."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return _high_bit(f, im, image_size)
            im = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    except Image.DecompressionBombError as e:
        raise TransportError(f"{f}: refusing to decode, a possible decompression bomb "
                             f"({str(e).split(',')[0]})") from None
    except TransportError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged image makes PIL fail in many ways (OSError, SyntaxError, ...)
        raise TransportError(f"{f}: not a readable image ({type(e).__name__})") from None


def _high_bit(f: Path, im, image_size: int) -> Tensor:
    """A single-channel 16-bit, 32-bit integer or float image, scaled to [0, 1] by its mode's range."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        g = a.astype(np.float32) / 65535.0
    elif im.mode == "I":  # 32-bit integers: the mode 16-bit images decode to in some formats
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise TransportError(f"{f}: 32-bit integer image with values in [{a.min()}, {a.max()}]; "
                                 "only 0..65535 (16-bit data) can be scaled, convert it to 8 or 16 bits")
        g = a.astype(np.float32) / 65535.0
    else:  # 'F': floats, which must already be intensities in [0, 1]
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise TransportError(f"{f}: floating-point image with values in [{np.nanmin(a):g}, {np.nanmax(a):g}]; "
                                 "expected intensities in [0, 1]")
        g = a.astype(np.float32)
    if g.shape != (image_size, image_size):
        g = np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
        g = np.clip(g, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(g)).unsqueeze(0).expand(3, -1, -1).contiguous()


def load_task(name_or_dir: str, image_size: int = 224, seed: int = 0) -> Task:
    """A built-in task by name, or an ImageFolder directory."""
    if name_or_dir in TRANSFORMS:
        return digits_task(name_or_dir)
    p = Path(name_or_dir)
    if p.exists():
        return load_image_folder(p, image_size, seed)
    raise TransportError(f"unknown task '{name_or_dir}' (built-in: {', '.join(TRANSFORMS)}; or an ImageFolder dir)")
