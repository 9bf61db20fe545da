"""The OpenAI-compatible application.

    GET  /health               200 when the model is loaded, 503 while loading (or if loading failed)
    GET  /v1/models            the served model name(s)
    POST /v1/completions       prompt: a string, a list of strings, token ids or a list of token id lists
    POST /v1/chat/completions  messages through the checkpoint's chat template (generation prompt added)
    POST /tokenize             a prompt or chat messages -> token ids (vLLM's shapes)
    POST /detokenize           token ids -> text
    GET  /metrics              Prometheus text
    GET  /openapi.json, /docs  the schema

The model loads in a background thread after the server starts listening (so /health can say 503). Every
generation request becomes one engine sequence per (prompt, choice); they are queued to the engine thread
(`loop.EngineLoop`) and their tokens come back on an asyncio queue. A client that disconnects (streaming or
not) aborts its sequences at once, which frees their cache rows before the next engine step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.engine import Event, SamplingParams
from . import metrics
from .errors import APIError, APIKeyMiddleware, BodyLimitMiddleware, bounded, error_body
from .loop import EngineLoop, QueueFull, Sequence
from .reasoning import ReasoningSplitter, opens_thinking
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_messages,
    check_template_kwargs,
    template_messages,
)

log = logging.getLogger("seekwen.serve")

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServeOptions:
    model: str | None = None  # None: the bundled model
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_batch: int = 8
    max_model_len: int | None = None
    max_queue: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    dtype: str | None = None
    device: str | None = None
    quantize: str | None = None
    plain: bool = False
    seed: int | None = None
    speculative: str | None = None  # ngram | draft | mtp (row-pool engine)
    num_speculative_tokens: int = 3
    draft_model: str | None = None
    # Engine arguments of the serving runtime: {} the row pool, else paged=True and the paged engine's
    # block_size / num_blocks / max_num_batched_tokens / enable_prefix_caching (`tools.serve.engine_kwargs`)
    engine: dict = field(default_factory=dict)


class State:
    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.status = "loading"  # loading | ready | failed
        self.error: str | None = None
        self.names = list(opts.served_model_names)
        self.model = self.tokenizer = self.loop = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.defaults: dict = {}
        self.created = int(time.time())
        self.http: Counter = Counter()
        self.on_fatal = lambda: None
        self._token_cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder: dict[str, int] | None = None

    # ---- loading ----------------------------------------------------------------------------------

    def load(self) -> None:
        try:
            delay = float(os.environ.get("SEEKWEN_SERVE_TEST_LOAD_DELAY", "0") or 0)  # tests see "loading"
            if delay > 0:
                time.sleep(min(delay, 60.0))
            from ..runtime.engine import Engine
            from ..runtime.load import load_model

            o = self.opts
            model = load_model(o.model, o.dtype, o.device, quantize=o.quantize, fast=not o.plain)
            tok = model.tokenizer
            if tok is None:
                raise ValueError(f"{model.path}: the checkpoint has no tokenizer")
            limit = int(model.cfg.max_position_embeddings)
            if o.max_model_len is not None and o.max_model_len > limit:
                raise ValueError(f"--max-model-len {o.max_model_len} is over the model's context "
                                 f"(max_position_embeddings {limit})")
            self.max_model_len = o.max_model_len or limit
            self.vocab_size = int(model.cfg.vocab_size)
            self.defaults = generation_defaults(Path(model.path))
            draft = None
            if o.speculative == "draft":
                draft = load_model(o.draft_model, o.dtype, o.device, quantize=o.quantize, fast=not o.plain)
            engine = Engine(model, max_batch=o.max_batch, max_len=self.max_model_len, seed=o.seed,
                            speculative=o.speculative, num_speculative_tokens=o.num_speculative_tokens,
                            draft_model=draft, **o.engine)
            self.loop = EngineLoop(engine, o.max_queue)
            self.loop.start()
            self.model, self.tokenizer = model, tok
            self._byte_decoder = byte_decoder(tok)
            self.status = "ready"
            log.info("seekwen serve: %s ready (context %d, batch %d, %s engine)", self.names[0], self.max_model_len,
                     o.max_batch, "paged" if o.engine.get("paged") else "row-pool")
        except BaseException as e:  # noqa: BLE001 - any failure to load ends the server with a message
            self.status, self.error = "failed", f"{type(e).__name__}: {e}" if not str(e) else str(e)
            log.error("seekwen serve: loading the model failed: %s", self.error)
            self.on_fatal()

    def require_ready(self) -> None:
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable")
        if self.status != "ready":
            raise APIError(503, f"the model failed to load: {self.error}", type="service_unavailable")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"The model `{bounded(name, 200)}` does not exist (served: {', '.join(self.names)})",
                           type="NotFoundError", param="model", code="model_not_found")

    # ---- tokens -----------------------------------------------------------------------------------

    def token_info(self, tid: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, for logprobs."""
        got = self._token_cache.get(tid)
        if got is None:
            text = self.tokenizer.decode([tid], skip_special_tokens=False)
            raw = None
            if self._byte_decoder is not None:
                piece = self.tokenizer.tok.id_to_token(tid)
                if piece is not None and all(ch in self._byte_decoder for ch in piece):
                    raw = [self._byte_decoder[ch] for ch in piece]
            got = (text, raw if raw is not None else list(text.encode("utf-8")))
            self._token_cache[tid] = got
        return got

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.vocab_size
        if any(t < 0 or t >= V for t in ids):
            raise APIError(400, f"{param}: token ids must be in [0, {V})", param=param)


