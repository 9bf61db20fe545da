"""Paged decode attention for the CPU fast path: `csrc/paged.h`, part of the kernels extension (`kernels.get()`).

`paged_attention(q1, q2, k1, k2, v, table, start, count, scale)` attends each row's query position
(one new token) to its keys [start, count), read in place from the KV block pools through the block
table (`runtime.paged`): GQA (k/v pools, query heads grouped per KV head) and absorbed MLA (the latent
pool is both the key's first part and the value, the rotated-key pool the second part) alike.
Consecutive rows with the same table (one sequence's tokens of a call: the paged runner's one-token
rows for a prefill chunk or speculative tokens) are read together, each row masked to its own range. Where the
kernels cannot be built (no compiler, no AVX2, SEEKWEN_NO_KERNELS=1) `get()` is None and the layers read the
cache through the gathering path instead. `reference` is the same math in torch (the tests' oracle).
"""

from __future__ import annotations

import torch


def get():
    """The compiled extension (`paged_attention`), or None where it cannot be built."""
    from . import kernels

    return kernels.get()


def decode_kernel(x: torch.Tensor, batch, layer: int):
    """The kernel when it serves this call of `layer`: one new token per row (known key counts) over a KV
    store that exposes the layer's blocks (`blocks(layer)`: the paged cache, or the row cache's
    full-length layers), CPU fp32. Else None."""
    if x.shape[1] != 1 or batch.key_counts is None or not hasattr(batch.kv, "blocks") or batch.kv.is_ring(layer):
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return get()


def key_starts(counts: list[int], window: int | None) -> list[int]:
    """First key each query sees: 0, or count - window for a sliding-window layer."""
    return [0] * len(counts) if window is None else [max(0, c - window) for c in counts]


def reference(q1, q2, k1, k2, v, table, start, count, scale) -> torch.Tensor:
    """`paged_attention` in torch, one sequence at a time (gathers the rows)."""
    B, G, Q, _ = q1.shape
    bs = k1.shape[1]
    out = []
    for b in range(B):
        t = torch.arange(start[b], count[b])
        blk, off = table[b].long()[t // bs], t % bs
        scores = torch.einsum("gqd,tgd->gqt", q1[b], k1[blk, off])
        if q2.numel():
            scores = scores + torch.einsum("gqd,tgd->gqt", q2[b], k2[blk, off])
        p = (scores * scale).softmax(-1)
        out.append(torch.einsum("gqt,tgd->gqd", p, v[blk, off]))
    return torch.stack(out)
