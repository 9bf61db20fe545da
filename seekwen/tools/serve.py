"""`seekwen serve [MODEL]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn; the `serve` extra).

    torchrun --standalone --nproc-per-node 2 -m seekwen serve MODEL --port 8000

serves a tensor-parallel model: rank 0 answers HTTP, the other ranks follow its engine step by step
(`server.loop.follow`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import UserError
from .common import BUNDLED_NAME, add_model_arg, add_quantize_arg, add_runtime_args
from .generate import add_speculative_args

DESCRIPTION = """\
Serve a model over HTTP with OpenAI's API (default: the bundled seekwen-kjv-v3), for the official
clients and any tool that speaks it. Endpoints: GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (streaming with server-sent events), POST /tokenize and /detokenize (vLLM's
shapes), GET /health (503 while the model loads, 200 when ready), GET /metrics (Prometheus),
/openapi.json and /docs. Requests are batched continuously (they join and leave the running batch
between decode steps); a client that disconnects frees its sequence at once; beyond --max-queue
waiting sequences the server answers 503. SIGTERM stops accepting connections, lets running requests
finish for --shutdown-timeout seconds, then exits with status 0.
"""

EPILOG = """\
example:
  seekwen serve --port 8000 &
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "In the beginning", "max_tokens": 16, "temperature": 0}'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, positional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize (default: none)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) requests may use; the first is reported (default: MODEL as given, or "
                        f"{BUNDLED_NAME})")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default: 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length: prompt + completion tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting for a batch slot at most; beyond it requests get 503 (default: 256)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="request body limit in bytes; larger bodies get 413 (default: 8 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM (default: 30)")
    p.add_argument("--seed", type=int, default=None, help="seed of the engine's generator for unseeded requests")
    p.add_argument("--engine", choices=["paged", "rows"], default=None,
                   help="paged: the block-paged engine (prefix caching, chunked prefill, preemption; /metrics "
                        "adds the prefix-cache hit rate); rows: the row pool (max-batch rows of max-model-len "
                        "slots; the one that runs --speculative draft / mtp). Default: paged, rows with "
                        "--speculative draft or mtp")
    p.add_argument("--paged", dest="engine", action="store_const", const="paged", help="= --engine paged")
    p.add_argument("--block-size", type=int, default=16, help="paged: tokens per KV block (default: 16)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="paged: KV blocks per cache group (default: the row pool's memory, max-batch x "
                        "max-model-len tokens)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="paged: tokens computed per step at most, decode rows first, then prefill chunks "
                        "(default: 512; smaller keeps running streams smoother while a long prompt joins, "
                        "larger gets the joining prompt its first token sooner)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="paged: do not reuse the KV blocks of a cached prompt prefix")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: OMP_NUM_THREADS if set, else one less than the cores, "
                        "so that the HTTP side keeps one)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level (default: info)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    add_runtime_args(p)
    add_quantize_arg(p)
    add_speculative_args(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    positive = ("max_batch", "max_queue", "max_body_bytes", "block_size", "max_num_batched_tokens")
    for name in positive + (("num_blocks",) if args.num_blocks is not None else ()):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if not args.shutdown_timeout >= 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")
    if args.engine is None:
        args.engine = "rows" if args.speculative in ("draft", "mtp") else "paged"
    if args.speculative not in (None, "ngram") and args.engine == "paged":
        raise UserError(f"--paged speculates with ngram only; --speculative {args.speculative} runs on the "
                        "row-pool engine (--engine rows)")
    if args.speculative == "draft" and args.draft_model is None:
        raise UserError("--speculative draft needs --draft-model PATH")
    if args.draft_model is not None and args.speculative != "draft":
        raise UserError("--draft-model is only used with --speculative draft")
    if args.num_speculative_tokens < 1:
        raise UserError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from ..parallel import env_rank, env_world_size

    if env_world_size() > 1 and env_rank() != 0:
        return follow(args)
    try:
        import uvicorn

        from ..server.app import ServeOptions, create_app
    except ImportError as e:
        raise UserError(f"seekwen serve needs the 'serve' extra (pip install 'seekwen[serve]'): {e}") from None
    if args.model is not None and args.model.startswith((".", "/", "~")):
        from pathlib import Path

        if not Path(args.model).expanduser().exists():
            raise UserError(f"{args.model}: no such checkpoint folder")
    names = args.served_model_name or [args.model if args.model is not None else BUNDLED_NAME]
    opts = ServeOptions(model=args.model, served_model_names=names, api_key=args.api_key, max_batch=args.max_batch,
                        max_model_len=args.max_model_len, max_queue=args.max_queue,
                        max_body_bytes=args.max_body_bytes, dtype=args.dtype, device=args.device,
                        quantize=args.quantize, plain=args.plain, seed=args.seed,
                        speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                        draft_model=args.draft_model, engine=engine_kwargs(args))
    _set_threads(args.threads)
    app = create_app(opts)
    state = app.state
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on", server_header=False)
    server = Server(config)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.status == "failed":
        raise UserError(state.error)
    if not server.started:
        return 1  # could not bind (uvicorn logged why)
    return 0


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `Engine` arguments the engine flags choose (the paged engine's cache and budget)."""
    if args.engine != "paged":
        return {}
    return dict(paged=True, block_size=args.block_size, num_blocks=args.num_blocks,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching)


def _set_threads(threads: int | None) -> None:
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def follow(args: argparse.Namespace) -> int:
    """A rank other than 0 under torchrun: load this rank's shard, build the engine rank 0 builds (same
    batch, context, seed and runtime) and run it in step with rank 0's until rank 0 stops serving. SIGTERM
    (torchrun forwards it to every rank) is left to rank 0: it drains its requests, then says stop."""
    from ..parallel import env_rank
    from ..runtime.engine import Engine
    from ..runtime.load import load_model
    from ..server.loop import follow as follow_engine

    _set_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: None)
    model = load_model(args.model, args.dtype, args.device, quantize=args.quantize, fast=not args.plain)
    max_len = args.max_model_len or int(model.cfg.max_position_embeddings)
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, seed=args.seed, **engine_kwargs(args))
    follow_engine(engine)
    # (the CLI silences a follower's stdout and stderr; this line says it ended cleanly)
    print(f"seekwen serve: rank {env_rank()}: rank 0 stopped serving; exiting", file=sys.__stderr__, flush=True)
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of the signal;
        here a SIGTERM ends the server normally (exit status 0). SIGINT still ends with KeyboardInterrupt."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    return Server


def Server(config):  # noqa: N802 - a factory so that importing this module does not import uvicorn
    return _server_class()(config)
