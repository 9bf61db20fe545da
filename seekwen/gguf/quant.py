"""GGUF tensor data -> torch: float types as they are, Q8_0 / Q4_0 blocks split exactly into (q, d), the
other quantized types (K-quants: Q4_K, Q5_K, Q6_K, ...) dequantized by `gguf.quants.dequantize`.

ggml's two plain block formats (32 weights per block, one fp16 scale `d`):

- Q8_0, 34 bytes: d, then 32 int8 `q`; weight = q * d.
- Q4_0, 18 bytes: d, then 16 bytes of nibbles: byte j holds weight j in its low nibble and weight
  j + 16 in its high nibble, each stored as q + 8 (q in -8..7); weight = q * d.

`blocks_q8_0` / `blocks_q4_0` turn raw rows of blocks [N, K // 32 * bytes] into q int8 [N, K] and
d float32 [N, K // 32] with q * d bit-exactly ggml's dequantized value (fp16 -> fp32 is exact, and so is
the one product). `linear_from_blocks` makes the layer that computes with them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .reader import GGUFError, GGUFTensor

QK = 32  # weights per Q8_0 / Q4_0 block
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2}
FLOAT_TYPES = ("F32", "F16", "BF16")
# what the loader reads; any other type is refused with the list (gguf.quants can dequantize these)
DEQUANTIZED_TYPES = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
SUPPORTED_TYPES = (*FLOAT_TYPES, *BLOCK_BYTES, *DEQUANTIZED_TYPES)


def _rows_of_blocks(raw: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """Raw bytes [..., K // 32 * block bytes] -> ([N * K // 32, block bytes] uint8, K)."""
    nb = BLOCK_BYTES[kind]
    if raw.dtype != np.uint8 or raw.shape[-1] % nb:
        raise ValueError(f"{kind}: expected rows of {nb}-byte blocks, got {raw.dtype} {raw.shape}")
    k = raw.shape[-1] // nb * QK
    return np.ascontiguousarray(raw).reshape(-1, nb), k


def blocks_q8_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows [N, K // 32 * 34] (uint8) -> q int8 [N, K], d float32 [N, K // 32]."""
    blocks, k = _rows_of_blocks(raw, "Q8_0")
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [N * K/32, 1]
    q = blocks[:, 2:].copy().view(np.int8)  # [N * K/32, 32]
    n = blocks.shape[0] * QK // k
    return torch.from_numpy(q).reshape(n, k), torch.from_numpy(d).reshape(n, k // QK)


def blocks_q4_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows [N, K // 32 * 18] (uint8) -> q int8 [N, K] in -8..7, d float32 [N, K // 32]."""
    blocks, k = _rows_of_blocks(raw, "Q4_0")
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [N * K/32, 1]
    qs = blocks[:, 2:]  # [N * K/32, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # weights 0..15, then 16..31
    n = blocks.shape[0] * QK // k
    return torch.from_numpy(q).reshape(n, k), torch.from_numpy(d).reshape(n, k // QK)


BLOCKS = {"Q8_0": blocks_q8_0, "Q4_0": blocks_q4_0}


def dequantize_blocks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q [N, K], d [N, K // 32] -> the float32 weight [N, K] (q * d per block of 32)."""
    n, k = q.shape
    return (q.view(n, k // QK, QK).float() * d[..., None]).reshape(n, k)


def linear_from_blocks(kind: str, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None,
                       dequantize: bool = True) -> nn.Module:
    """The linear layer for a Q8_0 / Q4_0 weight given as blocks: q int8 [N, K] (Q4_0: -8..7), d float32
    [N, K // 32], bias [N] or None; computes y = x (q * d)^T + bias.

    A plain fp32 `nn.Linear` with the dequantized weight (exactly ggml's values), so every reference path
    (the plain modules, export, trace) sees an ordinary layer, carrying its blocks as `gguf_blocks` =
    (kind, q, d): the fast path (`fast.prepare`, `fast.linear.block_linear`) builds seekwen's Q8_0 / Q4_0
    kernel layers from those blocks as they are (fusing q/k/v or gate/up by stacking rows of blocks), so
    the weights run quantized, never requantized."""
    if kind not in BLOCKS:
        raise ValueError(f"linear_from_blocks: unknown block format {kind!r} (Q8_0 or Q4_0)")
    # dequantize=False (a lean GGUF load, the fast path runs the blocks): the weight is an untouched
    # allocation, the layer marked `weight_unloaded` (fast.linear.weight_of dequantizes on demand)
    w = dequantize_blocks(q, d) if dequantize else torch.empty(q.shape[0], q.shape[1])  # [N, K]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.weight_unloaded = not dequantize
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    layer.gguf_blocks = (kind, q, d)
    return layer


def to_torch(t: GGUFTensor, file: str) -> torch.Tensor:
    """Any supported tensor as a torch tensor in PyTorch order: F32/F16/BF16 as stored (a copy, not the
    memory map), quantized types dequantized to float32 (the loader then casts to the model's dtype)."""
    check_type(t, file)
    if t.type == "F32" or t.type == "F16":
        return torch.from_numpy(np.array(t.data)).reshape(t.shape)
    if t.type == "BF16":
        raw = np.ascontiguousarray(t.data).view(np.int16)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(t.shape)
    if t.type in BLOCKS:
        q, d = BLOCKS[t.type](t.data)
        w = dequantize_blocks(q, d).reshape(t.shape)
    else:
        import gguf

        w = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[t.type]))
        w = w.reshape(t.shape)
    return w


def check_type(t: GGUFTensor, file: str) -> None:
    if t.type not in SUPPORTED_TYPES:
        raise GGUFError(f"{file}: tensor '{t.name}' has type {t.type}, which seekwen does not read "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
