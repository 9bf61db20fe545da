"""A block-paged KV cache: per layer a pool of fixed-size blocks, per sequence a block table.

Position p of a sequence lives in block `table[p // block_size]` at offset `p % block_size`, so memory
follows the tokens held, and sequences with a common prefix can point at the same blocks
(`runtime.blocks`). Layers are split into cache groups by window: full-attention layers share one
group (one block table per sequence), each sliding window size gets its own group, whose blocks are
released as soon as they leave the window (their table entries become -1).

Per layer and block (`block_size` = bs tokens):
- GQA: k [bs, H_kv, d], v [bs, H_kv, d];
- MLA: the latent kv [bs, kv_lora_rank] and the rotated key pe [bs, qk_rope_head_dim].
Each pool has one extra block at the end, the scratch block: padding tokens write there and freed
(out-of-window) table entries read from it; the attention masks never let a real query see it.

`PagedKVCache.view(tables, ...)` is the model's `KVStore` for one forward call (model/batch.py): `write`
stores the new entries through the tables and returns a gathered [B, n_keys, ...] copy (slot = position),
which is what the plain modules read. The fast path's decode kernels read the blocks in place instead
(`blocks(layer)`), so nothing is gathered per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass
class CacheGroup:
    """Layers sharing one block table per sequence; `window`: their sliding window (None: full)."""

    layers: list[int]
    window: int | None
    num_blocks: int
    block_bytes: int = 0  # bytes of one block across the group's layers


def cache_groups(cfg: ModelConfig, max_len: int | None = None) -> list[tuple[list[int], int | None]]:
    """Layers grouped by sliding window (a window >= max_len is no window)."""
    by_window: dict[int | None, list[int]] = {}
    for i in range(cfg.num_layers):
        w = cfg.sliding_window[i] if cfg.sliding_window else None
        if w is not None and max_len is not None and w >= max_len:
            w = None
        by_window.setdefault(w, []).append(i)
    order = sorted(by_window, key=lambda w: (w is not None, w or 0))  # full layers first
    return [(by_window[w], w) for w in order]


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int | list[int],
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_len: int | None = None,
    ):
        """num_blocks: per cache group (one number: the same for every group)."""
        self.cfg, self.block_size = cfg, block_size
        groups = cache_groups(cfg, max_len)
        counts = num_blocks if isinstance(num_blocks, list) else [num_blocks] * len(groups)
        self.groups = [CacheGroup(layers, w, n) for (layers, w), n in zip(groups, counts, strict=True)]
        self.group_of = [0] * cfg.num_layers
        self.layers: list[dict[str, torch.Tensor]] = []
        bs = block_size
        for gi, g in enumerate(self.groups):
            for i in g.layers:
                self.group_of[i] = gi
        for i in range(cfg.num_layers):
            N = self.groups[self.group_of[i]].num_blocks + 1  # + the scratch block
            if cfg.mla is not None:
                m = cfg.mla
                layer = {"kv": torch.zeros(N, bs, m.kv_lora_rank, dtype=dtype, device=device),
                         "pe": torch.zeros(N, bs, m.qk_rope_head_dim, dtype=dtype, device=device)}
            else:
                H, d = cfg.num_kv_heads, cfg.head_dim
                layer = {"k": torch.zeros(N, bs, H, d, dtype=dtype, device=device),
                         "v": torch.zeros(N, bs, H, d, dtype=dtype, device=device)}
            self.layers.append(layer)
            self.groups[self.group_of[i]].block_bytes += sum(t[0].numel() * t.element_size() for t in layer.values())

    def scratch(self, group: int) -> int:
        return self.groups[group].num_blocks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def view(self, tables: list[torch.Tensor]) -> PagedView:
        """The KVStore of one call: tables[g] [B, nb_g] block ids per row (scratch where a row holds none)."""
        return PagedView(self, tables)


class PagedView:
    """`KVStore` (model/batch.py) over a `PagedKVCache` for the rows of one forward call."""

    def __init__(self, cache: PagedKVCache, tables: list[torch.Tensor]):
        self.cache, self.tables = cache, tables  # tables[g]: [B, nb] long
        self._int_tables: dict[int, torch.Tensor] = {}
        self._slot_cache: dict[tuple, torch.Tensor] = {}  # per (group, positions): the flat rows written

    def is_ring(self, layer: int) -> bool:
        return False  # windows are masked; their old blocks are released by the scheduler

    def write(self, layer: int, positions: torch.Tensor, n_keys: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """new [B, S, ...] at positions [B, S] -> stored; returns [B, n_keys, ...] gathered (slot = position),
        or nothing when n_keys == 0 (a caller that reads the blocks in place)."""
        c = self.cache
        g = c.group_of[layer]
        store, slots = c.layers[layer], self._slots(g, positions)
        for name, t in new.items():
            pool = store[name]
            pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, t.reshape(-1, *t.shape[2:]).to(pool.dtype))
        if n_keys == 0:
            return {}
        bs = c.block_size
        nb = -(-n_keys // bs)
        cols = self.tables[g][:, :nb]  # [B, nb]
        B = cols.shape[0]
        return {name: t[cols].reshape(B, nb * bs, *t.shape[2:])[:, :n_keys] for name, t in store.items()}

    def _slots(self, group: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool rows (block * block_size + offset) of positions [B, S] -> [B * S], computed once per
        call and cache group (every layer of the group writes the same rows); past the table: scratch."""
        key = (group, positions.data_ptr(), tuple(positions.shape))
        if key not in self._slot_cache:
            c, table, bs = self.cache, self.tables[group], self.cache.block_size
            col = positions // bs
            blk = table.gather(1, col.clamp(max=table.shape[1] - 1))  # [B, S]
            blk = torch.where(col < table.shape[1], blk, c.scratch(group))
            self._slot_cache[key] = (blk * bs + positions % bs).reshape(-1)
        return self._slot_cache[key]

    def write_ring(self, layer, positions, k, v, valid):  # pragma: no cover - is_ring is always False
        raise NotImplementedError

    def blocks(self, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """In-place reads (fast decode kernels): the layer's pools {name: [N + 1, bs, ...]}, the rows'
        block table [B, nb] (int32) and the block size."""
        g = self.cache.group_of[layer]
        if g not in self._int_tables:
            self._int_tables[g] = self.tables[g].to(torch.int32).contiguous()
        return self.cache.layers[layer], self._int_tables[g], self.cache.block_size
