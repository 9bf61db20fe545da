"""Which model a command or the server runs, and where: the bundled model by default, the device
picked from what is there, fp32 on CPU. Shared by the CLI tools and the HTTP server."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

BUNDLED_NAME = "seekwen-kjv-v3"


def bundled_model_path() -> Path:
    """The small DeepSeek-V3-style model shipped inside the package (trained by `seekwen train`)."""
    return Path(__file__).resolve().parent.parent / "assets" / BUNDLED_NAME


def pick_device(name: str | None) -> str:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path(arg: str | None) -> str:
    return str(bundled_model_path()) if arg is None else arg


def load_model(arg: str | None, dtype: str | None = None, device: str | None = None, **kw):
    """Load for a CLI command: the bundled model by default; fp32 on CPU (bf16 compute is slow there)."""
    import seekwen  # seekwen.load: one process, or this rank's shard under torchrun

    dev = pick_device(device)
    if dtype is None and dev == "cpu":
        dtype = "float32"
    return seekwen.load(model_path(arg), dtype=dtype, device=dev, **kw)
