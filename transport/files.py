"""Files: reading safetensors and PyTorch checkpoints without executing pickles, and writing
safetensors deterministically and atomically.

Every failure is a one-line :class:`TransportError` that names the file and the problem. Whole pickled
modules load only with ``trust_pickle=True``. :func:`write_safetensors` writes bytes that depend only
on the content (sorted names, sorted metadata), through a temporary file renamed into place.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from transport.errors import TransportError

Tensor = torch.Tensor

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "model.", "clip_model.")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; truncated or foreign files give one clear line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise TransportError(f"{path}: file not found")
    if path.is_dir():
        raise TransportError(f"{path}: is a directory, expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TransportError(f"{path}: not a readable safetensors file (truncated or another format): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tensors, md


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the string metadata of a safetensors file (no tensors read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TransportError(f"{path}: not a readable safetensors file (truncated or another format): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _unreadable(path: Path, e: BaseException) -> TransportError:
    return TransportError(f"{path}: not a readable safetensors file (truncated or another format): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Name -> (dtype code, shape) of every tensor of a safetensors file, and its metadata (no data read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TransportError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (str(sl.get_dtype()), tuple(int(n) for n in sl.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    return header, md


def all_finite(t: Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value of ``t`` is finite, checked in chunks (``torch.isfinite`` on a whole embedding
    makes temporaries as large as the tensor)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


class LazyWeights(Mapping[str, Tensor]):
    """Tensors of safetensors files read one at a time, when asked for: each from its file's memory map,
    copied into memory of its own as ``dtype`` (the map is released at once); besides what the caller keeps,
    only the last tensor read is held. Shapes and dtypes come from the headers (:meth:`shape`,
    :meth:`is_floating`). A tensor that is not floating point or holds NaN/Inf is one line naming its file."""

    def __init__(self, where: Mapping[str, tuple[Path, str]], header: Mapping[str, tuple[str, tuple[int, ...]]],
                 dtype: torch.dtype = torch.float32):
        self._where = dict(where)  # key -> (file, the tensor's name in that file)
        self._header = dict(header)  # key -> (dtype code, shape)
        self.dtype = dtype
        self._last: Optional[tuple[str, Tensor]] = None

    @classmethod
    def of_file(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple["LazyWeights", dict[str, str]]:
        header, md = safetensors_header(path)
        return cls({k: (Path(path), k) for k in header}, header, dtype), md

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._header[key][1]

    def is_floating(self, key: str) -> bool:
        return self._header[key][0] in FLOAT_CODES

    def renamed(self, rename) -> "LazyWeights":
        """The same tensors under new keys (``rename(old) -> new``), nothing read."""
        out = LazyWeights({rename(k): w for k, w in self._where.items()},
                          {rename(k): h for k, h in self._header.items()}, self.dtype)
        return out

    def subset(self, keep) -> "LazyWeights":
        """The tensors whose key satisfies ``keep(key)``, nothing read."""
        return LazyWeights({k: w for k, w in self._where.items() if keep(k)},
                           {k: h for k, h in self._header.items() if keep(k)}, self.dtype)

    def __getitem__(self, key: str) -> Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        from safetensors import SafetensorError, safe_open

        path, name = self._where[key]
        code = self._header[key][0]
        if code not in FLOAT_CODES:
            raise TransportError(f"{path}: tensor {name} holds {code} values; weights must be floating point")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _unreadable(path, e) from None
        t = raw.to(self.dtype) if raw.dtype != self.dtype else raw.clone()  # own memory, not the file's map
        del raw
        if not all_finite(t):
            raise TransportError(f"{path}: tensor {name} contains NaN or Inf values")
        self._last = (key, t)
        return t


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        n = int.from_bytes(head[:8], "little")
        return 2 <= n < 100_000_000 and head[8:9] == b"{"
    except OSError:
        return False


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False,
                    lazy: bool = False) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    """A flat name -> tensor dict from any supported checkpoint form, plus metadata (safetensors only).

    Unwraps ``state_dict`` / ``model_state_dict`` / ``model`` and strips ``module.``, ``model.``,
    ``clip_model.`` prefixes. Whole pickled modules load only with ``trust_pickle``. ``lazy``: a safetensors
    file gives a :class:`LazyWeights` (float32 tensors read one at a time).
    """
    path = Path(path)
    if not path.exists():
        raise TransportError(f"{path}: file not found")
    if path.is_dir():
        raise TransportError(f"{path}: is a directory (for a Hugging Face model directory use it as the reference)")
    if path.stat().st_size == 0:
        raise TransportError(f"{path}: file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, md = LazyWeights.of_file(path) if lazy else read_safetensors(path)
        return strip_prefixes(tensors), md
    obj = _torch_load(path, trust_pickle)
    return strip_prefixes(_unwrap(obj, path)), {}


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    cut = text.find(". ")
    return text[:cut + 1] if 0 < cut < 200 else text[:200]


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only``; a pickle that needs more is named by what it would import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it in one line
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # the weights-only unpickler refused something: find out what below
    except (RuntimeError, OSError, EOFError) as e:  # torch's zip reader: cut or damaged archives
        raise TransportError(f"{path}: not a readable checkpoint (truncated or damaged): {_first_sentence(e)}") from None
    except Exception:  # noqa: BLE001 - garbage bytes make the unpickler fail in arbitrary ways (KeyError, ...)
        raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                             f"a PyTorch file)") from None
    from transport.pickles import is_legacy_torch_file, pickle_globals, weights_only_allowed

    names = pickle_globals(path)
    if names is None:  # not a pickle at all
        raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                             f"a PyTorch file)")
    allowed = weights_only_allowed()
    blocked = [n for n in dict.fromkeys(names) if n not in allowed]
    if not trust_pickle:
        if blocked:
            more = f", and {len(blocked) - 1} more" if len(blocked) > 1 else ""
            raise TransportError(f"{path}: this file runs code when loaded (GLOBAL {blocked[0]}{more}); "
                                 f"pass --trust-pickle only if you trust it")
        raise TransportError(f"{path}: a pickle that only full unpickling reads (not written by torch.save); "
                             f"pass --trust-pickle only if you trust it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if zipfile.is_zipfile(path) or is_legacy_torch_file(path):
                return torch.load(str(path), map_location="cpu", weights_only=False)
            with open(path, "rb") as f:  # a raw pickle stream (pickle.dump), which torch.load does not read
                return pickle.load(f)
    except ModuleNotFoundError as e:  # the pickle names classes of the code that saved it
        raise TransportError(f"{path}: could not load even with --trust-pickle: the file pickles objects of module "
                             f"'{e.name}', which is not importable here; run from the repository that saved it, or "
                             f"add that repository to PYTHONPATH (e.g. PYTHONPATH=/path/to/repo), or re-save the "
                             f"file as a state dict there") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle is the file's problem
        raise TransportError(f"{path}: could not load even with --trust-pickle: {type(e).__name__}: "
                             f"{_first_sentence(e)}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for _ in range(3):
        if isinstance(obj, Mapping):
            for k in WRAPPER_KEYS:
                if k in obj and isinstance(obj[k], (Mapping, torch.nn.Module)):
                    obj = obj[k]
                    obj = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise TransportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TransportError(f"{path}: holds no tensors")
    return tensors


def strip_prefixes(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``sd`` without the wrapper prefixes every key carries (a :class:`LazyWeights` stays lazy)."""
    keys = list(sd)
    names = list(keys)
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if names and all(k.startswith(p) for k in names):
                names = [k[len(p):] for k in names]
                changed = True
    rename = dict(zip(keys, names))
    if isinstance(sd, LazyWeights):
        return sd.renamed(rename.__getitem__)
    return {rename[k]: v for k, v in sd.items()}


