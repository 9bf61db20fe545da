"""Batched generation engine: many sequences of different lengths decode together in one forward.

    engine = Engine(model, max_batch=8, max_len=2048)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9))
    while engine.has_work():
        for event in engine.step():          # Event(id, token, finished, reason)
            ...

The model runs through a `runtime.decoder.Decoder`: a KV cache pool of `max_batch` rows with per-row
lengths; live sequences always occupy rows [0, n), so each decode step is one forward over rows
[0, n) with one new token per row: no per-sequence loop in the model. Each step first admits waiting requests (one
batched, right-padded prefill into the free rows [n, n + k); their first token comes from the
prefill logits), then decodes the rows that were already live. A sequence stops on an EOS id (the
config's, unless `ignore_eos`), on one of its `stop_token_ids`, or after `max_tokens`; its row is
then refilled by moving the last live row into it (one row copy), keeping the live rows packed.
On a CUDA device the decode steps are replayed from CUDA graphs (`runtime.graphs`).
Sampling parameters are per row (runtime.sampling.sample takes per-row tensors). A request with its
own `SamplingParams.seed` draws from its own generator, so its sampled text does not depend on which
requests share its steps; the others draw from one engine-wide generator (`seed`). Greedy text never
depends on the batch.

`Engine(model, paged=True, ...)` keeps the same API over the serving runtime instead
(`runtime.paged_engine`): a block-paged KV cache with prefix caching (`runtime.paged`, `runtime.blocks`),
a scheduler with a token budget per step, chunked prefill, preemption by recompute and a bounded queue
(`runtime.scheduler`), `abort`, and `stats()` (`runtime.metrics`). Sampling and stops stay here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .decoder import Decoder
from .sampling import sample


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # this request's own random stream: its samples don't depend on its batch-mates


@dataclass
class Event:
    id: int
    token: int
    finished: bool
    reason: str | None = None  # "eos" | "stop" | "length" when finished


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[Event], None] | None = None
    output: list[int] = field(default_factory=list)
    stops: frozenset[int] = frozenset()
    reason: str | None = None
    generator: torch.Generator | None = None  # from params.seed


class Engine:
    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_len: int = 2048,
        seed: int | None = None,
        graphs: bool | None = None,
        compile: bool = False,
        paged: bool = False,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        max_queue: int | None = None,
    ):
        """graphs: replay decode steps from CUDA graphs (runtime.graphs); default: when the model allows it
        (on a CUDA device). False: eager steps. compile: torch.compile each graphed step first (faster
        steps, a compile per batch bucket on first use).

        paged: run on the block-paged KV cache instead of the row pool (`runtime.paged_engine`): blocks of
        `block_size` tokens (`num_blocks` of them; default: the row pool's max_batch x max_len), a
        scheduler with a token budget per step (`max_num_batched_tokens`: decode rows + prefill chunks),
        prefix caching, preemption by recompute, `abort`, and a waiting queue of at most `max_queue`
        requests (`add_request` raises `QueueFull` beyond). `max_batch` bounds the running sequences."""
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        self.paged = None
        if paged:
            from .paged_engine import PagedCore

            self.decoder = None
            self.paged = PagedCore(self, block_size, num_blocks, max_num_batched_tokens, enable_prefix_caching,
                                   max_queue)
        else:
            self.decoder = Decoder(model, max_batch, max_len, graphs=graphs, compile=compile)
        self.live: list[Request] = []  # live[i] decodes in cache row i
        self.waiting: deque[Request] = deque()
        self.finished: dict[int, Request] = {}
        self.last = torch.zeros(max_batch, dtype=torch.long, device=model.device)  # [max_batch] last tokens
        self.eos = set(model.cfg.eos_ids)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(seed)
        self._next_id = 0

    # ---- API ------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        on_token: Callable[[Event], None] | None = None,
    ) -> int:
        """Queue a prompt; returns its id. `on_token(event)` is called for each of its new tokens."""
        prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) > max_len {self.max_len}")
        if max(prompt) >= self.model.cfg.vocab_size or min(prompt) < 0:
            raise ValueError("prompt contains ids outside the vocabulary")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)
        req = Request(self._next_id, prompt, params, on_token, stops=frozenset(stops))
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device)
            req.generator.manual_seed(params.seed)
        if self.paged is not None:
            self.paged.add(req)  # may raise QueueFull
        else:
            self.waiting.append(req)
        self._next_id += 1
        return req.id

    def has_work(self) -> bool:
        return bool(self.live or self.waiting) or (self.paged is not None and self.paged.has_work())

    def abort(self, request_id: int) -> bool:
        """Stop a request (waiting or running); a paged engine releases its blocks at once. Its Request,
        with reason "abort", goes to `finished`. False if it is unknown or already finished."""
        if self.paged is not None:
            req = self.paged.abort(request_id)
        else:
            req = next((r for r in self.waiting if r.id == request_id), None)
            if req is not None:
                self.waiting.remove(req)
            else:
                req = next((r for r in self.live if r.id == request_id and r.reason is None), None)
        if req is None:
            return False
        req.reason = "abort"
        if self.paged is None and req in self.live:
            self._retire()
        self.finished[req.id] = req
        return True

    def stats(self) -> dict:
        """Running / waiting / preempted requests, KV blocks, prefix-cache hits, tokens per step, TTFT, ITL
        (paged engine; the row-pool engine reports its queue lengths only)."""
        if self.paged is not None:
            return self.paged.stats()
        return {"running": len(self.live), "waiting": len(self.waiting)}

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests (prefill), decode one token for every other live sequence."""
        if self.paged is not None:
            return self.paged.step()
        n_old = len(self.live)
        events = self._decode(n_old) if n_old else []
        events += self._admit()
        self._retire()
        return events

    def stream(self) -> Iterator[Event]:
        while self.has_work():
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None):
        """Run prompts to completion; returns the new tokens of each, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        for _ in self.stream():
            pass
        return [self.finished.pop(i).output for i in ids]

    # ---- internals ------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits [n, V] -> tokens [n], each row with its own request's parameters. Rows of seeded
        requests draw from their own generator, one row at a time; the others share the engine's."""
        dev = logits.device
        if all(r.params.temperature <= 0 for r in reqs):
            return logits.argmax(dim=-1)
        shared = [i for i, r in enumerate(reqs) if r.generator is None or r.params.temperature <= 0]
        tokens = torch.empty(len(reqs), dtype=torch.long, device=dev)
        if shared:
            rows = [reqs[i] for i in shared]
            temp = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=dev)
            top_k = torch.tensor([r.params.top_k for r in rows], dtype=torch.long, device=dev)
            top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=dev)
            idx = torch.tensor(shared, device=dev)
            tokens[idx] = sample(logits[idx], temp, top_k, top_p, self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None and r.params.temperature > 0:
                p = r.params
                tokens[i] = sample(logits[i : i + 1], p.temperature, p.top_k, p.top_p, r.generator)[0]
        return tokens

    def _emit(self, reqs: list[Request], tokens: torch.Tensor) -> list[Event]:
        events = []
        for req, tok in zip(reqs, tokens.tolist(), strict=True):
            req.output.append(tok)
            if tok in req.stops:
                req.reason = "eos" if tok in self.eos and tok not in req.params.stop_token_ids else "stop"
            elif len(req.output) >= req.params.max_tokens:
                req.reason = "length"
            ev = Event(req.id, tok, req.reason is not None, req.reason)
            if req.on_token is not None:
                req.on_token(ev)
            events.append(ev)
        return events

    def _decode(self, n: int) -> list[Event]:
        logits = self.decoder.step(self.last[:n])  # [n, V]
        tokens = self._sample(logits, self.live[:n])
        self.last[:n] = tokens
        return self._emit(self.live[:n], tokens)

    def _admit(self) -> list[Event]:
        k = min(self.max_batch - len(self.live), len(self.waiting))
        if k == 0:
            return []
        reqs = [self.waiting.popleft() for _ in range(k)]
        n, dev = len(self.live), self.model.device
        lens = torch.tensor([len(r.prompt) for r in reqs], device=dev)
        S = int(lens.max())
        ids = torch.zeros(k, S, dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt, device=dev)
        logits = self.decoder.prefill(ids, lens, start=n)  # right-padded, into the free rows [n, n + k)
        tokens = self._sample(logits, reqs)
        self.last[n : n + k] = tokens
        self.live += reqs
        return self._emit(reqs, tokens)

    def _retire(self) -> None:
        """Drop finished sequences; move the last live row into each hole."""
        for i in range(len(self.live) - 1, -1, -1):
            if self.live[i].reason is None:
                continue
            self.finished[self.live[i].id] = self.live[i]
            last = len(self.live) - 1
            if i != last:
                self.decoder.move_row(last, i)
                self.last[i] = self.last[last]
                self.live[i] = self.live[last]
            self.live.pop()
