"""Preallocated KV caches.

Row b of a cache holds token positions 0..lens[b]-1 at slots 0..lens[b]-1 (slot = position), so rows
of different lengths share one tensor with no padding holes and attention needs only the positional
mask `key_slot <= query_position`. Nothing grows per step: `max_len` slots are allocated up front.

- standard attention (MHA/GQA): k [B, T, H_kv, d], v [B, T, H_kv, d_v] per layer;
- MLA: only the compressed latent c_kv [B, T, kv_lora_rank] and the shared rotated key k_pe
  [B, T, qk_rope_head_dim] per layer; that is all DeepSeek-V2/V3 need to keep per token.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.cfg = cfg
        self.max_len = max_len
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ntk_alpha: torch.Tensor | None = None  # Qwen v1 dynamic NTK, fixed at prefill
        B, T = batch_size, max_len
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if cfg.mla is not None:
                m = cfg.mla
                layer = {
                    "kv": torch.zeros(B, T, m.kv_lora_rank, dtype=dtype, device=device),
                    "pe": torch.zeros(B, T, m.qk_rope_head_dim, dtype=dtype, device=device),
                }
            else:
                H, d = cfg.num_kv_heads, cfg.head_dim
                layer = {
                    "k": torch.zeros(B, T, H, d, dtype=dtype, device=device),
                    "v": torch.zeros(B, T, H, d, dtype=dtype, device=device),
                }
            self.layers.append(layer)

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def bytes_per_token(self) -> int:
        return self.nbytes() // (self.batch_size * self.max_len)

    def write(self, layer: int, positions: torch.Tensor, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new entries [B, S, ...] at slots `positions` [B, S]; return views of slots [0, T_used)."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(
                f"KV cache is full: position {int(positions.max())} does not fit in {self.max_len} slots"
            )
        store = self.layers[layer]
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        for name, t in new.items():
            store[name][rows, positions] = t.to(store[name].dtype)
        used = int(positions.max()) + 1
        return {name: t[:, :used] for name, t in store.items()}

    def reset(self) -> None:
        self.lens.zero_()
        self.ntk_alpha = None
