"""Speculative decoding, exact to the target model.

Each round a `Proposer` drafts up to k tokens per row; the target model checks all of them in one
forward over [last token, d_1 .. d_k] (`Decoder.extend(all_logits=True)`); `verify` keeps the longest
accepted prefix plus one token of the target's own (the correction at the first rejection, or a bonus
token after the last draft), and `Decoder.rewind` forgets the keys of the rejected drafts. A round
therefore emits between 1 and k + 1 tokens for one target forward.

- Greedy: a draft is accepted iff it is the target's argmax, so the output is the plain greedy output
  token for token.
- Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept d_j with probability
  min(1, p_j(d_j) / q_j(d_j)), else draw from normalise(max(0, p_j - q_j)); after k accepted drafts
  draw from p_k. p is the target's distribution after temperature / top-k / top-p
  (`sampling.distribution`), q the draft's (one-hot for a deterministic draft such as n-gram lookup).
  The output then follows the target's distribution exactly.

Proposers (`make_proposer`):
- `NgramProposer` (prompt lookup): the continuation of the latest earlier occurrence of the last n
  tokens (n from `max_n` down to `min_n`) in prompt + output; any family, no weights.
- `DraftModelProposer`: a smaller model of the same tokenizer, with its own `Decoder`.
- `MTPProposer`: DeepSeek-V3's multi-token-prediction layer (`model.mtp[0]`, chained for k > 1) over
  the target's hidden states, with its own one-layer cache.

Rows of a batch accept different numbers of tokens: each row's drafts are right-padded into one
extend (`n_new` per row) and each row is rewound to its own length, so no row waits for another.
Sliding-window layers cannot keep ring buffers here (a ring rewinds one token at most): speculation
runs its decoders with `ring=False`, i.e. full-length caches for those layers with the window applied
by the mask, which computes exactly the same attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decoder import Decoder
from .sampling import distribution, sample

PROPOSERS = ("ngram", "draft", "mtp")


@dataclass
class Sampling:
    """The target's sampling parameters (scalars or one value per row) and random stream."""

    temperature: float | torch.Tensor = 0.0
    top_k: int | torch.Tensor = 0
    top_p: float | torch.Tensor = 1.0
    generator: torch.Generator | None = None
    min_p: float | torch.Tensor = 0.0

    @property
    def greedy(self) -> bool:
        return bool((torch.as_tensor(self.temperature) <= 0).all())

    def per_position(self, n: int) -> Sampling:
        """The parameters for B*n rows (each row's repeated n times): rows of [B, n, V] flattened."""

        def rep(x):
            t = torch.as_tensor(x)
            return t if t.dim() == 0 else t.repeat_interleave(n)

        return Sampling(rep(self.temperature), rep(self.top_k), rep(self.top_p), self.generator, rep(self.min_p))

    def rows(self, idx: list[int]) -> Sampling:
        """The parameters of rows `idx` only (the same random stream)."""

        def pick(x):
            t = torch.as_tensor(x)
            return t if t.dim() == 0 else t[torch.tensor(idx, dtype=torch.long, device=t.device)]

        return Sampling(pick(self.temperature), pick(self.top_k), pick(self.top_p), self.generator, pick(self.min_p))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> the distribution the target samples from, [B, V]."""
        return distribution(logits, self._on(self.temperature, logits), self._on(self.top_k, logits),
                            self._on(self.top_p, logits), self._on(self.min_p, logits))

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token per row from draft logits [B, V]: (tokens [B], q [B, V]); greedy: (argmax, None)."""
        if self.greedy:
            return logits.argmax(dim=-1), None
        q = self.probs(logits)
        return torch.multinomial(q, 1, generator=self.generator)[:, 0], q

    @staticmethod
    def _on(x, like: torch.Tensor):
        return x.to(like.device) if isinstance(x, torch.Tensor) else x


