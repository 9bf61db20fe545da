"""The scheduler of the paged engine: which sequences compute how many tokens this step, and where
their keys go.

Every step has a token budget (`max_num_batched_tokens`). Running sequences come first, oldest first:
a decoding sequence takes one token, a sequence still prefilling takes a chunk of what is left of the
budget after every decode row is counted (chunked prefill: a long prompt joins over several steps
while the others keep decoding). Then waiting requests are admitted while the budget, `max_num_seqs`
and the free blocks allow; an admitted prompt first takes its longest cached prefix (prefix caching).
A request whose prompt blocks a running sequence is still prefilling (n samples of one prompt) waits
for them to be published and then prefills only its last partial block: n samples share one prefill.

When a sequence needs a block and none is free, the newest running sequence is preempted by
recompute: its blocks are released and it goes back to the front of the waiting queue with its
output so far; when readmitted it prefills prompt + output again (its prompt blocks often still in
the prefix cache). The oldest sequence always makes progress, so nothing deadlocks and nothing runs
out of memory. `abort` releases a sequence's blocks at once. The waiting queue is bounded
(`max_queue`): adding to a full queue raises `QueueFull`.

A sequence is "all tokens it has (prompt + output) minus the ones whose keys are cached"; whenever its
uncomputed tokens are all computed, the last one's logits are sampled and the new token appended.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockManager, chain_hashes
from .metrics import Metrics
from .paged import CacheGroup


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests already."""


@dataclass(eq=False)
class Sequence:
    """The scheduler's state of one request (`req`: the engine's Request, with .id, .prompt, .output).
    Compared by identity (`seq in running`, `remove`): two sequences are never the same by content."""

    req: object
    salt: object = None  # what the cached keys depend on besides the tokens (prefix-cache key)
    tables: list[list[int]] = field(default_factory=list)  # per cache group: block ids, -1 = released
    n_computed: int = 0  # tokens whose keys are in the cache
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of the prompt's full blocks
    n_published: list[int] = field(default_factory=list)  # per group: prompt blocks published
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    preemptions: int = 0
    draft: list[int] = field(default_factory=list)  # speculative tokens after the output, this step only

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt)

    def token(self, i: int) -> int:
        p, out = self.req.prompt, self.req.output
        if i < len(p):
            return p[i]
        return out[i - len(p)] if i < len(p) + len(out) else self.draft[i - len(p) - len(out)]

    def tokens(self, start: int, stop: int) -> list[int]:
        return [self.token(i) for i in range(start, stop)]

    @property
    def length(self) -> int:
        return len(self.req.prompt) + len(self.req.output) + len(self.draft)

    @property
    def remaining(self) -> int:
        return self.length - self.n_computed


