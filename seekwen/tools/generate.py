"""`seekwen generate [PROMPT]`: stream a continuation of a prompt to the terminal."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

import torch

from ..errors import UserError
from .common import add_model_arg, add_parallel_args, add_quantize_arg, add_runtime_args, load_model, parallel_kwargs

DEFAULT_PROMPT = "In the beginning"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def check_sampling_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # also rejects nan
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come",
                       description="Continue a prompt with a model (default: the bundled seekwen-kjv-v3).")
    p.add_argument("prompt", nargs="?", default=None, help=f"text to continue (default: {DEFAULT_PROMPT!r})")
    add_model_arg(p)
    add_runtime_args(p)
    add_quantize_arg(p)
    add_parallel_args(p)
    add_sampling_args(p, max_new_tokens=200, temperature=0.8)
    add_speculative_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no speed report on stderr")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the implementation plan (which kernels and paths run) on stderr first, "
                        "and the speculation acceptance metrics last")
    p.set_defaults(func=run)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    from ..runtime.speculative import PROPOSERS

    p.add_argument("--speculative", choices=PROPOSERS, default=None,
                   help="speculative decoding: mtp (DeepSeek-V3's multi-token-prediction layer), ngram "
                        "(prompt lookup) or draft (a smaller model, --draft-model); output as without it")
    p.add_argument("--draft-model", default=None, help="draft checkpoint for --speculative draft (same tokenizer)")
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=3, help="drafts per round (>= 1)")


def load_draft(args: argparse.Namespace, model):
    """The draft model of --speculative draft, or None; errors in one line."""
    if args.speculative != "draft":
        if args.draft_model is not None:
            raise UserError("--draft-model is only used with --speculative draft")
        return None
    if args.draft_model is None:
        raise UserError("--speculative draft needs --draft-model PATH")
    if args.num_speculative_tokens < 1:
        raise UserError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    return load_model(args.draft_model, args.dtype, args.device, quantize=args.quantize, fast=not args.plain)


def context_limit(model) -> int:
    return int(model.cfg.max_position_embeddings)


class Streamer:
    """`on_token` callback: decodes tokens as they arrive, passes text pieces to `write`, keeps timings.
    Stops writing at the first EOS. With `clean`, control characters other than newline and tab are
    dropped (a model must not drive the terminal with escape sequences)."""

    def __init__(self, tokenizer, write: Callable[[str], None], eos_ids: list[int] | None = None,
                 clean: bool = False):
        from ..hf.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.write = write
        self.clean = clean
        self.eos = set(eos_ids or [])
        self.n = 0
        self.t_first: float | None = None
        self.text = ""
        self.finished = False

    def __call__(self, tok: torch.Tensor) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.finished:
            return
        token = int(tok[0])
        self.n += 1
        if token in self.eos:
            self.finished = True
            return
        piece = self.decoder.push(token)
        if self.clean:
            piece = CONTROL.sub("", piece)
        if piece:
            self.text += piece
            self.write(piece)


def check_fits(model, ids: list[int]) -> None:
    limit = context_limit(model)
    if len(ids) >= limit:
        raise UserError(f"the prompt is {len(ids)} tokens; this model's context is {limit} tokens")


def eos_ids(model) -> list[int]:
    tok_eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    return model.cfg.eos_ids + ([tok_eos] if tok_eos is not None else [])


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generation(model, ids: list[int], args: argparse.Namespace, streamer: Streamer) -> tuple[float, float]:
    """Generate after `ids`, streaming; returns (prefill seconds, decode seconds)."""
    check_fits(model, ids)
    max_new = min(args.max_new_tokens, context_limit(model) - len(ids))
    spec = {}
    if getattr(args, "speculative", None):
        spec = dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                    draft_model=getattr(args, "draft", None), speculative_stats=getattr(args, "spec_stats", None))
    t0 = time.perf_counter()
    model.generate(torch.tensor([ids]), max_new_tokens=max_new, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, on_token=streamer, **spec)
    t1 = time.perf_counter()
    first = streamer.t_first or t1
    return first - t0, t1 - first


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = load_model(args.model, args.dtype, args.device, quantize=args.quantize, fast=not args.plain,
                       **parallel_kwargs(args))
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"{model.path}: no tokenizer.json in the checkpoint")
    if args.speculative is not None and args.num_speculative_tokens < 1:
        raise UserError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if args.speculative == "mtp" and len(model.mtp) == 0:
        raise UserError(f"{model.path}: --speculative mtp needs a multi-token-prediction layer "
                        "(config num_nextn_predict_layers); try --speculative ngram")
    args.draft = load_draft(args, model)
    if args.speculative is not None:
        from ..runtime.speculative import SpecStats

        args.spec_stats = SpecStats()
    if args.verbose:
        print_plan(model)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty")
    check_fits(model, ids)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    streamer = Streamer(tok, write_out, eos_ids(model), clean=sys.stdout.isatty())
    prefill_s, decode_s = run_generation(model, ids, args, streamer)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        report_speed(len(ids), prefill_s, streamer.n, decode_s)
    if args.verbose and args.speculative is not None:
        print(args.spec_stats.format(), file=sys.stderr)
    return 0


def report_speed(n_prompt: int, prefill_s: float, n_new: int, decode_s: float) -> None:
    decode_rate = (n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else float("nan")
    print(f"prompt: {n_prompt} tokens in {prefill_s:.2f}s ({n_prompt / max(prefill_s, 1e-9):.1f} tokens/s); "
          f"generated: {n_new} tokens, decode {decode_rate:.1f} tokens/s", file=sys.stderr)


def print_plan(model) -> None:
    """The implementation plan (fast.plan + the runtime's rows), on stderr: what runs where."""
    from ..fast import format_plan
    from ..runtime.decoder import runtime_plan

    rows = runtime_plan(model)
    if hasattr(model, "describe_parallel"):  # a rank's shard (seekwen.parallel)
        rows.insert(0, ("parallel", model.describe_parallel()))
    print("implementation plan:", file=sys.stderr)
    print(format_plan(model, rows), file=sys.stderr)
