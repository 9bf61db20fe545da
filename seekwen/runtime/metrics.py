"""The serving runtime's counters, in one place (what a server's /metrics reads): requests running /
waiting / preempted, KV blocks used and free, prefix-cache hit rate, tokens per step, time to first
token and inter-token latency."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass
class Metrics:
    steps: int = 0
    tokens_computed: int = 0  # tokens run through the model (prefill chunks + decode)
    prefill_tokens: int = 0  # of which: tokens known at (re)admission (prompt, or recomputed output)
    prompt_tokens: int = 0  # prompt tokens of admitted requests (the prefix cache's lookups)
    prefix_hit_tokens: int = 0  # of those, found in the prefix cache (not prefilled)
    preemptions: int = 0
    aborted: int = 0
    finished: int = 0
    last_step_tokens: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    itl: list[float] = field(default_factory=list)  # seconds between a request's consecutive tokens
    step_times: list[float] = field(default_factory=list)

    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def snapshot(self, scheduler=None) -> dict:
        """A plain dict of every figure; with the scheduler, its live counts and block usage too."""
        out = {
            "steps": self.steps,
            "tokens_computed": self.tokens_computed,
            "prefill_tokens": self.prefill_tokens,
            "tokens_per_step": self.tokens_computed / self.steps if self.steps else 0.0,
            "last_step_tokens": self.last_step_tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prefix_hit_rate": self.prefix_hit_rate(),
            "preemptions": self.preemptions,
            "aborted": self.aborted,
            "finished": self.finished,
            "ttft_median_s": statistics.median(self.ttft) if self.ttft else None,
            "ttft_p99_s": _pct(self.ttft, 0.99),
            "itl_median_s": statistics.median(self.itl) if self.itl else None,
            "itl_p99_s": _pct(self.itl, 0.99),
        }
        if scheduler is not None:
            out.update(scheduler.counts())
        return out
