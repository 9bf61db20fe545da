"""Fixed-size KV blocks: a free list, reference counts, and a prefix cache of full prompt blocks.

A block holds `block_size` consecutive positions of one sequence (every layer of one cache group; see
`runtime.paged`). Blocks are handed out by a `BlockManager`:

- `allocate()` takes a block nobody holds: first from the free list (blocks with nothing worth
  keeping), else the least recently released block of the prefix cache (LRU eviction);
- `release(b)` drops one reference; at zero the block goes back to the free list, or, if it holds a
  published prompt block, to the prefix cache's LRU list, where it can still be found until evicted;
- `publish(b, h)` registers a full block of prompt tokens under its chained content hash `h`;
  `lookup(h)` + `acquire(b)` let a new sequence share it (reference counted, never copied).

The hash of block j chains the hash of block j-1 with block j's tokens and a salt (what the cached keys
depend on besides the tokens, e.g. Qwen v1's NTK alpha), so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np


class NoFreeBlocks(RuntimeError):
    """Every block is referenced: the scheduler must preempt (it never lets this escape)."""


def chain_hashes(tokens: list[int], block_size: int, salt: object = None) -> list[bytes]:
    """The chained content hash of each full block of `tokens` (a partial last block has none)."""
    out: list[bytes] = []
    parent = repr(salt).encode()
    for j in range(len(tokens) // block_size):
        block = np.asarray(tokens[j * block_size : (j + 1) * block_size], dtype=np.int64)
        parent = hashlib.blake2b(parent + block.tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


class BlockManager:
    """`num_blocks` block ids with reference counts; the prefix cache maps content hashes to blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unreferenced, nothing cached
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, published: LRU first
        self.by_hash: dict[bytes, int] = {}
        self.evictions = 0

    # ---- counts -------------------------------------------------------------------------------------

    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (free + evictable)."""
        return len(self.free) + len(self.cached)

    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free()

    # ---- allocation ---------------------------------------------------------------------------------

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)  # evict the least recently released prompt block
            del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = None
            self.evictions += 1
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        assert self.ref[b] > 0, f"block {b} released more often than held"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash_of[b] is not None:
                self.cached[b] = None  # newest at the end
            else:
                self.free.append(b)

    # ---- prefix cache -------------------------------------------------------------------------------

    def lookup(self, h: bytes) -> int | None:
        return self.by_hash.get(h)

    def acquire(self, b: int) -> None:
        """One more reference to a cached block (found by `lookup`)."""
        if self.ref[b] == 0:
            del self.cached[b]
        self.ref[b] += 1

    def publish(self, b: int, h: bytes) -> None:
        """Block b (held) now holds the full prompt block with hash h. If another block already holds
        that content, b stays private (it is freed, not cached, when released)."""
        assert self.ref[b] > 0
        if self.hash_of[b] is None and h not in self.by_hash:
            self.hash_of[b] = h
            self.by_hash[h] = b

    def check(self) -> None:
        """Invariants (tests): every block is in exactly one of held / free / cached; the hash map and
        the blocks' hashes agree."""
        held = {b for b in range(self.num_blocks) if self.ref[b] > 0}
        free, cached = set(self.free), set(self.cached)
        assert len(free) == len(self.free), "a block is on the free list twice"
        assert not (held & free) and not (held & cached) and not (free & cached)
        assert held | free | cached == set(range(self.num_blocks))
        assert all(self.hash_of[b] is None for b in free)
        assert all(self.hash_of[b] is not None for b in cached)
        assert {b: h for h, b in self.by_hash.items()} == {
            b: h for b, h in enumerate(self.hash_of) if h is not None
        }