@dataclass
class Draft:
    """Up to K drafted tokens per row."""

    tokens: torch.Tensor  # [B, K] long, right-padded
    counts: torch.Tensor  # [B] long: real drafts per row (<= K)
    q: torch.Tensor | None = None  # [B, K, V] the draft distributions; None: deterministic (one-hot)

    @classmethod
    def from_lists(cls, drafts: list[list[int]], device: torch.device) -> Draft:
        K = max((len(d) for d in drafts), default=0)
        tokens = torch.zeros(len(drafts), K, dtype=torch.long)
        for b, d in enumerate(drafts):
            tokens[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        counts = torch.tensor([len(d) for d in drafts], dtype=torch.long)
        return cls(tokens.to(device), counts.to(device))

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> Draft:
        return cls.from_lists([[] for _ in range(rows)], device)


@dataclass
class SpecStats:
    """Acceptance metrics of one speculative run."""

    proposed: list[int] = field(default_factory=list)  # [j]: drafts made at position j (0-based)
    accepted: list[int] = field(default_factory=list)  # [j]: of those, accepted
    forwards: int = 0  # target forwards that verified (one per round; the prefill not counted)
    row_rounds: int = 0  # (row, round) pairs with a live row
    tokens: int = 0  # tokens emitted by those rounds

    def add(self, counts: list[int], accepted: list[int], emitted: int) -> None:
        K = max(counts, default=0)
        for lst in (self.proposed, self.accepted):
            lst.extend([0] * (K - len(lst)))
        for c, a in zip(counts, accepted, strict=True):
            for j in range(c):
                self.proposed[j] += 1
                self.accepted[j] += j < a
        self.forwards += 1
        self.row_rounds += len(counts)
        self.tokens += emitted

    def acceptance(self) -> list[float]:
        """Acceptance rate per draft position: accepted / proposed."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed, strict=True)]

    def mean_accepted(self) -> float:
        """Drafts accepted per (row, round)."""
        return sum(self.accepted) / max(self.row_rounds, 1)

    def tokens_per_forward(self) -> float:
        """Tokens each live row gains per target forward (1 = no gain)."""
        return self.tokens / max(self.row_rounds, 1)

    def format(self) -> str:
        rates = " ".join(f"{r:.2f}" for r in self.acceptance())
        return (f"speculation: acceptance per position [{rates}], mean accepted {self.mean_accepted():.2f}, "
                f"{self.tokens_per_forward():.2f} tokens per target forward ({self.forwards} forwards)")


# ---- verification ---------------------------------------------------------------------------------


def verify(logits: torch.Tensor, draft: Draft, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits [B, K+1, V] at [last, d_1 .. d_K] -> (tokens [B, K+1], accepted [B]).

    Row b emits tokens[b, : accepted[b] + 1]: its accepted drafts, then the target's own token. This is
    what an engine calls after its verify forward; it touches no cache (rewind each row by
    counts - accepted afterwards)."""
    B, S, V = logits.shape
    K = S - 1
    valid = torch.arange(K, device=logits.device)[None, :] < draft.counts[:, None]  # [B, K]
    rows = torch.arange(B, device=logits.device)
    if sampling.greedy:
        target = logits.argmax(dim=-1)  # [B, K+1]
        ok = (draft.tokens == target[:, :K]) & valid
        return target, ok.long().cumprod(dim=1).sum(dim=1)
    p = sampling.per_position(S).probs(logits.reshape(B * S, V)).view(B, S, V)
    q = draft.q if draft.q is not None else torch.zeros(B, K, V, device=p.device).scatter_(
        2, draft.tokens[..., None], 1.0)
    d = draft.tokens[..., None]  # [B, K, 1]
    p_d, q_d = p[:, :K].gather(2, d)[..., 0], q.gather(2, d)[..., 0]
    u = torch.rand(B, K, generator=sampling.generator, device=p.device)
    ok = (u * q_d < p_d) & valid  # u < p/q, i.e. accepted with probability min(1, p/q)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    p_next = p[rows, accepted]  # [B, V]
    q_next = torch.cat((q, q.new_zeros(B, 1, V)), dim=1)[rows, accepted]  # q = 0 past the drafts
    rejected = (accepted < draft.counts)[:, None]
    residual = torch.where(rejected, (p_next - q_next).clamp(min=0), p_next)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    nxt = torch.multinomial(residual, 1, generator=sampling.generator)[:, 0]
    tokens = torch.cat((draft.tokens, draft.tokens.new_zeros(B, 1)), dim=1)
    tokens[rows, accepted] = nxt
    return tokens, accepted


# ---- proposers ------------------------------------------------------------------------------------


class Proposer:
    """Drafts tokens for the rows of one generation.

    history[b] is row b's prompt and output so far; its last token is the one the target has not yet
    read (it goes first into the verify forward). The runtime calls `start` once after the prefill,
    then per round `propose` and, after verification, `update` (history then holds the new tokens)."""

    needs_hidden = False  # the target's hidden states are passed to start / update

    def start(self, history: list[list[int]], hidden: torch.Tensor | None, start: int = 0) -> None:
        """After the prefill of rows [start, start + len(history)): hidden [k, S, d] of their prompt
        tokens (right-padded), if needs_hidden."""

    def move_row(self, src: int, dst: int) -> None:
        """The sequence in row `src` now lives in row `dst` (an engine keeps its live rows packed)."""

    def propose(self, history: list[list[int]], limit: list[int], sampling: Sampling) -> Draft:
        """At most limit[b] drafts for row b."""
        raise NotImplementedError

    def update(self, history: list[list[int]], accepted: list[int], hidden: torch.Tensor | None) -> None:
        """After verification: row b accepted accepted[b] drafts (history ends with them and the
        target's token), or -1: row b is finished and did not change; hidden [B, K+1, d] of the
        verify forward, if needs_hidden."""


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (longest n first, from
    `max_n` down to `min_n`) in prompt + output and draft the tokens that followed it."""

    def __init__(self, device: torch.device, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.device, self.max_n, self.min_n = device, max_n, min_n

    def propose(self, history: list[list[int]], limit: list[int], sampling: Sampling) -> Draft:
        return Draft.from_lists([self.lookup(h, k) for h, k in zip(history, limit, strict=True)], self.device)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            pattern, last = tokens[L - n :], tokens[-1]
            for end in range(L - 2, n - 2, -1):  # an occurrence ending at `end`, before the suffix itself
                if tokens[end] == last and tokens[end - n + 1 : end + 1] == pattern:
                    return tokens[end + 1 : end + 1 + k]
        return []


def _pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and lengths [B]."""
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


class DraftModelProposer(Proposer):
    """A smaller model of the same tokenizer drafts k tokens autoregressively (its own `Decoder`).
    Its cache holds every history token but the last; each round it reads the tokens it has not seen
    (extend), drafts K (K - 1 steps), and is rewound to the accepted prefix afterwards."""

    def __init__(self, draft_model, target_vocab: int, max_batch: int, max_len: int):
        self.decoder = Decoder(draft_model, max_batch, max_len, graphs=False, ring=False)
        self.vocab = target_vocab
        self.base: list[int] = []
        self.K = 0

    def start(self, history: list[list[int]], hidden: torch.Tensor | None, start: int = 0) -> None:
        self.decoder.prefill(*_pad([h[:-1] for h in history], self.decoder.model.device), start=start)

    def move_row(self, src: int, dst: int) -> None:
        self.decoder.move_row(src, dst)

    def _draw(self, logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits[:, : self.vocab]  # a draft vocabulary may be padded differently from the target's
        tok, q = sampling.draw(logits)
        if q is not None and q.shape[-1] < self.vocab:
            q = torch.nn.functional.pad(q, (0, self.vocab - q.shape[-1]))
        return tok, q

    def propose(self, history: list[list[int]], limit: list[int], sampling: Sampling) -> Draft:
        B, dev = len(history), self.decoder.model.device
        self.K = K = max(limit, default=0)
        if K == 0:
            return Draft.empty(B, dev)
        held = self.decoder.lens[:B].tolist()
        logits = self.decoder.extend(*_pad([h[n:] for h, n in zip(history, held, strict=True)], dev))
        self.base = [len(h) for h in history]
        tokens, qs = [], []
        for j in range(K):
            if j:
                logits = self.decoder.step(tokens[-1])
            tok, q = self._draw(logits, sampling)
            tokens.append(tok)
            qs.append(q)
        counts = torch.tensor(limit, dtype=torch.long, device=dev)
        q = None if qs[0] is None else torch.stack(qs, dim=1)
        return Draft(torch.stack(tokens, dim=1), counts, q)

    def update(self, history: list[list[int]], accepted: list[int], hidden: torch.Tensor | None) -> None:
        if self.K:  # keep the drafts that were accepted (d_K itself was never fed)
            self.decoder.rewind([n + min(max(a, 0), self.K - 1) for n, a in zip(self.base, accepted, strict=True)])
        self.K = 0


class MTPModel:
    """One MTP layer as a model a `Decoder` can run: its one-layer config and cache, the main model's
    rotary tables, and the main model's hidden states passed in (`Decoder.extend(hidden=...)`)."""

    def __init__(self, model, depth: int = 0):
        self.main, self.layer = model, model.mtp[depth]
        self.cfg = self.layer.cfg
        self.rope = model.rope
        self.layers = [self.layer.block]

    @property
    def device(self) -> torch.device:
        return self.main.device

    @property
    def dtype(self) -> torch.dtype:
        return self.main.dtype

    def batch(self, *args, **kwargs):
        return self.main.batch(*args, **kwargs)

    def __call__(self, ids, batch, keep=None, hidden=None, return_hidden=False):
        return self.layer(ids, hidden, batch, keep=keep, return_hidden=return_hidden)


class MTPProposer(Proposer):
    """DeepSeek-V3 MTP drafting. The MTP cache at position i holds the pair (h_i, t_{i+1}) of the
    target's hidden state and the next token; its output there drafts t_{i+2}. Chained drafts feed the
    layer's own output back as h. After verification the chained (speculative) entries are rewound and
    the pairs of the accepted tokens are written with the target's true hidden states."""

    needs_hidden = True

    def __init__(self, model, max_batch: int, max_len: int, depth: int = 0):
        if len(model.mtp) == 0:
            raise ValueError("this model has no multi-token-prediction layer (config num_nextn_predict_layers)")
        self.decoder = Decoder(MTPModel(model, depth), max_batch, max_len, graphs=False, ring=False)
        self.base: torch.Tensor | None = None
        cfg = model.cfg
        self.logits = torch.zeros(max_batch, cfg.vocab_size, dtype=model.dtype, device=model.device)  # first drafts'
        self.x = torch.zeros(max_batch, cfg.hidden_size, dtype=model.dtype, device=model.device)  # and hidden

    def _read(self, ids: torch.Tensor, n: torch.Tensor, hidden: torch.Tensor, start: int = 0,
              prefill: bool = False) -> None:
        """Write pairs (hidden, ids) into rows [start, start + k) of the MTP cache; keep each row's next
        first-draft logits and hidden (rows with no new pair keep theirs)."""
        call = self.decoder.prefill if prefill else self.decoder.extend
        logits, x = call(ids, n, start=start, hidden=hidden[:, : ids.shape[1]], return_hidden=True)
        got = n > 0
        rows = torch.arange(start, start + ids.shape[0], device=ids.device)[got]
        self.logits[rows] = logits[got].to(self.logits.dtype)  # [k, V] at each row's last pair
        self.x[rows] = x[torch.arange(x.shape[0], device=x.device), (n - 1).clamp(min=0)][got].to(self.x.dtype)

    def start(self, history: list[list[int]], hidden: torch.Tensor | None, start: int = 0) -> None:
        ids, n = _pad([h[1:] for h in history], self.decoder.model.device)  # t_{i+1} next to h_i
        self._read(ids, n, hidden, start, prefill=True)

    def move_row(self, src: int, dst: int) -> None:
        self.decoder.move_row(src, dst)
        self.logits[dst], self.x[dst] = self.logits[src], self.x[src]

    def propose(self, history: list[list[int]], limit: list[int], sampling: Sampling) -> Draft:
        B, dev = len(history), self.decoder.model.device
        K = max(limit, default=0)
        self.base = None
        if K == 0:
            return Draft.empty(B, dev)
        self.base = self.decoder.lens[:B].clone()
        logits, x = self.logits[:B], self.x[:B]
        tokens, qs = [], []
        for j in range(K):
            if j:  # chain: the layer's own output stands in for the target's hidden state
                logits, xs = self.decoder.extend(tokens[-1][:, None], hidden=x[:, None], return_hidden=True)
                x = xs[:, 0]
            tok, q = sampling.draw(logits)
            tokens.append(tok)
            qs.append(q)
        counts = torch.tensor(limit, dtype=torch.long, device=dev)
        return Draft(torch.stack(tokens, dim=1), counts, None if qs[0] is None else torch.stack(qs, dim=1))

    def update(self, history: list[list[int]], accepted: list[int], hidden: torch.Tensor | None) -> None:
        if self.base is not None:
            self.decoder.rewind(self.base)
        # pairs (h_{n+j}, t_{n+j+1}) for j = 0..a: the accepted drafts and the target's token (none for a
        # finished row)
        new = [h[len(h) - a - 1 :] if a >= 0 else [] for h, a in zip(history, accepted, strict=True)]
        if any(new):
            ids, n = _pad(new, self.decoder.model.device)
            self._read(ids, n, hidden)


def make_proposer(kind: str | Proposer, model, max_batch: int, max_len: int, draft_model=None,
                  ngram: tuple[int, int] = (3, 1)) -> Proposer:
    """A proposer by name ("ngram", "draft", "mtp"); a `Proposer` instance is returned as it is."""
    if isinstance(kind, Proposer):
        return kind
    if kind == "ngram":
        return NgramProposer(model.device, *ngram)
    if kind == "draft":
        if draft_model is None:
            raise ValueError("speculative='draft' needs a draft model (draft_model=, --draft-model)")
        return DraftModelProposer(draft_model, model.cfg.vocab_size, max_batch, max_len)
    if kind == "mtp":
        return MTPProposer(model, max_batch, max_len)
    raise ValueError(f"unknown speculative method {kind!r} (use {', '.join(PROPOSERS)})")


# ---- the generation loop --------------------------------------------------------------------------


def speculative_generate(
    model,
    ids: torch.Tensor,
    lens: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    eos: list[int],
    pad: int,
    speculative: str | Proposer,
    num_speculative_tokens: int = 3,
    draft_model=None,
    stop_at_eos: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stats: SpecStats | None = None,
) -> torch.Tensor:
    """`generate` with speculation: ids [B, S] right-aligned, lens [B] -> new tokens [B, N], the same
    tokens (greedy) or the same distribution (sampling) as plain generation. `on_token(tokens [B])` is
    called once per output column, as soon as every row has its token for it."""
    k = num_speculative_tokens
    if k < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
    B, S = ids.shape
    dev = ids.device
    max_len = S + max_new_tokens + k + 1
    decoder = Decoder(model, B, max_len, graphs=False, ring=False)
    proposer = make_proposer(speculative, model, B, max_len, draft_model)
    hidden_too = proposer.needs_hidden
    out = decoder.prefill(ids, lens, return_hidden=hidden_too)
    logits, hidden = out if hidden_too else (out, None)
    first = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.generator)
    history = [ids[b, : int(lens[b])].tolist() + [int(t)] for b, t in enumerate(first.tolist())]
    rows = Rows(first.tolist(), max_new_tokens, eos, pad, on_token, dev)
    proposer.start(history, hidden)
    last = first
    stats = stats if stats is not None else SpecStats()
    while rows.any_live():
        live = rows.live()
        limit = [min(k, rows.left(b) - 1) if live[b] else 0 for b in range(B)]
        draft = proposer.propose(history, limit, sampling)
        x = torch.cat((last[:, None], draft.tokens), dim=1)  # [B, K+1]
        out = decoder.extend(x, draft.counts + 1, all_logits=True, return_hidden=hidden_too)
        logits, hidden = out if hidden_too else (out, None)
        tokens, accepted = verify(logits, draft, sampling)
        # keep `last` and the accepted drafts; a finished row keeps its length (it takes no more room)
        alive = torch.tensor(live, device=dev)
        decoder.rewind(decoder.lens[:B] - draft.counts - 1 + torch.where(alive, accepted + 1, 0))
        acc, toks = accepted.tolist(), tokens.tolist()
        new = [toks[b][: acc[b] + 1] if live[b] else [] for b in range(B)]
        for b in range(B):
            history[b] += new[b]
        emitted = rows.extend(new, live)
        counts = draft.counts.tolist()
        stats.add([counts[b] for b in range(B) if live[b]], [acc[b] for b in range(B) if live[b]], emitted)
        proposer.update(history, [a if ok else -1 for a, ok in zip(acc, live, strict=True)], hidden)
        last = torch.where(alive, tokens[torch.arange(B, device=dev), accepted], last)
    return rows.result(stop_at_eos)


class Rows:
    """Per-row output bookkeeping with `generate`'s rules: a row is finished at its first EOS (what
    follows is padding) or after max_new_tokens; output columns stream once every row has them."""

    def __init__(self, first: list[int], max_new: int, eos: list[int], pad: int, on_token, device):
        self.max_new, self.eos, self.pad, self.on_token, self.device = max_new, set(eos), pad, on_token, device
        self.out: list[list[int]] = [[] for _ in first]
        self.ended = [False] * len(first)  # emitted an EOS
        self.flushed = 0
        self.extend([[t] for t in first], [True] * len(first))

    def left(self, b: int) -> int:
        return self.max_new - len(self.out[b])

    def live(self) -> list[bool]:
        return [not e and self.left(b) > 0 for b, e in enumerate(self.ended)]

    def any_live(self) -> bool:
        return any(self.live())

    def extend(self, new: list[list[int]], live: list[bool]) -> int:
        """Append each live row's new tokens (up to its first EOS); returns how many were kept."""
        kept = 0
        for b, toks in enumerate(new):
            if not live[b]:
                continue
            for t in toks[: self.left(b)]:
                self.out[b].append(t)
                kept += 1
                if t in self.eos:
                    self.ended[b] = True
                    break
        self._flush(min(len(o) if not e else self.max_new for o, e in zip(self.out, self.ended, strict=True)))
        return kept

    def _column(self, c: int) -> list[int]:
        return [o[c] if c < len(o) else self.pad for o in self.out]

    def _flush(self, upto: int) -> None:
        if self.on_token is None:
            self.flushed = max(self.flushed, upto)
            return
        while self.flushed < min(upto, self.width()):
            self.on_token(torch.tensor(self._column(self.flushed), device=self.device))
            self.flushed += 1

    def width(self) -> int:
        """Columns of the result: all of max_new, unless every row ended at an EOS before it."""
        return self.max_new if not all(self.ended) else max(len(o) for o in self.out)

    def result(self, stop_at_eos: bool) -> torch.Tensor:
        n = self.width() if stop_at_eos else self.max_new
        if self.on_token is not None:
            while self.flushed < n:
                self.on_token(torch.tensor(self._column(self.flushed), device=self.device))
                self.flushed += 1
        return torch.tensor([self._column(c) for c in range(n)], dtype=torch.long, device=self.device).T
