"""Engine statistics: one place a server's metrics read from.

The engine updates an `EngineStats` from its own thread; `snapshot()` returns a consistent copy that
any other thread may read (counters, gauges, histograms in Prometheus' cumulative-bucket form).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# seconds; the same shape of buckets vLLM exposes for TTFT / inter-token latency
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket (not cumulative); the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        i = 0
        while i < len(self.buckets) and x > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += x
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= bound), ..., (inf, count)]."""
        out, total = [], 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += c
            out.append((bound, total))
        return out

    def copy(self) -> Histogram:
        h = Histogram(self.buckets)
        h.counts, h.sum, h.count = list(self.counts), self.sum, self.count
        return h


@dataclass
class EngineStats:
    """Gauges describe the engine after its last step; counters and histograms only grow."""

    running: int = 0  # sequences holding a cache row
    waiting: int = 0  # queued, not yet prefilled
    cache_tokens: int = 0  # tokens held in the KV cache by running sequences
    cache_capacity: int = 0  # tokens the cache can hold (rows x max_len)
    prompt_tokens: int = 0  # prefilled prompt tokens, total
    generation_tokens: int = 0  # generated tokens, total
    steps: int = 0
    prefix_hit_rate: float | None = None  # prompt tokens served from the prefix cache (paged engine only)
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))  # request added -> first token
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))  # between a request's tokens
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))  # request added -> finished
    step_tokens: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))  # tokens computed per step
    spec_drafts: int | None = None  # speculative decoding only: tokens drafted, total
    spec_accepted: int | None = None  # of those, accepted by the target model
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def cache_usage(self) -> float:
        return self.cache_tokens / self.cache_capacity if self.cache_capacity else 0.0

    def snapshot(self) -> EngineStats:
        with self.lock:
            return EngineStats(self.running, self.waiting, self.cache_tokens, self.cache_capacity,
                               self.prompt_tokens, self.generation_tokens, self.steps, self.prefix_hit_rate,
                               dict(self.finished),
                               self.ttft.copy(), self.itl.copy(), self.e2e.copy(), self.step_tokens.copy(),
                               self.spec_drafts, self.spec_accepted)
