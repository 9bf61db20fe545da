"""Decode steps replayed from CUDA graphs.

On a GPU a small-batch decode step is a few hundred small kernels, and launching each from Python
costs more host time (~5-10 us) than the kernel takes on the device: the step is bound by the host.
A CUDA graph records the step's kernels once and replays them all with one launch. Recording needs
fixed shapes, fixed addresses and no reads back to the host during the step, which the pieces below
provide:

- the KV cache is preallocated (slot = position) and a graphed step attends over all `max_len` slots
  with the positional mask hiding the unused ones, so the step's shapes depend only on the batch
  size, and the rotary table is sized from `max_len` instead of the positions (`rope_bound`);
- routed experts run as grouped matmuls over all (token, expert) pairs (`moe.dispatch_grouped`), not a
  Python loop over the experts that received tokens;
- batch sizes are rounded up to a few buckets (1, 2, 4, 8, then multiples of 8, ...); one graph per
  bucket, all sharing one memory pool. Rows past the live ones are free cache rows: they decode a
  dummy token at position 0 of their own row, which nothing reads.

The runner belongs to a `runtime.decoder.Decoder` (its cache and row lengths), whose `step` calls
`decode`; the decoder advances the lengths. Off CUDA, `decode` runs the same static step eagerly:
that is what the CPU tests exercise.
"""

from __future__ import annotations

import warnings

import torch

from ..model.moe import Experts, grouped_mm_works


def graph_blocker(model) -> str | None:
    """Why the model's decode step cannot be captured in a CUDA graph, or None if it can."""
    if model.device.type != "cuda":
        return "not on a CUDA device"
    if getattr(model, "parallel", None) is not None:  # parallel.ParallelTransformer
        return "tensor/expert-parallel model: collectives are not captured in graphs (not verified yet)"
    if not model.rope.static:
        return f"rope type {model.cfg.rope.type!r} depends on the sequence length"
    for block in model.layers:
        experts = getattr(block.ffn, "experts", None)
        if experts is None:
            continue
        if not isinstance(experts, Experts):
            return "routed experts must stay stacked (unquantized) to run as grouped matmuls"
        if not grouped_mm_works(model.device.type, model.dtype):
            return f"torch._grouped_mm does not run {model.dtype} on this device"
        if model.dtype != torch.bfloat16:  # seen with torch 2.11 on an H100: float32 loops over groups on the host
            return f"torch._grouped_mm's fused kernel is bfloat16-only; {model.dtype} experts sync with the host"
    return None


def buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4) if b < max_batch]
    step = 8 if max_batch <= 64 else 16
    return small + list(range(8, max_batch, step)) + [max_batch]


class GraphRunner:
    def __init__(self, decoder, compile: bool = False):
        """compile: trace the step with torch.compile (Inductor fuses the elementwise ops: norms, rotary,
        SiLU, residual adds) before capturing it; slow to start (a compile per batch bucket)."""
        self.decoder, self.model = decoder, decoder.model
        self.forward = torch.compile(self._static_step, dynamic=False) if compile else self._static_step
        self.graphed = graph_blocker(self.model) is None
        self.buckets = buckets(decoder.max_batch)
        self.tokens = torch.zeros(decoder.max_batch, 1, dtype=torch.long, device=decoder.lens.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch {n} is larger than the cache's {self.decoder.max_batch} rows")

    def _static_step(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """tokens [b, 1] at positions lens [b] -> logits [b, vocab], attending over every cache slot."""
        dec = self.decoder
        T = dec.max_len
        batch = self.model.batch(lens[:, None], kv=dec.cache.rows(0, tokens.shape[0]), n_keys=T, rope_bound=T)
        return self.model(tokens, batch=batch)[:, 0]

    def _step(self, b: int) -> torch.Tensor:
        return self.forward(self.tokens[:b], self.decoder.lens[:b])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """tokens [n] (one new token per live row 0..n-1) -> logits [n, vocab]. The returned tensor is
        overwritten by the next call: use it (sample) first."""
        b = self.bucket(n)
        self.tokens[:n, 0] = tokens
        if b > n:
            self.decoder.lens[n:b] = 0  # free rows: a dummy token at their own slot 0 (they hold nothing)
        if not self.graphed:
            return self._step(b)[:n]
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(b)
            except RuntimeError as e:  # an op that cannot be captured: stay correct, run eagerly
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)
                self.graphed = False
                return self._step(b)[:n]
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm up on a side stream first (lazy initialisation, cuBLAS workspaces, the rotary table);
        # the warm-up writes each row's next slot, which the real step overwrites before reading
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(b)
        self.pool = graph.pool()
        return graph, logits
