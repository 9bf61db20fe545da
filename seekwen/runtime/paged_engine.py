"""The paged engine loop: the scheduler decides, the model runner executes, the engine samples.

    engine = Engine(model, paged=True, block_size=16, max_num_batched_tokens=256)   # same API as before

One `PagedCore.step()`:
1. `Scheduler.schedule()` -> [(sequence, n new tokens)]: decode rows (1 token) and prefill chunks;
2. `ModelRunner.run(plan)` over the `PagedKVCache`: a step of at most FLAT_MAX_TOKENS tokens is one
   forward call in which every token is a row of one new token with its own key count (decode rows,
   prefill chunks and speculative tokens in one pass over the weights; the fast path's kernel reads
   the blocks in place, a sequence's rows together); a larger step is at most two calls, the decode
   rows [k, 1] and the prefill chunks [k, S] right-padded (per-row positions; a chunk after cached
   tokens reads them through the block table);
3. sequences whose tokens are all computed are sampled by the engine's own `_sample` / `_emit` (the
   request-level code is the engine's, whatever the cache), finished ones release their blocks.
"""

from __future__ import annotations

import time

import torch

from ..fast import compiled_step, linear, paged_kernels
from ..fast.layers import FastAttention, FastMLA
from ..model.rope import qwen_ntk_alpha
from .metrics import Metrics
from .paged import PagedKVCache
from .scheduler import QueueFull, Scheduler, Sequence
from .speculative import Draft

__all__ = ["ModelRunner", "PagedCore", "QueueFull", "prefix_salt"]


def prefix_salt(cfg, prompt_len: int) -> object:
    """What a prompt's cached keys depend on besides its tokens: part of the prefix-cache key.
    Qwen v1 dynamic NTK: the alpha fixed from the prompt length; HF "dynamic": the base of the prefill
    call (from max(prompt length, max_position_embeddings)); longrope: which factors the prefill used."""
    r = cfg.rope
    if r.type == "qwen_dynamic":
        return ("ntk_alpha", qwen_ntk_alpha(prompt_len, r.seq_length))
    if r.type == "dynamic":
        return ("dynamic", max(prompt_len, r.max_position_embeddings))
    if r.type == "longrope":
        return ("longrope", prompt_len > (r.original_max_position_embeddings or 0))
    return None


FLAT_MAX_TOKENS = 64  # a step of at most this many tokens runs as one call of one-token rows
FLAT_MAX_GATHER = 1 << 15  # without in-place attention: at most tokens x keys gathered per layer


