"""The `Decoder`: the one place that runs a model over a KV cache.

It owns a slot-pool cache of `max_batch` rows x `max_len` slots (`runtime.cache.KVCache`), each row's
length (`lens`, the only code that changes it) and each sequence's own state (Qwen v1's NTK alpha), and
describes every call to the model as a `ForwardBatch` (model/batch.py):

    dec = Decoder(model, max_batch=4, max_len=256)
    logits = dec.prefill(ids, lens)           # ids [k, S] right-padded, lens [k]: rows 0..k-1 -> [k, V]
    logits = dec.step(tokens)                 # one new token for rows 0..n-1 -> [n, V]
    logits = dec.extend(ids, n_new)           # more tokens for rows that already hold some (chunks)
    dec.move_row(src, dst); dec.rewind(row_lens)

`generate`, the batching `Engine` and `seekwen bench` all run through it. On a CUDA device the decode
steps are replayed from CUDA graphs (`runtime.graphs.GraphRunner`), over the same cache and lengths; on
CPU, for a model the compiled step serves (`fast.compiled_step`: the fast path in fp32, up to 64 rows),
each decode step is one C++ call over every layer, writing the same cache.
"""

from __future__ import annotations

import torch

from ..fast import compiled_step, linear
from ..model.transformer import ntk_alphas
from .cache import KVCache
from .graphs import GraphRunner, graph_blocker


