"""Preallocated KV caches.

Row b of a cache holds token positions 0..lens[b]-1 at slots 0..lens[b]-1 (slot = position), so rows
of different lengths share one tensor with no padding holes and attention needs only the positional
mask `key_slot <= query_position`. Nothing grows per step: `max_len` slots are allocated up front.

- standard attention (MHA/GQA): k [B, T, H_kv, d], v [B, T, H_kv, d_v] per layer;
- MLA: only the compressed latent c_kv [B, T, kv_lora_rank] and the shared rotated key k_pe
  [B, T, qk_rope_head_dim] per layer; that is all DeepSeek-V2/V3 need to keep per token;
- sliding-window layers (window W < max_len): a ring buffer of W slots (+1 scratch slot), position p
  at slot p % W. A call with several new tokens attends over [ring before the call + new tokens], then
  keeps each row's last W real tokens; a single new token is written first (it only overwrites the
  position that just left its window) and attends over the ring.

`rows(start, stop)` is a view of some rows (shared storage): the batch engine runs each step on the
rows [0, n) of a slot pool and prefills new requests into their own rows.

The cache is storage only; how many tokens each row holds is the runtime's business
(`runtime.decoder.Decoder.lens`). It implements the model's `KVStore` protocol (`model/batch.py`).
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
        ring: bool = True,
    ):
        self.cfg = cfg
        self.max_len = max_len
        self.batch_size = batch_size
        B, T = batch_size, max_len
        self.windows: dict[int, int] = {}  # layer -> window, for layers kept in a ring buffer
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, flat slots) of the last call
        self._table: torch.Tensor | None = None  # blocks(): row b is block b
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_layers):
            if cfg.mla is not None:
                m = cfg.mla
                layer = {
                    "kv": torch.zeros(B, T, m.kv_lora_rank, dtype=dtype, device=device),
                    "pe": torch.zeros(B, T, m.qk_rope_head_dim, dtype=dtype, device=device),
                }
            else:
                window = cfg.sliding_window[i] if cfg.sliding_window else None
                if ring and window is not None and window < max_len:
                    self.windows[i] = window
                    T_i = window + 1  # + a scratch slot that padding tokens are written to
                else:
                    T_i = T
                H, d = cfg.num_kv_heads, cfg.head_dim
                layer = {
                    "k": torch.zeros(B, T_i, H, d, dtype=dtype, device=device),
                    "v": torch.zeros(B, T_i, H, d, dtype=dtype, device=device),
                }
            self.layers.append(layer)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def bytes_per_token(self) -> int:
        """Bytes one token adds across all layers (full-length layers; a ring layer's is bounded)."""
        per = 0
        for layer in self.layers:
            for t in layer.values():
                per += t[0, 0].numel() * t.element_size()
        return per

    def is_ring(self, layer: int) -> bool:
        return layer in self.windows

    def check(self, n_keys: int) -> None:
        if n_keys > self.max_len:
            raise ValueError(f"KV cache is full: position {n_keys - 1} does not fit in {self.max_len} slots")

    def write(self, layer: int, positions: torch.Tensor, n_keys: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new entries [B, S, ...] at slots `positions` [B, S]; return views of slots [0, n_keys).
        `n_keys` (max position + 1, or max_len for a static step) is computed once per call by the runtime."""
        store = self.layers[layer]
        B, S = positions.shape
        if S == 1:  # decode: one slot per row, as rows of the flattened [B * T, ...] store
            slots = self.decode_slots(positions)
            for name, t in new.items():
                dest = store[name]
                assert dest.shape[1] == self.max_len, "a ring layer writes through write_ring"
                dest.view(-1, *dest.shape[2:]).index_copy_(0, slots, t[:, 0].to(dest.dtype))
        else:
            rows = torch.arange(B, device=positions.device)[:, None]
            for name, t in new.items():
                store[name][rows, positions] = t.to(store[name].dtype)
        return {name: t[:, :n_keys] for name, t in store.items()}

    def blocks(self, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """In-place reads for the fast decode kernels, in the paged cache's terms: each row is one block of
        max_len slots, so the layer's tensors [B, T, ...] are the pools and row b's block table is [b].
        Full-length layers only (a ring layer's slots are not positions)."""
        assert not self.is_ring(layer), "a ring layer has no blocks"
        if self._table is None:
            self._table = torch.arange(self.batch_size, dtype=torch.int32).view(-1, 1)  # [B, 1]
        return self.layers[layer], self._table, self.max_len

    def decode_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Row b's slot positions[b, 0] as an index into the flattened [B * max_len, ...] store, computed once
        per call (the layers of one forward share `positions`) and kept on this view."""
        cached = self._slots
        if cached is None or cached[0] is not positions:
            B = positions.shape[0]
            cached = (positions, positions[:, 0] + torch.arange(B, device=positions.device) * self.max_len)
            self._slots = cached
        return cached[1]

    def write_ring(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sliding-window layer. positions [B, S] (consecutive per row), k/v [B, S, H, d], valid [B, S]
        (real tokens; right padding) -> (keys [B, T, H, d], values, key positions [B, T], -1 = empty)."""
        W = self.windows[layer]
        store = self.layers[layer]
        B, S = positions.shape
        start = positions[:, :1]  # [B, 1] tokens already cached per row
        slots = torch.arange(W, device=positions.device)[None, :]
        rows = torch.arange(B, device=positions.device)[:, None]
        if S == 1:
            # writing first only evicts position p - W, which the new query cannot see anyway
            store["k"][rows, positions % W] = k.to(store["k"].dtype)
            store["v"][rows, positions % W] = v.to(store["v"].dtype)
            return store["k"][:, :W], store["v"][:, :W], ring_positions(start + 1, slots)
        new_pos = positions if valid is None else positions.masked_fill(~valid.bool(), -1)
        key_pos = torch.cat((ring_positions(start, slots), new_pos), dim=1)  # [B, W + S]
        keys = torch.cat((store["k"][:, :W], k.to(store["k"].dtype)), dim=1)
        values = torch.cat((store["v"][:, :W], v.to(store["v"].dtype)), dim=1)
        n_real = torch.full_like(start, S) if valid is None else valid.long().sum(1, keepdim=True)
        s = torch.arange(S, device=positions.device)[None, :]
        keep = (s < n_real) & (s >= n_real - W)  # each row's last W real tokens stay in the ring
        dest = torch.where(keep, positions % W, torch.full_like(positions, W))  # the rest: scratch slot W
        store["k"][rows, dest] = k.to(store["k"].dtype)
        store["v"][rows, dest] = v.to(store["v"].dtype)
        return keys, values, key_pos

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop): same storage, so writes and `lens` updates go through."""
        view = KVCache.__new__(KVCache)
        view.cfg, view.max_len, view.windows = self.cfg, self.max_len, self.windows
        view.batch_size, view._slots, view._table = stop - start, None, None
        view.layers = [{name: t[start:stop] for name, t in layer.items()} for layer in self.layers]
        return view

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Move row `src` (holding n tokens) into row `dst`."""
        for i, layer in enumerate(self.layers):
            for t in layer.values():
                m = t.shape[1] if self.is_ring(i) else n
                t[dst, :m] = t[src, :m]


def ring_positions(n_cached: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Position held by ring slot j once n tokens are cached: the largest p < n with p % W == j, or -1.
    n_cached [B, 1], slots [1, W] -> [B, W]."""
    W = slots.shape[1]
    p = n_cached - 1 - torch.remainder(n_cached - 1 - slots, W)
    return p.clamp(min=-1)
