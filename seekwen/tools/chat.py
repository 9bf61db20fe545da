"""`seekwen chat`: a terminal conversation through the model's chat template.

Replies stream as they are generated. A DeepSeek-R1-style `<think>...</think>` part is shown apart
(dimmed on a terminal, lines prefixed "think> " otherwise) and is not kept in the history. Ctrl-C
aborts the current reply; Ctrl-D (end of input) leaves. Reads a pipe as well as a terminal:
every input line is one user turn. Commands: /reset clears the conversation, /exit leaves.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .common import add_model_arg, add_parallel_args, add_quantize_arg, add_runtime_args, load_model, parallel_kwargs
from .generate import Streamer, add_sampling_args, check_sampling_args, context_limit, eos_ids

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (its chat template, streamed)",
                       description="Chat with a model (default: the bundled seekwen-kjv-v3, which only "
                                   "continues King James text). Ctrl-C stops a reply, Ctrl-D leaves.")
    add_model_arg(p)
    add_runtime_args(p)
    add_quantize_arg(p)
    add_parallel_args(p)
    add_sampling_args(p, max_new_tokens=128, temperature=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run)


class ThinkSplitter:
    """Routes streamed text to the answer or to the reasoning part, finding the tags across pieces."""

    def __init__(self, write, tty: bool, thinking: bool = False):
        self.write, self.tty = write, tty
        self.thinking = thinking
        self.pending = ""  # text that may be the start of a tag
        self.answer = ""
        self.at_line_start = True
        if thinking:
            self._enter_think()

    def _enter_think(self) -> None:
        self.write(DIM if self.tty else "")
        self.at_line_start = True

    def _leave_think(self) -> None:
        self.write(RESET + "\n" if self.tty else "\n")

    def _emit(self, text: str) -> None:
        if not text:
            return
        if not self.thinking:
            if not self.answer:
                text = text.lstrip()  # the reply starts at its first visible character
            self.answer += text
            if text:
                self.write(text)
            return
        if self.tty:
            self.write(text)
            return
        for ch in text:  # prefix every reasoning line so a pipe reader can tell them apart
            if self.at_line_start:
                self.write("think> ")
            self.write(ch)
            self.at_line_start = ch == "\n"

    def push(self, piece: str) -> None:
        text = self.pending + piece
        self.pending = ""
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = text.find(tag)
            if i >= 0:
                self._emit(text[:i])
                text = text[i + len(tag):]
                if self.thinking:
                    self.thinking = False
                    self._leave_think()
                    text = text.lstrip("\n")
                else:
                    self.thinking = True
                    self._enter_think()
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
            self._emit(text[: len(text) - keep])
            self.pending = text[len(text) - keep:]
            break

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = ""
        if self.thinking and self.tty:
            self.write(RESET)


def read_turn(tty: bool) -> str | None:
    """One line of user input; None at end of input."""
    if tty:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def shared_turn(model, tty: bool) -> str | None:
    """The next user turn. Under torchrun rank 0 reads it and sends it to the other ranks, which follow
    (every rank then generates the reply together; only rank 0 prints)."""
    comm = getattr(model, "comm", None)
    if comm is None or comm.world == 1:
        return read_turn(tty)
    return comm.broadcast_object(read_turn(tty) if comm.rank == 0 else None, src=0)


def fit_history(tok, messages: list[dict], room: int) -> list[int]:
    """Encode the conversation, dropping the oldest turns until it leaves `room` tokens free."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        ids = tok.encode_chat(system + turns, add_generation_prompt=True)
        if ids and len(ids) <= room:
            return ids
        if len(turns) <= 1:
            raise UserError(f"the message is too long for this model's context ({len(ids)} tokens)")
        turns = turns[2:] if len(turns) > 2 else turns[1:]
        messages[:] = system + turns  # forget them for good


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def reply(model, messages: list[dict], args: argparse.Namespace, tty: bool) -> str:
    """Stream one assistant reply; returns the answer (without the reasoning part)."""
    tok = model.tokenizer
    limit = context_limit(model)
    room = max(limit - min(args.max_new_tokens, limit // 2), 1)
    ids = fit_history(tok, messages, room)
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True)
    splitter = ThinkSplitter(write_out, tty, thinking=prompt_text.rstrip().endswith(THINK_OPEN))
    streamer = Streamer(tok, splitter.push, eos_ids(model), clean=tty)
    import torch

    try:
        model.generate(torch.tensor([ids]), max_new_tokens=min(args.max_new_tokens, limit - len(ids)),
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                       on_token=streamer)
    finally:
        splitter.close()
        write_out("\n")
    return splitter.answer.strip()


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    model = load_model(args.model, args.dtype, args.device, quantize=args.quantize, fast=not args.plain,
                       **parallel_kwargs(args))
    tok = model.tokenizer
    if tok is None or not tok.chat_template:
        raise UserError(f"{model.path}: the checkpoint has no tokenizer with a chat template")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if tty:
        print(f"seekwen chat: {model.path.name} (Ctrl-C stops a reply, Ctrl-D leaves, /reset starts over)")
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = shared_turn(model, tty)
        except KeyboardInterrupt:
            write_out("\n")
            continue
        if text is None or text.strip() in ("/exit", "/quit"):
            if tty:
                write_out("\n")
            return 0
        if not text.strip():
            continue
        if text.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(model, messages, args, tty)
        except KeyboardInterrupt:
            write_out("[reply interrupted]\n")
            messages.pop()
            continue
        except UserError as e:
            print(f"seekwen chat: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})
