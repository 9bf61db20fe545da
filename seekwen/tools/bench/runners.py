"""The same measurements for seekwen and for transformers: a runner has `name`, `prefill(ids, extra)` ->
(next token, cache) and `step(tok, cache)` -> (next token, cache); the timers and the interleaving work
on either."""

from __future__ import annotations

import statistics
import time

import torch

from .machine import sync


class Ours:
    name = "seekwen"

    def __init__(self, model, graphs: bool = False, compile: bool = False):
        self.model = model
        # decode steps from CUDA graphs (optionally compiled first): one runner (and its graphs) per cache
        self.graphs, self.compile = graphs, compile
        self.caches: dict[tuple[int, int], object] = {}
        self.runners: dict[int, object] = {}  # id(cache) -> its GraphRunner

    def new_cache(self, B: int, T: int):
        if not self.graphs:
            return self.model.new_cache(B, T)
        if (B, T) not in self.caches:  # reused across repeats, so each shape is captured once
            from ...runtime.graphs import GraphRunner

            cache = self.caches[B, T] = self.model.new_cache(B, T)
            self.runners[id(cache)] = GraphRunner(self.model, cache, compile=self.compile)
        cache = self.caches[B, T]
        cache.reset()
        return cache

    def prefill(self, ids: torch.Tensor, extra: int):
        B, S = ids.shape
        cache = self.new_cache(B, S + extra)
        keep = torch.full((B,), S - 1, device=ids.device)
        logits = self.model(ids, cache=cache, keep=keep)[:, 0]
        cache.lens += S
        return logits.argmax(-1), cache

    def step(self, tok: torch.Tensor, cache):
        runner = self.runners.get(id(cache))
        if runner is not None:
            logits = runner.decode(tok, tok.shape[0])
        else:
            logits = self.model(tok[:, None], cache=cache)[:, 0]
        cache.lens += 1
        return logits.argmax(-1), cache


class HF:
    name = "transformers"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: torch.Tensor, extra: int):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    def step(self, tok: torch.Tensor, cache):
        out = self.model(tok[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values


def time_prefill(r, ids: torch.Tensor) -> float:
    sync(ids.device)
    t = time.perf_counter()
    r.prefill(ids, 1)
    sync(ids.device)
    return time.perf_counter() - t


def time_decode(r, ids: torch.Tensor, steps: int) -> float:
    """Median seconds per decode step after a prefill of `ids` (each step's token is ready before the
    next starts: on CUDA, synchronised)."""
    tok, cache = r.prefill(ids, steps + 2)
    times = []
    for _ in range(steps):
        sync(ids.device)
        t = time.perf_counter()
        tok, cache = r.step(tok, cache)
        sync(ids.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(runners: list, fn, repeats: int) -> dict[str, float]:
    """Best (lowest) time of `fn(runner)` per runner, runners alternating."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for r in runners:
            t = fn(r)
            best[r.name] = min(best.get(r.name, float("inf")), t)
    return best