class ModelRunner:
    """Runs scheduled rows of sequences through the model over a `PagedKVCache`."""

    def __init__(self, model, cache: PagedKVCache, max_len: int | None = None):
        self.model, self.cache = model, cache
        # the fast path's attention reads blocks in place (fast.paged_kernels) for one-token rows
        self.in_place = (all(isinstance(b.attn, FastAttention | FastMLA) for b in model.layers)
                         and model.device.type == "cpu" and model.dtype == torch.float32
                         and paged_kernels.get() is not None)
        self.qwen_ntk = model.cfg.rope.type == "qwen_dynamic"
        self.length_rope = not model.rope.static and not self.qwen_ntk  # HF dynamic, longrope
        # one C++ call for a flat step of up to 64 one-token rows, where the compiled step serves the model
        self.max_len, self.compiled, self.compiled_why = max_len, None, "no length bound given"
        if max_len is not None:
            self._build_compiled()

    def _build_compiled(self) -> None:
        self.compiled, self.compiled_why = compiled_step.attempt(self.model, self.cache, self.max_len)

    def run(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Compute every planned row; returns (sequence, logits [V]) for those whose tokens are now all
        computed (their next token is due), or, for a sequence verifying speculative tokens, logits
        [n, V] at each of its n new tokens. Does not advance the sequences (`Scheduler.computed`)."""
        if self.flat(plan):
            return self._run_flat(plan)
        out = []
        decode = [r for r in plan if r[1] == 1]
        verify = [r for r in plan if r[1] > 1 and r[0].draft]
        chunks = [r for r in plan if r[1] > 1 and not r[0].draft]
        for rows, full in ((decode, False), (verify, True), (chunks, False)):
            if rows:
                due = [i for i, (s, n) in enumerate(rows) if s.remaining == n]
                logits = self._forward(rows, full, due)
                out += [(rows[i][0], logits[i, : rows[i][1]] if full else logits[j, 0]) for j, i in enumerate(due)]
        return out

    def _forward(self, rows: list[tuple[Sequence, int]], full: bool, due: list[int]) -> torch.Tensor:
        """rows of (sequence, n new tokens) -> for the rows `due` (their next token is due), logits at
        their last new token [len(due), 1, V], or (full) at every new token [k, S, V]. A chunk before
        its prompt's end is due nothing: its call skips the LM head."""
        model, dev, bs = self.model, self.model.device, self.cache.block_size
        k, S = len(rows), max(n for _, n in rows)
        ids = torch.zeros(k, S, dtype=torch.long)
        for i, (s, n) in enumerate(rows):
            ids[i, :n] = torch.tensor(s.tokens(s.n_computed, s.n_computed + n))
        n_new = torch.tensor([n for _, n in rows])
        start = torch.tensor([s.n_computed for s, _ in rows])
        positions = (start[:, None] + torch.arange(S)).to(dev)  # [k, S]
        n_keys = int(start.max()) + S
        tables = [t.to(dev) for t in self._tables([s for s, _ in rows], -(-n_keys // bs))]
        padded = bool((n_new < S).any())
        alpha = self._ntk_alpha([s for s, _ in rows])
        batch = model.batch(
            positions,
            kv=self.cache.view(tables),
            n_keys=n_keys,
            key_counts=(start + 1).tolist() if S == 1 else None,
            new_valid=(torch.arange(S)[None, :] < n_new[:, None]).to(dev) if padded else None,
            causal=n_keys == S and S > 1,  # every row starts at 0: the keys are exactly the new tokens
            ntk_alpha=alpha,
        )
        if self.length_rope:
            self._length_rope(batch, positions, torch.tensor([s.prompt_len for s, _ in rows], device=dev))
        keep = None if full else (torch.tensor(due, dtype=torch.long, device=dev), (n_new - 1)[due].to(dev))
        return model(ids.to(dev), batch=batch, keep=keep)

    def flat(self, plan: list[tuple[Sequence, int]]) -> bool:
        """Whether this step runs as one call of one-token rows (`_run_flat`): a few tokens in all, and
        attention that reads the blocks in place (the fast path's CPU kernel), or few keys to gather."""
        T = sum(n for _, n in plan)
        if T > FLAT_MAX_TOKENS:
            return False
        if self.in_place:
            return True
        return T * max(s.n_computed + n for s, n in plan) <= FLAT_MAX_GATHER

    def _run_flat(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Every planned token as its own row of one new token, in one forward call: the decode rows, the
        prefill chunks and the speculative tokens of a step share one pass over the weights, no row is
        padded, and each token attends to the keys up to its own position through its sequence's block
        table (the chunk's own keys are written before any is read). Logits only where a token is due."""
        model, dev, bs = self.model, self.model.device, self.cache.block_size
        seqs = [s for s, _ in plan]
        seq_of, pos, ids = [], [], []  # per token row: its sequence's index in the plan, position, token
        for i, (s, n) in enumerate(plan):
            seq_of += [i] * n
            pos += range(s.n_computed, s.n_computed + n)
            ids += s.tokens(s.n_computed, s.n_computed + n)
        positions = torch.tensor(pos)[:, None]  # [T, 1]
        n_keys = max(pos) + 1
        index = torch.tensor(seq_of)
        tables = [t[index].to(dev) for t in self._tables(seqs, -(-n_keys // bs))]
        keep, spans, end = [], [], 0  # rows whose logits are due: a sequence's last token, or all (verify)
        for s, n in plan:
            end += n
            if s.remaining == n:
                first = end - n if s.draft else end - 1
                spans.append((s, len(keep), end - first, bool(s.draft)))
                keep += range(first, end)
        rows = torch.tensor(keep, dtype=torch.long, device=dev)
        if self.compiled is not None and self.compiled.mode != linear.ACTIVATIONS:
            self._build_compiled()  # the block-activation mode changed: rebuild for it
        if self.compiled is not None and self.compiled.serves(len(pos)):
            logits = self.compiled.run_paged(torch.tensor(ids), positions[:, 0],
                                             [t.to(torch.int32).contiguous() for t in tables], rows)
            return [(s, logits[a : a + m] if full else logits[a]) for s, a, m, full in spans]
        alpha = self._ntk_alpha(seqs)
        alpha = None if alpha is None else alpha[index]
        batch = model.batch(positions.to(dev), kv=self.cache.view(tables), n_keys=n_keys,
                            key_counts=[p + 1 for p in pos], ntk_alpha=alpha)
        if self.length_rope:
            lens = torch.tensor([s.prompt_len for s in seqs])[index]
            self._length_rope(batch, positions.to(dev), lens.to(dev))
        logits = model(torch.tensor(ids, device=dev)[:, None], batch=batch, keep=(rows, torch.zeros_like(rows)))
        logits = logits[:, 0]  # [n, V]
        return [(s, logits[a : a + m] if full else logits[a]) for s, a, m, full in spans]

    def _ntk_alpha(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Qwen v1 dynamic NTK: each sequence's alpha [k] (float64), fixed from its prompt length."""
        if not self.qwen_ntk:
            return None
        return torch.tensor([qwen_ntk_alpha(s.prompt_len, self.model.cfg.rope.seq_length) for s in seqs],
                            dtype=torch.float64)

    def _tables(self, seqs: list[Sequence], nb: int) -> list[torch.Tensor]:
        """Per cache group the sequences' block tables [k, nb] (long; the scratch block where none)."""
        tables = []
        for g in range(len(self.cache.groups)):
            scratch = self.cache.scratch(g)
            rows = []
            for s in seqs:
                row = [b if b >= 0 else scratch for b in s.tables[g][:nb]]
                rows.append(row + [scratch] * (nb - len(row)))
            tables.append(torch.tensor(rows, dtype=torch.long))
        return tables

    def _length_rope(self, batch, positions: torch.Tensor, prompt_lens: torch.Tensor) -> None:
        """Length-dependent RoPE (HF dynamic, longrope): give each token the rotation per-sequence
        `generate` gives it: the prefill call's length for prompt tokens, its own position + 1 for
        generated ones (one decode call each). So a batch-mate's length never changes a sequence's keys."""
        L = torch.maximum(prompt_lens[:, None], positions + 1)  # [k, S]
        cos, sin = torch.empty_like(batch.cos), torch.empty_like(batch.sin)
        for n in L.unique().tolist():
            c, s = self.model.rope(positions, seq_len=int(n))
            m = L == n
            cos[m], sin[m] = c[m], s[m]
        batch.cos, batch.sin = cos, sin


class PagedCore:
    """The paged engine behind `Engine(..., paged=True)`: owns the cache, the scheduler and the runner;
    sampling and stop rules stay the engine's (`engine._sample`, `engine._emit`)."""

    def __init__(
        self,
        engine,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 512,
        prefix_caching: bool = True,
        max_queue: int | None = None,
    ):
        model = engine.model
        self.engine, self.model = engine, model
        if num_blocks is None:  # the row pool's memory: max_batch x max_len slots
            num_blocks = engine.max_batch * -(-engine.max_len // block_size)
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, model.dtype, model.device, engine.max_len)
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.cache.groups, block_size, engine.max_batch, max_num_batched_tokens,
                                   max_queue, prefix_caching, self.metrics)
        self.runner = ModelRunner(model, self.cache, engine.max_len)
        self.seqs: dict[int, Sequence] = {}

    def add(self, req) -> None:
        if len(req.prompt) + req.params.max_tokens > self.scheduler.capacity():
            raise ValueError(f"prompt ({len(req.prompt)}) + max_tokens ({req.params.max_tokens}) does not fit "
                             f"the KV cache ({self.scheduler.capacity()} tokens)")
        seq = Sequence(req, salt=prefix_salt(self.model.cfg, len(req.prompt)))
        self.scheduler.add(seq)
        self.seqs[req.id] = seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: int):
        """Stop a request now and release its blocks; returns its Request (None if unknown/finished)."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self.seqs.pop(request_id, None)
        self.metrics.aborted += 1
        return seq.req

    def step(self) -> list:
        t0 = time.perf_counter()
        speculating = self.engine.proposer is not None
        if speculating:
            self._propose()
        plan = self.scheduler.schedule()
        if speculating:
            self._fit_drafts(plan)
        if not plan:
            return []
        # prefill: tokens known before the sequence was (re)admitted; decode: feeding a sampled token
        # (drafts count as decode: only sequences that were decoding get them)
        prefill = sum(n for s, n in plan
                      if not (s.draft or (n == 1 and s.remaining == 1 and s.n_computed >= s.prompt_len)))
        due = self.runner.run(plan)
        self.scheduler.computed(plan)
        events = []
        spec = [(s, lg) for s, lg in due if s.draft]
        due = [(s, lg) for s, lg in due if not s.draft]
        if spec:
            events += self._verify(spec)
        if due:
            reqs = [s.req for s, _ in due]
            tokens = self.engine._sample(torch.stack([lg for _, lg in due]), reqs)
            events += self.engine._emit(reqs, tokens)
        if due or spec:
            now = time.perf_counter()
            for s in [s for s, _ in spec + due]:
                if s.last_token is None:
                    self.metrics.ttft.append(now - s.arrival)
                else:
                    self.metrics.itl.append(now - s.last_token)
                s.last_token = now
                if s.req.reason is not None:
                    self.scheduler.finish(s)
                    self.seqs.pop(s.req.id, None)
                    self.engine.finished[s.req.id] = s.req
                    self.metrics.finished += 1
        m = self.metrics
        m.steps += 1
        m.last_step_tokens = sum(n for _, n in plan)
        m.tokens_computed += m.last_step_tokens
        m.prefill_tokens += prefill
        m.step_times.append(time.perf_counter() - t0)
        return events

    def stats(self) -> dict:
        return self.metrics.snapshot(self.scheduler)

    # ---- speculative decoding (n-gram prompt lookup) ------------------------------------------------

    def _propose(self) -> None:
        """Drafts for every decoding sequence (its only uncomputed token is its last sampled one), as the
        row-pool engine limits them (none for penalised requests, never past max_tokens)."""
        eng = self.engine
        seqs = [s for s in self.scheduler.running if s.remaining == 1 and s.n_computed >= s.prompt_len]
        if not seqs:
            return
        reqs = [s.req for s in seqs]
        limit = [0 if r.counts is not None else min(eng.spec_k, r.params.max_tokens - len(r.output) - 1)
                 for r in reqs]
        draft = eng.proposer.propose([r.prompt + r.output for r in reqs], limit, eng._spec_sampling(reqs, True))
        tokens, counts = draft.tokens.tolist(), draft.counts.tolist()
        for s, t, c in zip(seqs, tokens, counts, strict=True):
            s.draft = t[:c]

    def _fit_drafts(self, plan: list[tuple[Sequence, int]]) -> None:
        """Drafts only live for this step: cut them to what the scheduler planned (a short budget or a
        full cache plans fewer tokens), drop them for sequences not planned (preempted, waiting)."""
        planned = {id(s): n for s, n in plan}
        for s in self.scheduler.running + list(self.scheduler.waiting):
            if s.draft:
                n = planned.get(id(s))  # the last sampled token, then n - 1 drafts
                s.draft = s.draft[: n - 1] if n is not None else []

    def _verify(self, spec: list[tuple[Sequence, torch.Tensor]]) -> list:
        """Each sequence's logits [1 + d, V] at [last, d drafts]: accept (runtime.speculative.verify), forget
        the rejected drafts' keys and blocks (`Scheduler.rollback`), emit the run through the stop rules."""
        eng = self.engine
        seqs, reqs = [s for s, _ in spec], [s.req for s, _ in spec]
        d = [len(s.draft) for s in seqs]
        K, V, dev = max(d), spec[0][1].shape[-1], spec[0][1].device
        logits = torch.zeros(len(spec), K + 1, V, dtype=spec[0][1].dtype, device=dev)
        tokens = torch.zeros(len(spec), K, dtype=torch.long, device=dev)
        for i, (s, lg) in enumerate(spec):
            logits[i, : lg.shape[0]] = lg
            tokens[i, : d[i]] = torch.tensor(s.draft, dtype=torch.long)
        draft = Draft(tokens, torch.tensor(d, dtype=torch.long, device=dev))
        out, accepted = eng._verify(logits, draft, eng._spec_sampling(reqs, False), reqs)
        acc, toks = accepted.tolist(), out.tolist()
        for s, a, n in zip(seqs, acc, d, strict=True):
            s.draft = []
            self.scheduler.rollback(s, s.n_computed - (n - a))
        events = eng._emit_runs(reqs, [toks[i][: acc[i] + 1] for i in range(len(spec))], logits)
        eng._spec_account(d, acc, len(events))
        return events
