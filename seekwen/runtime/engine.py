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

Per request (`SamplingParams`): temperature, top-k, top-p, min-p, presence / frequency / repetition
penalties (definitions in runtime.sampling), stop token ids, stop strings (decided on the detokenized text
by runtime.detokenize.Detokenizer, also when one spans several tokens; the stop text is not returned),
`max_tokens`, and `logprobs` (the chosen token's logprob and the top-k alternatives, from the model's
raw distribution). Each `Event` carries the token, the new text it makes certain (when the model has a
tokenizer) and its logprobs. `abort(id)` ends a request at once and frees its row; `add_samples` queues
n samples of one prompt (n requests with the same prompt: each prefills it here; the paged engine
shares one prefill). `stats` (runtime.stats.EngineStats) counts requests, tokens, steps, time to first token and
inter-token latency; a server's metrics read its `snapshot()`.

`Engine(model, paged=True, ...)` keeps the same API over the serving runtime instead
(`runtime.paged_engine`): a block-paged KV cache with prefix caching (`runtime.paged`, `runtime.blocks`),
a scheduler with a token budget per step, chunked prefill, preemption by recompute and a bounded queue
(`runtime.scheduler`), `abort`, and `stats()` (`runtime.metrics`). Sampling and stops stay here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .decoder import Decoder
from .detokenize import Detokenizer
from .sampling import apply_penalties, logprobs, sample
from .speculative import Draft, Sampling, SpecStats, make_proposer, verify
from .stats import EngineStats


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # over the generated tokens; 0: off
    frequency_penalty: float = 0.0  # over the generated tokens; 0: off
    repetition_penalty: float = 1.0  # over prompt and generated tokens; 1: off
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (need the model's tokenizer)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None  # this request's own random stream: its samples don't depend on its batch-mates
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k most likely
    detokenize: bool = True  # Event.text (when the model has a tokenizer)
    skip_special_tokens: bool = True

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check(self) -> None:
        """ValueError naming the first invalid field."""
        def finite(name: str) -> float:
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"{name} must be a finite number, got {x!r}")
            return x

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if finite("temperature") < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0: off), got {self.top_k!r}")
        if not 0 <= finite("min_p") <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        finite("presence_penalty"), finite("frequency_penalty")
        if finite("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")


@dataclass
class Event:
    id: int
    token: int
    finished: bool
    reason: str | None = None  # "eos" | "stop" | "length" when finished ("abort": see Engine.abort)
    text: str = ""  # the text this token makes certain (held back: partial characters, possible stop strings)
    logprob: float | None = None  # with params.logprobs: log p(token) under the model
    top_logprobs: list[tuple[int, float]] | None = None  # with params.logprobs = k: the k most likely
    stop_reason: str | int | None = None  # when finished by a stop string / stop token id: which one


