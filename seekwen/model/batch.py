"""What one forward call is given besides the token ids: the `ForwardBatch`, and the `KVStore` protocol
through which attention layers write and read cached keys.

The model never decides how sequences are laid out in memory or how long they are: the runtime
(`seekwen.runtime.decoder.Decoder`) knows each sequence's length and where its keys live, and describes
one call to the model as a `ForwardBatch` (positions of the new tokens, rotary tables, how many key
slots each row sees, where to write). A cache-less call (`model(ids)`, the reference and training path)
builds its own batch from the attention mask (`Transformer.batch`).

A KV store is anything with the three methods below: `runtime.cache.KVCache` (slot = position rows)
implements it, and so does the block-paged cache's per-call view (`runtime.paged.PagedView`), without
the model changing. A store may also offer `blocks(layer) -> (pools, block_table [B, nb] int32,
block_size)`: the fast path's decode kernels then read the keys in place (`fast.paged_kernels`) after a
`write(..., n_keys=0)`, which stores without returning anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .rope import rope_matrix


class KVStore(Protocol):
    """Per-layer key/value storage for the rows of one forward call."""

    def is_ring(self, layer: int) -> bool:
        """Whether `layer` (a sliding-window layer) keeps only its window, in a ring buffer."""
        ...

    def write(self, layer: int, positions: torch.Tensor, n_keys: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new entries [B, S, ...] (named "k"/"v", or MLA's "kv"/"pe") at `positions` [B, S];
        return every entry of slots [0, n_keys) per row, [B, n_keys, ...], slot t holding position t."""
        ...

    def write_ring(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sliding-window layer: store k/v [B, S, H, d] (valid [B, S] marks real tokens) and return
        (keys [B, T, H, d], values, key positions [B, T], -1 for an empty slot) the queries may see."""
        ...


@dataclass
class ForwardBatch:
    """Everything every layer of one forward call shares."""

    positions: torch.Tensor  # [B, S] absolute position of each new token
    cos: torch.Tensor  # [B, S, rope_dim/2] rotary tables for those positions
    sin: torch.Tensor
    kv: KVStore | None = None  # where keys are written and read; None: attend over the new tokens only
    n_keys: int = 0  # with kv: slots [0, n_keys) hold every key this call can see (max position + 1)
    key_counts: list[int] | None = None  # one new token per row: keys each row sees (its position + 1)
    new_valid: torch.Tensor | None = None  # [B, S] real new tokens (right padding) of a cached call
    key_valid: torch.Tensor | None = None  # [B, S] real tokens of a cache-less call (any padding side)
    logn: torch.Tensor | None = None  # [B, S] Qwen v1 LogN query multiplier
    # every row's new tokens sit at positions 0..S-1 and are all the keys there are (a prompt with no
    # cache before it; right padding allowed, pads come last): the mask is plain causal, so attention
    # can run as a causal kernel (flash / memory-efficient) without building an S x T mask
    causal: bool = False
    masks: dict = field(default_factory=dict)  # derived once per call, shared by the layers (masks, rotations)

    def causal_ok(self, window: int | None, n_new: int) -> bool:
        return self.causal and (window is None or window >= n_new)

    def rotation(self, interleaved: bool, dtype: torch.dtype) -> torch.Tensor:
        """The rotary tables as one [B, S, d, d] rotation matrix per token (`rope.rope_matrix`), built once
        per call and shared by every layer: rotating a few tokens is then one product per tensor."""
        key = ("rotation", interleaved, dtype)
        if key not in self.masks:
            self.masks[key] = rope_matrix(self.cos, self.sin, interleaved).to(dtype)
        return self.masks[key]

    def key_mask(self, window: int, key_pos: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, S, T] for keys at explicit positions key_pos [B, T] (-1: empty slot); used by
        the ring-buffer cache of sliding-window layers, whose slots are not positions."""
        key = ("ring", window, key_pos.shape[1])
        if key not in self.masks:
            q = self.positions[:, :, None]  # [B, S, 1]
            k = key_pos[:, None, :]  # [B, 1, T]
            allowed = (k >= 0) & (k <= q) & (q - k < window)
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            self.masks[key] = allowed[:, None]
        return self.masks[key]

    def mask(self, window: int | None, n_keys: int) -> torch.Tensor:
        """Boolean [B, 1, S, T]: may query (b, s) attend to key slot t?"""
        key = (window, n_keys)
        if key not in self.masks:
            q = self.positions[:, :, None]  # [B, S, 1]
            if self.kv is None:
                k = self.positions[:, None, :]  # keys are the new tokens themselves
            else:
                k = torch.arange(n_keys, device=q.device)[None, None, :]  # slot = position
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            if self.kv is None and self.key_valid is not None:
                allowed = allowed & self.key_valid[:, None, :].bool()
            # a row with nothing to attend to (a pad query) attends everywhere: finite, and ignored
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            self.masks[key] = allowed[:, None]
        return self.masks[key]


def kept_tokens(h: torch.Tensor, keep: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """h [B, S, d] -> the tokens `Transformer.forward`'s `keep` selects: all, [B, 1, d] or [n, 1, d]."""
    if keep is None:
        return h
    rows, index = keep if isinstance(keep, tuple) else (torch.arange(h.shape[0], device=h.device), keep)
    return h[rows, index][:, None]
