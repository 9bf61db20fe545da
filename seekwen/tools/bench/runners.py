"""The same measurements for seekwen and for transformers: a runner has `name`, `prefill(ids, extra)` ->
(next token, cache) and `step(tok, cache)` -> (next token, cache); the timers and the interleaving work
on either."""

from __future__ import annotations

import statistics
import time

import torch

from ...runtime.decoder import Decoder
from .machine import sync


class Ours:
    name = "seekwen"

    def __init__(self, model, graphs: bool = False, compile: bool = False):
        self.model = model
        # decode steps from CUDA graphs (optionally compiled first): one decoder (and its graphs) per shape,
        # reused across repeats so each shape is captured once
        self.graphs, self.compile = graphs, compile
        self.decoders: dict[tuple[int, int], Decoder] = {}

    def decoder(self, B: int, T: int) -> Decoder:
        if not self.graphs:
            return Decoder(self.model, B, T, graphs=False)
        if (B, T) not in self.decoders:
            self.decoders[B, T] = Decoder(self.model, B, T, graphs=True, compile=self.compile)
        return self.decoders[B, T]

    def prefill(self, ids: torch.Tensor, extra: int):
        B, S = ids.shape
        dec = self.decoder(B, S + extra)
        return dec.prefill(ids).argmax(-1), dec

    def step(self, tok: torch.Tensor, dec: Decoder):
        return dec.step(tok).argmax(-1), dec


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