def generation_defaults(folder: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, the fields vLLM takes."""
    try:
        raw = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for k in GENERATION_DEFAULTS:
        v = raw.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = v
    return out


def byte_decoder(tok) -> dict[str, int] | None:
    """GPT-2's byte <-> printable-character table, when the tokenizer decodes byte-level."""
    try:
        dec = json.loads(tok.tok.to_str()).get("decoder") or {}
    except Exception:
        return None
    kinds = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", [])]
    if "ByteLevel" not in kinds:
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def validation_message(errors) -> tuple[str, str | None]:
    """pydantic errors -> (a short message naming the fields, the first field). Input values are never echoed."""
    if errors and errors[0].get("type") == "json_invalid":
        return f"invalid JSON: {bounded((errors[0].get('ctx') or {}).get('error', 'decode error'), 100)}", None
    parts, param = [], None
    for err in errors[:20]:
        loc = [bounded(str(x), 40) for x in err.get("loc", ()) if x != "body" and not (
            isinstance(x, str) and ("[" in x or "(" in x))]  # drop pydantic's union-branch labels
        field_ = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        msg = f"{field_}: {bounded(err.get('msg', 'invalid'), 120)}"
        if msg not in parts:
            parts.append(msg)
        if len(parts) == 4:
            break
    return "invalid request: " + "; ".join(parts), param


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


# ---- turning requests into sequences ------------------------------------------------------------------


def sampling_params(state: State, req, prompt_len: int, logprobs: int | None) -> SamplingParams:
    d = state.defaults
    L = state.max_model_len
    if prompt_len >= L:
        raise APIError(400, f"This model's maximum context length is {L} tokens, but the prompt has {prompt_len} "
                            f"tokens, which leaves no room for a completion (max_tokens "
                            f"{req.max_tokens if req.max_tokens is not None else 1}).", param="prompt",
                       code="context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else L - prompt_len
    if prompt_len + max_tokens > L:
        raise APIError(400, f"This model's maximum context length is {L} tokens, but {prompt_len + max_tokens} "
                            f"were requested: {prompt_len} in the prompt and {max_tokens} for the completion "
                            f"(max_tokens). Shorten the prompt or lower max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    stop_ids = list(req.stop_token_ids or [])
    state.check_ids(stop_ids, "stop_token_ids")

    def pick(name, fallback):
        v = getattr(req, name)
        return v if v is not None else d.get(name, fallback)

    top_k = int(pick("top_k", 0))
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(pick("temperature", 1.0)), top_k=max(top_k, 0),
        top_p=float(pick("top_p", 1.0)), min_p=float(pick("min_p", 0.0)),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=float(pick("repetition_penalty", 1.0)), stop_token_ids=stop_ids, stop=req.stop_list(),
        include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos, seed=req.seed,
        logprobs=logprobs, skip_special_tokens=req.skip_special_tokens)


def make_sequences(state: State, prompts: list[list[int]], params: list[SamplingParams], n: int) -> tuple[
        list[Sequence], asyncio.Queue]:
    """One sequence per (prompt, choice); choice index = prompt index * n + sample index (as vLLM). With a
    seed, sample i draws from seed + i (the samples differ, each reproducible)."""
    total = len(prompts) * n
    if total > state.opts.max_queue:
        raise APIError(400, f"the request asks for {total} sequences (prompts x n); this server queues at most "
                            f"{state.opts.max_queue}", param="n")
    out: asyncio.Queue = asyncio.Queue()
    aloop = asyncio.get_running_loop()
    seqs = []
    for p_i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
        for s_i in range(n):
            p = sp
            if sp.seed is not None and s_i:
                p = dataclasses.replace(sp, seed=(sp.seed + s_i) % 2**64)
            seqs.append(Sequence(p_i * n + s_i, ids, p, out, aloop))
    return seqs, out


def submit(state: State, seqs: list[Sequence]) -> None:
    try:
        state.loop.submit(seqs)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e.args[0]} sequences are already waiting (--max-queue "
                            f"{state.opts.max_queue}); retry later", type="server_overloaded",
                       code="queue_full") from None


async def watch_disconnect(request: Request, out: asyncio.Queue) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            out.put_nowait((None, "disconnect"))
            return


class Choice:
    """What has come back for one sequence."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]], int]] = []  # token, lp, top, text offset
        self.finish: str | None = None
        self.stop_reason: str | int | None = None

    def add(self, ev: Event, offset0: int = 0) -> None:
        self.tokens.append(ev.token)
        if ev.logprob is not None:
            self.logprobs.append((ev.token, ev.logprob, ev.top_logprobs or [], offset0 + len(self.text)))
        self.text += ev.text
        if ev.finished:
            self.finish = FINISH.get(ev.reason, ev.reason)
            self.stop_reason = ev.stop_reason


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_logprobs(state: State, entries) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, top, off in entries:
        tokens.append(state.token_info(tid)[0])
        lps.append(finite(lp) if lp is not None else None)
        tops.append(None if top is None else {state.token_info(t)[0]: finite(v) for t, v in top})
        offsets.append(off)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(state: State, entries) -> dict:
    content = []
    for tid, lp, top, _ in entries:
        text, raw = state.token_info(tid)
        alts = []
        for t, v in top:
            at, ab = state.token_info(t)
            alts.append({"token": at, "logprob": finite(v), "bytes": ab})
        content.append({"token": text, "logprob": finite(lp), "bytes": raw, "top_logprobs": alts})
    return {"content": content, "refusal": None}


async def stream_events(state: State, out: asyncio.Queue, seqs: list[Sequence]) -> AsyncIterator:
    """A streaming request's engine events as they come: (sequence index, Event) until every sequence has
    finished. An engine failure aborts the request's sequences and ends the stream with one error chunk
    (a str, ready to send)."""
    pending = len(seqs)
    while pending:
        idx, item = await out.get()
        if isinstance(item, Event):
            if item.finished:
                pending -= 1
            yield idx, item
        elif item[0] == "error":
            state.loop.abort(seqs)
            yield _sse(error_body(500, item[1] or "internal error", "internal_error"))
            return
        else:
            pending -= 1


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, client gone, cancelled)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            with suppress(Exception):
                await self.body_iterator.aclose()


# ---- the application ---------------------------------------------------------------------------------


def create_app(opts: ServeOptions, state: State | None = None, load: bool = True):
    """The ASGI application (the FastAPI app inside the status-count, API-key and body-limit layers); its
    `.state` is the server `State`, `.fastapi` the FastAPI app."""
    state = state or State(opts)
    if not state.names:
        state.names = ["seekwen"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            threading.Thread(target=state.load, name="seekwen-load", daemon=True).start()
        yield
        if state.loop is not None:
            await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="seekwen", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API of seekwen (completions, chat completions, tokenize).")
    app.state.seekwen = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status,
                            headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(e.status_code, str(e.detail), kind), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("internal error on %s\n%s", request.url.path, traceback.format_exc())
        return JSONResponse(error_body(500, "internal server error", "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        if state.status == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state.status, **({"error": state.error} if state.error else {})},
                            status_code=503)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "seekwen",
             "root": str(state.model.path), "parent": None, "max_model_len": state.max_model_len}
            for name in state.names]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_():
        stats = state.loop.engine.stats.snapshot() if state.loop is not None else None
        waiting = state.loop.waiting if state.loop is not None else 0
        return PlainTextResponse(metrics.render(state.names[0], stats, waiting, state.http, state.status == "ready"),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.require_ready()
        state.check_model(body.model)
        tok = state.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either `prompt` or `messages`", param="prompt")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await asyncio.to_thread(tok.encode, body.prompt, special)
        else:
            check_messages(body.messages)
            check_template_kwargs(body.chat_template_kwargs)
            _, ids = await render_chat(state, body.messages, body.add_generation_prompt, body.chat_template_kwargs,
                                       bool(body.add_special_tokens))
        strs = [state.token_info(t)[0] for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.require_ready()
        state.check_model(body.model)
        state.check_ids(body.tokens, "tokens")
        text = await asyncio.to_thread(state.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        state.require_ready()
        state.check_model(body.model)
        tok = state.tokenizer
        prompts: list[list[int]] = []
        for i, p in enumerate(body.prompts()):
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "the prompt is empty" + (f" (prompt {i})" if i else ""), param="prompt")
                ids = await asyncio.to_thread(tok.encode, p)
            else:
                if not p:
                    raise APIError(400, f"prompt {i} is an empty list of token ids", param="prompt")
                state.check_ids(p, "prompt")
                ids = list(p)
            if not ids:
                raise APIError(400, "the prompt is empty after tokenization", param="prompt")
            prompts.append(ids)
        params = [sampling_params(state, body, len(p), body.logprobs) for p in prompts]
        seqs, out = make_sequences(state, prompts, params, body.n)
        echoes = [tok.decode(p, skip_special_tokens=False) if body.echo else "" for p in prompts]
        echo_lps: list[list] = [[] for _ in prompts]
        if body.echo and body.logprobs is not None:  # prompt logprobs, computed in the engine thread
            for i, p in enumerate(prompts):
                scored = await state.loop.call_model("prompt_logprobs", p, body.logprobs)
                off = 0
                for tid, lp, top in scored:
                    echo_lps[i].append((tid, lp, top, off))
                    off += len(state.token_info(tid)[0])
        submit(state, seqs)
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.names[0]
        choices = [Choice(s) for s in seqs]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                if body.echo:
                    for ch in choices:
                        p_i = ch.seq.index // body.n
                        lp = completion_logprobs(state, echo_lps[p_i]) if body.logprobs is not None else None
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [{"index": ch.seq.index, "text": echoes[p_i], "logprobs": lp,
                                                 "finish_reason": None}]})
                async for ev in stream_events(state, out, seqs):
                    if isinstance(ev, str):  # the engine failed: an error chunk ends the stream
                        yield ev
                        break
                    idx, item = ev
                    ch = choices[idx]
                    n_lp = len(ch.logprobs)
                    ch.add(item, len(echoes[idx // body.n]))
                    if item.text or item.finished or len(ch.logprobs) > n_lp:
                        lp = completion_logprobs(state, ch.logprobs[n_lp:]) if body.logprobs is not None else None
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [{"index": idx, "text": item.text, "logprobs": lp,
                                                 "finish_reason": ch.finish,
                                                 "stop_reason": ch.stop_reason if ch.finish else None}]})
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                "choices": [], "usage": usage(prompts, choices)})
                yield "data: [DONE]\n\n"

            return SSEResponse(events(), lambda: state.loop.abort(seqs))

        done = await collect(state, request, seqs, out, choices)
        if done is None:
            return Response(status_code=499)
        result = []
        for ch in choices:
            p_i = ch.seq.index // body.n
            text = echoes[p_i] + ch.text
            shift = len(echoes[p_i])
            entries = echo_lps[p_i] + [(t, v, top, off + shift) for t, v, top, off in ch.logprobs]
            lp = completion_logprobs(state, entries) if body.logprobs is not None else None
            result.append({"index": ch.seq.index, "text": text, "logprobs": lp, "finish_reason": ch.finish,
                           "stop_reason": ch.stop_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": result,
                "usage": usage(prompts, choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check()
        state.require_ready()
        state.check_model(body.model)
        prompt_text, ids = await render_chat(state, body.messages, body.add_generation_prompt,
                                             body.chat_template_kwargs, False)
        if not ids:
            raise APIError(400, "the chat prompt is empty", param="messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = [sampling_params(state, body, len(ids), k)]
        seqs, out = make_sequences(state, [ids], params, body.n)
        thinking = opens_thinking(prompt_text)
        submit(state, seqs)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.names[0]
        choices = [Choice(s) for s in seqs]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            splitters = [ReasoningSplitter(thinking) for _ in seqs]

            def chunk(idx: int, delta: dict, finish=None, lp=None, stop_reason=None) -> str:
                return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                             "choices": [{"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish,
                                          **({"stop_reason": stop_reason} if finish else {})}]})

            async def events():
                for ch in choices:
                    yield chunk(ch.seq.index, {"role": "assistant", "content": ""})
                async for ev in stream_events(state, out, seqs):
                    if isinstance(ev, str):  # the engine failed: an error chunk ends the stream
                        yield ev
                        break
                    idx, item = ev
                    ch = choices[idx]
                    n_lp = len(ch.logprobs)
                    ch.add(item)
                    r, c = splitters[idx].push(item.text)
                    if item.finished:
                        r2, c2 = splitters[idx].finish()
                        r, c = r + r2, c + c2
                    lp = chat_logprobs(state, ch.logprobs[n_lp:]) if body.logprobs and len(ch.logprobs) > n_lp \
                        else None
                    delta = {}
                    if r:
                        delta["reasoning_content"] = r
                    if c:
                        delta["content"] = c
                    if delta or lp is not None:
                        yield chunk(idx, delta, lp=lp)
                    if item.finished:
                        yield chunk(idx, {}, ch.finish, stop_reason=ch.stop_reason)
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                "choices": [], "usage": usage([ids], choices)})
                yield "data: [DONE]\n\n"

            return SSEResponse(events(), lambda: state.loop.abort(seqs))

        done = await collect(state, request, seqs, out, choices)
        if done is None:
            return Response(status_code=499)
        result = []
        for ch in choices:
            s = ReasoningSplitter(thinking)
            r1, c1 = s.push(ch.text)
            r2, c2 = s.finish()
            message = {"role": "assistant", "content": c1 + c2,
                       "reasoning_content": (r1 + r2) if s.reasoned else None}
            result.append({"index": ch.seq.index, "message": message,
                           "logprobs": chat_logprobs(state, ch.logprobs) if body.logprobs else None,
                           "finish_reason": ch.finish, "stop_reason": ch.stop_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": result,
                "usage": usage([ids], choices)}

    return _wrap(app, state, opts)


async def render_chat(state: State, messages, add_generation_prompt: bool, kwargs: dict | None,
                      add_special_tokens: bool) -> tuple[str, list[int]]:
    tok = state.tokenizer
    if not tok.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    msgs = template_messages(messages)

    def run():
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt, **(kwargs or {}))
        except Exception as e:
            raise APIError(400, f"the chat template failed on these messages: {bounded(e, 300)}",
                           param="messages") from None
        return text, tok.encode(text, add_special_tokens=add_special_tokens)

    return await asyncio.to_thread(run)


async def collect(state: State, request: Request, seqs: list[Sequence], out: asyncio.Queue,
                  choices: list[Choice]) -> bool | None:
    """Wait for every sequence of a non-streaming request; None if the client went away (all aborted)."""
    watcher = asyncio.create_task(watch_disconnect(request, out))
    try:
        pending = len(seqs)
        while pending:
            idx, item = await out.get()
            if idx is None:  # disconnected
                state.loop.abort(seqs)
                return None
            if isinstance(item, Event):
                choices[idx].add(item)
                if item.finished:
                    pending -= 1
            elif item[0] == "error":
                state.loop.abort(seqs)
                raise APIError(500, item[1] or "internal error", type="internal_error")
            else:
                pending -= 1
        return True
    finally:
        watcher.cancel()
        state.loop.abort(seqs)


def _version() -> str:
    from .. import __version__

    return __version__


def _count_status(app, state: State):
    async def counted(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_(msg):
            if msg["type"] == "http.response.start":
                state.http[msg["status"]] += 1
            await send(msg)

        return await app(scope, receive, send_)

    return counted


def _wrap(app: FastAPI, state: State, opts: ServeOptions):
    """status counting outermost (it sees the middleware's 401/413 too), then the API key, then the size limit."""
    inner = BodyLimitMiddleware(app, opts.max_body_bytes)
    outer = _count_status(APIKeyMiddleware(inner, opts.api_key), state)
    outer.state, outer.fastapi = state, app
    return outer