def strip_prefix_if_all(sd: Mapping[str, Tensor], prefix: str, keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    body = [k for k in sd if not k.startswith(keep)] if keep else list(sd)
    if body and all(k.startswith(prefix) for k in body):
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return dict(sd)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.complex64: "C64"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors encoding of ``tensors`` whose bytes depend only on the content.

    Tensors are laid out by item size, then name, and the JSON header has sorted keys (the reference
    serialiser's metadata order varies from process to process).
    """
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    # larger items first (then by name), so every tensor's data starts aligned to its item size
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise TransportError(f"cannot write tensor {name} of dtype {t.dtype} as safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    if sys.byteorder != "little":  # safetensors is little-endian; this writer copies native bytes
        raise TransportError("writing safetensors needs a little-endian machine")
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Deterministic (:func:`safetensors_bytes`) and atomic (:func:`write_atomic`) safetensors file."""
    return write_atomic(path, safetensors_bytes(tensors, metadata))


def read_weights(directory: Path) -> Mapping[str, Tensor]:
    """The tensors of a Hugging Face model directory (single file or shards), safetensors preferred: a
    :class:`LazyWeights` over the safetensors files (nothing read yet), else the ``.bin`` files' tensors."""
    f = directory / "model.safetensors.index.json"
    if f.is_file():
        where, header = {}, {}
        for shard, keys in _shards(f).items():
            if not (directory / shard).is_file():
                raise TransportError(f"{f}: names shard {shard}, which is missing")
            held, _ = safetensors_header(directory / shard)
            lacking = [k for k in keys if k not in held]
            if lacking:
                raise TransportError(f"{f}: lists {lacking[0]} in {shard}, which does not hold it"
                                     + (f" (nor {len(lacking) - 1} more)" if len(lacking) > 1 else ""))
            where.update({k: (directory / shard, k) for k in keys})
            header.update({k: held[k] for k in keys})
        return strip_prefixes(LazyWeights(where, header))
    f = directory / "pytorch_model.bin.index.json"
    if f.is_file():
        sd: dict[str, Tensor] = {}
        for shard in _shards(f):
            if not (directory / shard).is_file():
                raise TransportError(f"{f}: names shard {shard}, which is missing")
            sd.update(read_checkpoint(directory / shard)[0])
        return strip_prefixes(sd)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_checkpoint(directory / name, lazy=True)[0]
    raise TransportError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


def _shards(index: Path) -> dict[str, list[str]]:
    """Shard file -> the tensor names a weight index places there (sorted)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, list[str]] = {}
        for k, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise ValueError(shard)
            out.setdefault(shard, []).append(str(k))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise TransportError(f"{index}: malformed weight index") from None
    return {s: sorted(ks) for s, ks in sorted(out.items())}


__all__ = ["all_finite", "read_safetensors", "read_safetensors_metadata", "safetensors_header", "LazyWeights", "FLOAT_CODES", "read_checkpoint", "strip_prefixes", "strip_prefix_if_all",
           "safetensors_bytes", "write_atomic", "write_safetensors", "read_weights", "WRAPPER_KEYS", "STRIP_PREFIXES"]
