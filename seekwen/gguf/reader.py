"""One GGUF file opened through the `gguf` package (`gguf.GGUFReader`, memory-mapped): its metadata as
plain Python values and its tensors by name, every failure as a `GGUFError` that names the file.

GGUF writes a tensor's dimensions in ggml order (`ne`, fastest first); the reader gives each tensor's
data in PyTorch order (the reverse), so `shape` below is what `torch` calls the shape: an [out, in]
weight is [out, in] here too. Quantized tensors come as raw bytes, one row of blocks per output row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..hf.loader import CheckpointError


class GGUFError(CheckpointError):
    """A GGUF file seekwen cannot load: the message names the file and, where it applies, the tensor or key."""


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install 'seekwen[gguf]'") from e
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its ggml type name ("F32", "Q8_0", ...), its PyTorch-order shape, and its
    data (a memory-mapped numpy view: float for F32/F16, raw uint8 blocks for everything else)."""

    name: str
    type: str
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """`GGUFFile(path)`: `.meta` (key -> value), `.tensors` (name -> GGUFTensor), `.arch`."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        try:
            reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                self.meta[key] = _field_value(field, gguf)
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
        self.arch = self.meta.get("general.architecture")
        if not isinstance(self.arch, str):
            raise GGUFError(f"{self.path}: no 'general.architecture' in the metadata")

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value; a key without a dot is the architecture's own (`block_count` -> `qwen2.block_count`)."""
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        return self.meta.get(full, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
            raise GGUFError(f"{self.path}: required metadata key '{full}' is missing")
        return value


def _field_value(field, gguf) -> Any:
    """A metadata field as a Python value: str, int, float, bool, or a list of them."""
    types = field.types
    VT = gguf.GGUFValueType
    if not types:
        return None
    if types[0] == VT.ARRAY:
        item = types[-1] if len(types) > 1 else None
        parts = [field.parts[i] for i in field.data]
        if item == VT.STRING:
            return [bytes(p).decode("utf-8", errors="replace") for p in parts]
        return [p.tolist()[0] for p in parts]
    if types[0] == VT.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    value = field.parts[-1].tolist()[0]
    return bool(value) if types[0] == VT.BOOL else value