@dataclass(eq=False)  # compared by identity: `req in self.live` must not compare prompts
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[Event], None] | None = None
    output: list[int] = field(default_factory=list)
    stops: frozenset[int] = frozenset()
    reason: str | None = None
    generator: torch.Generator | None = None  # from params.seed
    detok: Detokenizer | None = None
    text: str = ""  # returned so far (Event.text pieces)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    counts: torch.Tensor | None = None  # [V] times each token was generated (penalties)
    seen: torch.Tensor | None = None  # [V] bool: in the prompt or the output (repetition penalty)
    arrival: float = 0.0  # perf_counter() at add_request
    last_time: float = 0.0  # perf_counter() at its latest token
    pending_logprobs: tuple | None = None  # (logprob, top) from _sample, for _emit


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
        speculative=None,
        num_speculative_tokens: int = 3,
        draft_model=None,
    ):
        """graphs: replay decode steps from CUDA graphs (runtime.graphs); default: when the model allows it
        (on a CUDA device). False: eager steps. compile: torch.compile each graphed step first (faster
        steps, a compile per batch bucket on first use).

        paged: run on the block-paged KV cache instead of the row pool (`runtime.paged_engine`): blocks of
        `block_size` tokens (`num_blocks` of them; default: the row pool's max_batch x max_len), a
        scheduler with a token budget per step (`max_num_batched_tokens`: decode rows + prefill chunks),
        prefix caching, preemption by recompute, `abort`, and a waiting queue of at most `max_queue`
        requests (`add_request` raises `QueueFull` beyond). `max_batch` bounds the running sequences.

        speculative: "ngram", "draft" (with `draft_model`) or "mtp" (DeepSeek-V3's MTP layer), or a
        `runtime.speculative.Proposer`: each decode step drafts up to `num_speculative_tokens` tokens per
        row and verifies them in one forward (row-pool engine; see `_decode_speculative`)."""
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        self.paged = None
        self.proposer, self.spec_k, self.spec_stats = None, num_speculative_tokens, None
        if speculative is not None:
            if paged and speculative != "ngram":
                raise ValueError("the paged engine speculates with ngram (prompt lookup) only; draft and mtp "
                                 "run on the row-pool engine (paged=False)")
            if num_speculative_tokens < 1:
                raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
            self.proposer = make_proposer(speculative, model, max_batch, max_len, draft_model)
            self.spec_stats = SpecStats()
            graphs = False  # verify forwards are multi-token extends; the ring buffers could not rewind
        if paged:
            from .paged_engine import PagedCore

            self.decoder = None
            self.paged = PagedCore(self, block_size, num_blocks, max_num_batched_tokens, enable_prefix_caching,
                                   max_queue)
        else:
            self.decoder = Decoder(model, max_batch, max_len, graphs=graphs, compile=compile,
                                   ring=self.proposer is None)
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
        self.tokenizer = getattr(model, "tokenizer", None)  # for Event.text and stop strings
        self.stats = EngineStats(cache_capacity=max_batch * max_len)

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
        params.check()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer")
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) > max_len {self.max_len}")
        if max(prompt) >= self.model.cfg.vocab_size or min(prompt) < 0:
            raise ValueError("prompt contains ids outside the vocabulary")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)
        req = Request(self._next_id, prompt, params, on_token, stops=frozenset(stops), arrival=time.perf_counter())
        dev = self.model.device
        if params.seed is not None:
            req.generator = torch.Generator(device=dev)
            req.generator.manual_seed(params.seed)
        if self.tokenizer is not None and (params.detokenize or params.stop):
            req.detok = Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                    params.include_stop_str_in_output)
        if params.penalized:
            V = self.model.cfg.vocab_size
            req.counts = torch.zeros(V, dtype=torch.float32, device=dev)
            req.seen = torch.zeros(V, dtype=torch.bool, device=dev)
            req.seen[torch.tensor(prompt, device=dev)] = True
        if self.paged is not None:
            self.paged.add(req)  # may raise QueueFull
        else:
            self.waiting.append(req)
        self._next_id += 1
        return req.id

    def add_samples(
        self,
        prompt_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        n: int = 1,
        on_token: Callable[[Event], None] | None = None,
    ) -> list[int]:
        """n samples of one prompt: n requests (on the row pool each prefills the prompt; on the paged
        engine they share one prefill through the prefix cache). With a seed, sample i draws from seed + i,
        so the samples differ and each is reproducible."""
        params = params or SamplingParams()
        out = []
        for i in range(n):
            p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=(params.seed + i) % 2**64)
            out.append(self.add_request(prompt_ids, p, on_token))
        return out

    def has_work(self) -> bool:
        return bool(self.live or self.waiting) or (self.paged is not None and self.paged.has_work())

    def abort(self, request_id: int) -> bool:
        """End a waiting or running request now (reason "abort"): its cache row (or, paged, its blocks) is
        freed before this returns and the Request goes to `finished`. No event is sent for it. False if the
        id is not queued or running."""
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
        with self.stats.lock:
            self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1
        if self.paged is None and req in self.live:
            self._retire()  # (moves it to `finished`)
        else:
            self.finished[req.id] = req
        if self.paged is not None:
            self._paged_gauges()
        else:
            self._gauges()
        return True

    def cache_stats(self) -> dict:
        """Running / waiting / preempted requests, KV blocks, prefix-cache hits, tokens per step, TTFT, ITL
        (paged engine; the row-pool engine reports its queue lengths only). Request-level counters and
        histograms for every engine are in `self.stats` (runtime.stats.EngineStats)."""
        if self.paged is not None:
            return self.paged.stats()
        return {"running": len(self.live), "waiting": len(self.waiting)}

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests (prefill), decode one token for every other live sequence."""
        if self.paged is not None:
            events = self.paged.step()
            self._paged_gauges()
            return events
        n_old = len(self.live)
        events = self._decode(n_old) if n_old else []
        events += self._admit()
        prefilled = sum(len(r.prompt) for r in self.live[n_old:])
        self._retire()
        with self.stats.lock:
            self.stats.steps += 1
            self.stats.prompt_tokens += prefilled
            if n_old + prefilled:
                self.stats.step_tokens.observe(n_old + prefilled)
        self._gauges()
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
        """logits [n, V] -> tokens [n], each row with its own request's parameters: penalties, then the
        draw (runtime.sampling), then the logprobs the requests asked for (left in `pending_logprobs`)."""
        raw = logits
        dev = logits.device
        pen = [i for i, r in enumerate(reqs) if r.counts is not None]
        if pen:
            rows = [reqs[i] for i in pen]
            idx = torch.tensor(pen, device=dev)
            logits = logits.float().clone()
            logits[idx] = apply_penalties(
                logits[idx], torch.stack([r.counts for r in rows]), torch.stack([r.seen for r in rows]),
                torch.tensor([r.params.presence_penalty for r in rows], device=dev),
                torch.tensor([r.params.frequency_penalty for r in rows], device=dev),
                torch.tensor([r.params.repetition_penalty for r in rows], device=dev))
        tokens = self._draw(logits, reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            idx = torch.tensor(want, device=dev)
            k = max(reqs[i].params.logprobs for i in want)
            chosen, top_i, top_v = logprobs(raw[idx], tokens[idx], k)
            chosen, top_i, top_v = chosen.tolist(), top_i.tolist(), top_v.tolist()
            for j, i in enumerate(want):
                k_i = reqs[i].params.logprobs
                reqs[i].pending_logprobs = (chosen[j], list(zip(top_i[j][:k_i], top_v[j][:k_i], strict=True)))
        return tokens

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Rows of seeded requests draw from their own generator, one row at a time; the others share the
        engine's."""
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
            min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32, device=dev)
            idx = torch.tensor(shared, device=dev)
            tokens[idx] = sample(logits[idx], temp, top_k, top_p, self.generator, min_p)
        for i, r in enumerate(reqs):
            if r.generator is not None and r.params.temperature > 0:
                p = r.params
                tokens[i] = sample(logits[i : i + 1], p.temperature, p.top_k, p.top_p, r.generator, p.min_p)[0]
        return tokens

    def _emit(self, reqs: list[Request], tokens: torch.Tensor) -> list[Event]:
        """Record each request's new token; decide its stop (stop token, stop string, then length)."""
        events = []
        now = time.perf_counter()
        st = self.stats
        for req, tok in zip(reqs, tokens.tolist(), strict=True):
            req.output.append(tok)
            p = req.params
            text = ""
            if tok in req.stops:
                req.reason = "eos" if tok in self.eos and tok not in p.stop_token_ids else "stop"
                req.stop_reason = tok if req.reason == "stop" else None
            elif req.detok is not None:
                text = req.detok.push(tok)
                if req.detok.stopped is not None:
                    req.reason, req.stop_reason = "stop", req.detok.stopped
            if req.reason is None and len(req.output) >= p.max_tokens:
                req.reason = "length"
            if req.detok is not None and req.reason is not None and req.detok.stopped is None:
                text += req.detok.flush()  # nothing can become a stop string any more
            req.text += text
            if req.counts is not None:
                req.counts[tok] += 1
                req.seen[tok] = True
            with st.lock:
                st.generation_tokens += 1
                if len(req.output) == 1:
                    st.ttft.observe(now - req.arrival)
                else:
                    st.itl.observe(now - req.last_time)
                if req.reason is not None:
                    st.e2e.observe(now - req.arrival)
                    st.finished[req.reason] = st.finished.get(req.reason, 0) + 1
            req.last_time = now
            lp, top = req.pending_logprobs if req.pending_logprobs is not None else (None, None)
            req.pending_logprobs = None
            ev = Event(req.id, tok, req.reason is not None, req.reason, text, lp, top, req.stop_reason)
            if req.on_token is not None:
                req.on_token(ev)
            events.append(ev)
        return events

    def _paged_gauges(self) -> None:
        """The paged engine's counts in `stats` (what a server's metrics read): running / waiting, tokens
        held by blocks in use, prompt tokens prefilled (prefix hits are not), the prefix-cache hit rate."""
        c = self.paged.stats()
        block = self.paged.cache.block_size
        with self.stats.lock:
            self.stats.running, self.stats.waiting = c["running"], c["waiting"]
            self.stats.cache_tokens = c["blocks_used"] * block
            self.stats.cache_capacity = (c["blocks_used"] + c["blocks_free"]) * block
            self.stats.prompt_tokens = c["prefill_tokens"]
            self.stats.steps = c["steps"]
            self.stats.prefix_hit_rate = c["prefix_hit_rate"]

    def _gauges(self) -> None:
        with self.stats.lock:
            self.stats.running = len(self.live)
            self.stats.waiting = len(self.waiting)
            self.stats.cache_tokens = sum(len(r.prompt) + len(r.output) - 1 for r in self.live)

    def _decode(self, n: int) -> list[Event]:
        if self.proposer is not None:
            return self._decode_speculative(n)
        logits = self.decoder.step(self.last[:n])  # [n, V]
        tokens = self.decoder.agree(self._sample(logits, self.live[:n]))  # parallel hook: rank 0's tokens
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
        hidden_too = self.proposer is not None and self.proposer.needs_hidden
        out = self.decoder.prefill(ids, lens, start=n, return_hidden=hidden_too)  # into the free rows [n, n + k)
        logits, hidden = out if hidden_too else (out, None)
        tokens = self.decoder.agree(self._sample(logits, reqs))  # parallel hook: rank 0's tokens
        self.last[n : n + k] = tokens
        self.live += reqs
        if self.proposer is not None:
            self.proposer.start([r.prompt + [t] for r, t in zip(reqs, tokens.tolist(), strict=True)], hidden, n)
        return self._emit(reqs, tokens)

    # ---- speculative decoding (runtime.speculative) ---------------------------------------------

    def _decode_speculative(self, n: int) -> list[Event]:
        """One round for rows [0, n): the proposer drafts up to k tokens per row, one forward over [last,
        drafts] verifies them (greedy: the target's argmax; sampling: the rejection rule, exact to the
        target's distribution), each row is rewound past its first rejection and its tokens go through
        the usual stop rules (a stop string or token inside the accepted run ends it there).

        Rows that cannot be verified exactly with drafts get none and sample as without speculation:
        penalised rows (their distribution changes with every token). A seeded sampled row drafts
        deterministically (the draft's argmax) and verifies on its own random stream, so its text still
        does not depend on its batch-mates."""
        reqs, dev = self.live[:n], self.model.device
        history = [r.prompt + r.output for r in reqs]
        limit = [0 if r.counts is not None else min(self.spec_k, r.params.max_tokens - len(r.output) - 1)
                 for r in reqs]
        target = self._spec_sampling(reqs, drafting=False)
        draft = self.proposer.propose(history, limit, self._spec_sampling(reqs, drafting=True))
        draft = Draft(self.decoder.agree(draft.tokens), draft.counts, draft.q)
        x = torch.cat((self.last[:n, None], draft.tokens), dim=1)  # [n, K+1]
        hidden_too = self.proposer.needs_hidden
        out = self.decoder.extend(x, draft.counts + 1, all_logits=True, return_hidden=hidden_too)
        logits, hidden = out if hidden_too else (out, None)  # [n, K+1, V]
        tokens, accepted = self._verify(logits, draft, target, reqs)
        tokens, accepted = self.decoder.agree(tokens), self.decoder.agree(accepted)
        self.decoder.rewind(self.decoder.lens[:n] - draft.counts + accepted)  # keep last + accepted drafts
        acc, toks = accepted.tolist(), tokens.tolist()
        events = self._emit_runs(reqs, [toks[b][: acc[b] + 1] for b in range(n)], logits)
        self.last[:n] = tokens[torch.arange(n, device=dev), accepted]
        self._spec_account(draft.counts.tolist(), acc, len(events))
        # finished rows (possibly inside their run) are retired after this step: not updated
        self.proposer.update([r.prompt + r.output for r in reqs],
                             [-1 if r.reason is not None else a for r, a in zip(reqs, acc, strict=True)], hidden)
        return events

    def _spec_account(self, drafts: list[int], accepted: list[int], emitted: int) -> None:
        """One round's drafts and acceptances in `spec_stats` and the server-facing `stats`."""
        self.spec_stats.add(drafts, accepted, emitted)
        with self.stats.lock:
            self.stats.spec_drafts = (self.stats.spec_drafts or 0) + sum(drafts)
            self.stats.spec_accepted = (self.stats.spec_accepted or 0) + sum(accepted)

    def _verify(self, logits, draft, target, reqs) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, K+1], accepted [n]: rows without drafts sample their position-0 logits as a plain step
        (penalties, min-p, seeds, logprobs); seeded sampled rows verify on their own generator."""
        n, S, _ = logits.shape
        tokens = torch.zeros(n, S, dtype=torch.long, device=logits.device)
        accepted = torch.zeros(n, dtype=torch.long, device=logits.device)
        counts = draft.counts.tolist()
        plain = [b for b in range(n) if counts[b] == 0]
        own = [b for b in range(n) if counts[b] and reqs[b].generator is not None and reqs[b].params.temperature > 0]
        shared = [b for b in range(n) if counts[b] and b not in own]
        if plain:
            tokens[plain, 0] = self._sample(logits[plain, 0], [reqs[b] for b in plain])
        for group in [shared] + [[b] for b in own]:
            if not group:
                continue
            sub = Draft(draft.tokens[group], draft.counts[group], None if draft.q is None else draft.q[group])
            sampling = target.rows(group)
            if len(group) == 1 and group[0] in own:
                sampling.generator = reqs[group[0]].generator
            tokens[group], accepted[group] = verify(logits[group], sub, sampling)
        return tokens, accepted

    def _spec_sampling(self, reqs: list[Request], drafting: bool):
        """The rows' sampling parameters for verification, or (drafting) for the proposer: seeded sampled
        rows draft greedily there (a deterministic draft needs no random numbers of the shared stream)."""
        dev = self.model.device
        temp = [0.0 if drafting and r.generator is not None else r.params.temperature for r in reqs]
        return Sampling(torch.tensor(temp, dtype=torch.float32, device=dev),
                        torch.tensor([r.params.top_k for r in reqs], dtype=torch.long, device=dev),
                        torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev),
                        self.generator,
                        torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32, device=dev))

    def _emit_runs(self, reqs: list[Request], runs: list[list[int]], logits: torch.Tensor) -> list[Event]:
        """Emit each row's run of tokens in order (column by column) through `_emit`; a row that finishes
        drops the rest of its run. Logprobs come from the verify forward's logits at each token."""
        events = []
        for j in range(max(len(r) for r in runs)):
            rows = [b for b in range(len(reqs)) if j < len(runs[b]) and reqs[b].reason is None]
            if not rows:
                break
            for b in rows:
                k = reqs[b].params.logprobs
                if k is not None:
                    tok = torch.tensor([runs[b][j]], device=logits.device)
                    chosen, top_i, top_v = logprobs(logits[b][j : j + 1], tok, k)
                    top = list(zip(top_i[0].tolist(), top_v[0].tolist(), strict=True))
                    reqs[b].pending_logprobs = (float(chosen[0]), top)
            events += self._emit([reqs[b] for b in rows], torch.tensor([runs[b][j] for b in rows]))
        return events

    def _retire(self) -> None:
        """Drop finished sequences; move the last live row into each hole."""
        for i in range(len(self.live) - 1, -1, -1):
            if self.live[i].reason is None:
                continue
            self.finished[self.live[i].id] = self.live[i]
            last = len(self.live) - 1
            if i != last:
                self.decoder.move_row(last, i)
                if self.proposer is not None:
                    self.proposer.move_row(last, i)
                self.last[i] = self.last[last]
                self.live[i] = self.live[last]
            self.live.pop()