class Decoder:
    def __init__(
        self,
        model,
        max_batch: int,
        max_len: int,
        graphs: bool | None = None,
        compile: bool = False,
        ring: bool = True,
        compiled_step: bool | None = None,
    ):
        """graphs: replay decode steps from CUDA graphs; None: when the model allows it (`graph_blocker`),
        True: graphed or a ValueError saying why not, False: eager. compile: torch.compile each graphed
        step first. ring: keep sliding-window layers in ring buffers of their window. compiled_step: run CPU
        decode steps as one C++ call (`fast.compiled_step`); None: where it serves the model (and
        SEEKWEN_COMPILED_STEP is not 0), True: that or a ValueError saying why not, False: never."""
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        dev = model.device
        self.cache = KVCache(model.cfg, max_batch, max_len, dtype=model.dtype, device=dev, ring=ring)
        self.lens = torch.zeros(max_batch, dtype=torch.long, device=dev)  # [max_batch] tokens held per row
        self.views: dict[int, KVCache] = {}  # n -> the cache's rows [0, n) (`rows`)
        rope = model.cfg.rope
        # Qwen v1 dynamic NTK: alpha is the sequence's, fixed from its prompt length at prefill
        self.ntk_alpha = torch.ones(max_batch, dtype=torch.float64) if rope.type == "qwen_dynamic" else None
        why = graph_blocker(model)
        if graphs and why is not None:
            raise ValueError(f"CUDA graphs are not available for this model: {why}")
        self.runner = GraphRunner(self, compile=compile) if graphs is not False and why is None else None
        self.compiled, self.compiled_why = None, "off"
        if compiled_step is not False and self.runner is None:
            self._build_compiled(compiled_step)

    # ---- the calls ----------------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, lens: torch.Tensor | None = None, start: int = 0, **inputs):
        """Start sequences in rows [start, start + k): ids [k, S] right-padded, lens [k] real tokens
        (default all S). Returns the logits at each row's last real token, [k, vocab]. `inputs`: as
        for `extend` (return_hidden, hidden)."""
        k, S = ids.shape
        lens = torch.full((k,), S, dtype=torch.long, device=ids.device) if lens is None else lens.to(ids.device)
        self.lens[start : start + k] = 0
        if self.ntk_alpha is not None:
            self.ntk_alpha[start : start + k] = ntk_alphas(lens.tolist(), self.model.cfg.rope.seq_length)
        return self.extend(ids, lens, start, **inputs)

    def extend(
        self,
        ids: torch.Tensor,
        n_new: torch.Tensor | None = None,
        start: int = 0,
        all_logits: bool = False,
        return_hidden: bool = False,
        hidden: torch.Tensor | None = None,
    ):
        """Append ids [k, S] (right-padded; n_new [k] real tokens, default S) to rows [start, start + k).
        Returns the logits at each row's last new token [k, vocab], or at every new token [k, S, vocab].

        For speculative decoding: `return_hidden` returns (logits, hidden [k, S, d]) with the model's
        hidden state at every new token (`Transformer.forward(return_hidden=True)`); `hidden` [k, S, d]
        is passed to a model that reads one besides the ids (DeepSeek-V3's MTP layer, `model.mtp`)."""
        k, S = ids.shape
        dev = ids.device
        rows = slice(start, start + k)
        n_new = torch.full((k,), S, dtype=torch.long, device=dev) if n_new is None else n_new.to(dev)
        positions = self.lens[rows, None] + torch.arange(S, device=dev)  # [k, S]
        n_keys = int(positions.max()) + 1  # the one host sync of the call
        self.cache.check(n_keys)
        padded = bool((n_new < S).any()) if k > 1 else int(n_new[0]) < S
        batch = self.model.batch(
            positions,
            kv=self.rows(start, start + k),
            n_keys=n_keys,
            new_valid=(torch.arange(S, device=dev)[None, :] < n_new[:, None]) if padded else None,
            # max position S - 1 means every row starts at 0: the keys are exactly the new tokens (right
            # padding only, so pads come last and no real token sees them)
            causal=n_keys == S and S > 1,
            ntk_alpha=None if self.ntk_alpha is None else self.ntk_alpha[rows],
        )
        extra = {} if hidden is None else {"hidden": hidden}
        if return_hidden:
            extra["return_hidden"] = True
        out = self.model(ids, batch=batch, keep=None if all_logits else n_new - 1, **extra)
        logits, states = out if return_hidden else (out, None)
        self.lens[rows] += n_new
        logits = logits if all_logits else logits[:, 0]
        return (logits, states) if return_hidden else logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row for rows [0, n): tokens [n] -> logits [n, vocab]. From a CUDA graph the
        returned tensor is overwritten by the next step: sample from it first."""
        n = tokens.shape[0]
        if self.runner is not None:
            logits = self.runner.decode(tokens, n)
        elif self.compiled is not None and self.compiled.serves(n):
            if self.compiled.mode != linear.ACTIVATIONS:  # the block-activation mode changed: rebuild for it
                self._build_compiled(None)
            logits = self.compiled.run(tokens, self.lens[:n]) if self.compiled is not None else self.model_step(tokens)
        else:
            logits = self.model_step(tokens)
        self.lens[:n] += 1
        return logits

    def model_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """A decode step through the model's forward (the Python layers); `step` without the bookkeeping."""
        n = tokens.shape[0]
        counts = (self.lens[:n] + 1).tolist()  # keys each row sees: the one host sync of a step
        n_keys = max(counts)
        self.cache.check(n_keys)
        batch = self.model.batch(
            self.lens[:n, None],
            kv=self.rows(0, n),
            n_keys=n_keys,
            key_counts=counts,
            ntk_alpha=None if self.ntk_alpha is None else self.ntk_alpha[:n],
        )
        return self.model(tokens[:, None], batch=batch)[:, 0]

    def _build_compiled(self, want: bool | None) -> None:
        self.compiled, self.compiled_why = compiled_step.attempt(self.model, self.cache)
        if want and self.compiled is None:
            raise ValueError(f"the compiled step does not serve this model: {self.compiled_why}")

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache's view of rows [start, stop). Decode steps run on rows [0, n): those views are made once
        per n and kept (at most max_batch of them), so a step does not slice every layer's tensors again."""
        if start:
            return self.cache.rows(start, stop)
        view = self.views.get(stop)
        if view is None:
            view = self.views[stop] = self.cache.rows(0, stop)
        return view

    # ---- row bookkeeping ----------------------------------------------------------------------------

    def move_row(self, src: int, dst: int) -> None:
        """Move the sequence in row `src` into row `dst` (the engine keeps its live rows packed)."""
        self.cache.copy_row(src, dst, int(self.lens[src]))
        self.lens[dst] = self.lens[src]
        if self.ntk_alpha is not None:
            self.ntk_alpha[dst] = self.ntk_alpha[src]

    def rewind(self, lens: torch.Tensor | int, start: int = 0) -> None:
        """Set rows [start, start + len(lens)) back to holding `lens` tokens (keys past them are
        forgotten). Only shortens; a sliding-window ring buffer can go back one token at most (one more
        and the next query would need a key that the ring has already overwritten)."""
        lens = torch.as_tensor(lens, dtype=torch.long, device=self.lens.device).reshape(-1)
        rows = slice(start, start + lens.numel())
        if bool((lens > self.lens[rows]).any()):
            raise ValueError("rewind can only shorten sequences")
        if self.cache.windows and bool((self.lens[rows] - lens > 1).any()):
            raise ValueError("sliding-window layers keep a ring buffer: it can be rewound by one token at most")
        self.lens[rows] = lens

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens sampled from this call's logits, as every rank will decode them: under tensor/expert
        parallelism rank 0's, broadcast (`parallel.ParallelTransformer.sync_tokens`), so the ranks' plans
        never diverge; in one process, `tokens` itself. `generate` and the engine call it after sampling."""
        sync = getattr(self.model, "sync_tokens", None)
        return tokens if sync is None else sync(tokens)

    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def describe(self) -> list[tuple[str, str]]:
        """The runtime's rows of the implementation plan (see `fast.plan` for the model's)."""
        graphs = self.runner is not None and self.runner.graphed
        return runtime_plan(self.model, graphs=graphs, cache=self.cache, compiled=self.compiled_why)


COMPILED_STEP = ("one C++ call per step over every layer (fast.compiled_step; up to 64 rows, more: the layers "
                 "from Python)")


def compiled_why(model, cache: KVCache | None = None) -> str:
    """Why the compiled step would not serve `model` over `cache` (default: a one-row cache); "" if it would."""
    return compiled_step.attempt(model, cache or KVCache(model.cfg, 1, 8, dtype=model.dtype, device=model.device))[1]


def runtime_plan(model, graphs: bool | None = None, cache: KVCache | None = None,
                 compiled: str | None = None) -> list[tuple[str, str]]:
    """How the runtime will run `model`: the KV cache layout and the decode steps. graphs: as for `Decoder`;
    compiled: why the compiled step does not serve it ("": it does; None: find out, `compiled_why`)."""
    cfg = model.cfg
    kind = "MLA latent (c_kv + k_pe)" if cfg.mla is not None else "k and v per KV head"
    windows = sorted({w for w in cfg.sliding_window or [] if w})
    ring = f"; sliding-window layers in ring buffers of {windows}" if windows else ""
    rows = [("KV cache", f"slot = position rows, {kind}{ring}")]
    why = graph_blocker(model)
    if graphs is None:
        graphs = why is None
    if graphs:
        rows.append(("decode steps", "CUDA graphs, one per batch bucket (static step over all cache slots)"))
        return rows
    compiled = compiled_why(model, cache) if compiled is None else compiled
    if not compiled:
        rows.append(("decode steps", COMPILED_STEP))
    else:
        rows.append(("decode steps", f"eager, one forward per step ({why or 'graphs off'}; compiled step: {compiled})"))
    return rows