class Scheduler:
    def __init__(
        self,
        groups: list[CacheGroup],
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_queue: int | None = None,
        prefix_caching: bool = True,
        metrics: Metrics | None = None,
    ):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every decode row costs a token)")
        for g in groups:
            if g.window is not None and g.num_blocks < g.window // block_size + 2:
                raise ValueError(f"{g.num_blocks} blocks cannot hold a window of {g.window} tokens")
        self.groups, self.block_size = groups, block_size
        self.managers = [BlockManager(g.num_blocks) for g in groups]
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_queue, self.prefix_caching = max_queue, prefix_caching
        self.metrics = metrics or Metrics()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- requests -----------------------------------------------------------------------------------

    def capacity(self) -> int:
        """Tokens one sequence can hold at most (the full-attention groups' blocks)."""
        full = [g.num_blocks for g in self.groups if g.window is None]
        return min(full) * self.block_size if full else 1 << 62

    def add(self, seq: Sequence) -> None:
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"waiting queue is full ({self.max_queue} requests); retry later")
        seq.tables = [[] for _ in self.groups]
        seq.n_published = [0] * len(self.groups)
        if self.prefix_caching:
            seq.hashes = chain_hashes(list(seq.req.prompt), self.block_size, seq.salt)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def abort(self, request_id: int) -> Sequence | None:
        """Remove a request wherever it is; its blocks are released now."""
        for seq in self.waiting:
            if seq.req.id == request_id:
                self.waiting.remove(seq)
                self._release(seq)
                return seq
        for seq in self.running:
            if seq.req.id == request_id:
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    # ---- one step -----------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, new tokens)] for this step; blocks for those tokens are allocated."""
        plan: list[tuple[Sequence, int]] = []
        n_decode = sum(1 for s in self.running if s.remaining == 1)
        budget = self.max_num_batched_tokens - n_decode  # what prefill chunks may use
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            self._trim(seq)
            n = 1 if seq.remaining == 1 else min(seq.remaining, budget)
            if n == 0:
                i += 1
                continue
            while (fit := self._tokens_fit(seq)) < n and not (seq.remaining > 1 and fit > 0):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            n = min(n, fit)
            self._grow(seq, seq.n_computed + n)
            plan.append((seq, n))
            if seq.remaining > 1:
                budget -= n
            i += 1
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = next((s for s in self.waiting if not self._twin_prefilling(s)), None)
            if seq is None:
                break
            if not any(seq.tables):
                self._match(seq)
            self._trim(seq)
            n = min(seq.remaining, budget, self._tokens_fit(seq))
            if n <= 0:
                self._release(seq)  # give its cached-prefix blocks back until it can run
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            self._grow(seq, seq.n_computed + n)
            plan.append((seq, n))
            budget -= n
        return plan

    def computed(self, plan: list[tuple[Sequence, int]]) -> None:
        """After the model ran `plan`: advance the sequences and publish their full prompt blocks."""
        for seq, n in plan:
            seq.n_computed += n
            if self.prefix_caching:
                self._publish(seq)

    def rollback(self, seq: Sequence, n_computed: int) -> None:
        """Forget the keys of positions >= n_computed (rejected speculative tokens): the sequence's
        blocks past them go back to the pool (never published: only prompt blocks are)."""
        if n_computed > seq.n_computed:
            raise ValueError("rollback can only forget keys")
        seq.n_computed = n_computed
        need = -(-n_computed // self.block_size)
        for table, m in zip(seq.tables, self.managers, strict=True):
            while len(table) > need:
                b = table.pop()
                if b >= 0:
                    m.release(b)

    def counts(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preempted": sum(1 for s in self.waiting if s.preemptions),
            "blocks_used": sum(m.num_used() for m in self.managers),
            "blocks_free": sum(m.num_free() for m in self.managers),
            "blocks_cached": sum(len(m.cached) for m in self.managers),
            "kv_bytes_held": sum(m.num_used() * g.block_bytes for m, g in zip(self.managers, self.groups, strict=True)),
        }

    # ---- blocks -------------------------------------------------------------------------------------

    def _tokens_fit(self, seq: Sequence) -> int:
        """New tokens seq can take with the blocks it holds plus every free one."""
        bs = self.block_size
        fit = [(len(t) + m.num_free()) * bs for t, m in zip(seq.tables, self.managers, strict=True)]
        return max(0, min(fit) - seq.n_computed)

    def _grow(self, seq: Sequence, end: int) -> None:
        """Blocks for positions [0, end) in every group."""
        need = -(-end // self.block_size)
        for table, m in zip(seq.tables, self.managers, strict=True):
            while len(table) < need:
                table.append(m.allocate())

    def _trim(self, seq: Sequence) -> None:
        """Sliding-window groups: release blocks no query from position n_computed on can see
        (keys < n_computed - window + 1)."""
        bs = self.block_size
        for g, table, m in zip(self.groups, seq.tables, self.managers, strict=True):
            if g.window is None:
                continue
            first_seen = seq.n_computed - g.window + 1
            for j in range(len(table)):
                if (j + 1) * bs > first_seen:
                    break
                if table[j] >= 0:
                    m.release(table[j])
                    table[j] = -1

    def _release(self, seq: Sequence) -> None:
        for table, m in zip(seq.tables, self.managers, strict=True):
            for b in table:
                if b >= 0:
                    m.release(b)
            table.clear()
        seq.n_computed = 0
        seq.n_published = [0] * len(self.groups)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preemptions += 1
        self.metrics.preemptions += 1
        self.waiting.appendleft(seq)

    # ---- prefix cache -------------------------------------------------------------------------------

    def _match(self, seq: Sequence) -> None:
        """Take the longest cached prefix of the prompt (whole blocks, at least one token left to compute)."""
        self.metrics.prompt_tokens += seq.prompt_len
        if not self.prefix_caching:
            return
        bs = self.block_size
        hashes = seq.hashes[: (seq.length - 1) // bs]
        n = len(hashes)
        for g, m in zip(self.groups, self.managers, strict=True):
            if g.window is None:
                k = 0
                while k < n and m.lookup(hashes[k]) is not None:
                    k += 1
                n = k
        for g, m in zip(self.groups, self.managers, strict=True):  # windows need only their last blocks
            if g.window is not None:
                while n > 0 and any(m.lookup(hashes[j]) is None for j in range(self._first_seen(n, g.window), n)):
                    n -= 1
        for g, table, m in zip(self.groups, seq.tables, self.managers, strict=True):
            first = 0 if g.window is None else self._first_seen(n, g.window)
            for j in range(n):
                if j < first:
                    table.append(-1)
                else:
                    b = m.lookup(hashes[j])
                    m.acquire(b)
                    table.append(b)
        seq.n_computed = n * bs
        seq.n_published = [n] * len(self.groups)
        self.metrics.prefix_hit_tokens += n * bs

    def _twin_prefilling(self, seq: Sequence) -> bool:
        """Whether a running sequence with the same prompt blocks (n samples of one prompt, a repeated
        prompt) is still prefilling them: `seq` then waits, and once they are published it takes them
        from the prefix cache and prefills only its last partial block. So n samples share one prefill."""
        if not self.prefix_caching or not seq.hashes or seq.n_computed or any(seq.tables):
            return False
        return any(r.hashes == seq.hashes and r.n_computed < r.prompt_len for r in self.running)

    def _first_seen(self, n_blocks: int, window: int) -> int:
        """First block a query at position n_blocks * block_size can see through `window`."""
        return max(0, (n_blocks * self.block_size - window + 1) // self.block_size)

    def _publish(self, seq: Sequence) -> None:
        full = min(len(seq.hashes), seq.n_computed // self.block_size)
        for gi, (table, m) in enumerate(zip(seq.tables, self.managers, strict=True)):
            for j in range(seq.n_published[gi], full):
                if table[j] >= 0:
                    m.publish(table[j], seq.hashes[j])
            seq.n_published[gi] = max(seq.n_published[gi], full)
