"""`seekwen` command line. Each subcommand lives in its own module under seekwen/tools/ and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "generate": "seekwen.tools.generate",
    "chat": "seekwen.tools.chat",
    "train": "seekwen.tools.train",
    "bench": "seekwen.tools.bench",
    "trace": "seekwen.tools.trace",
    "memory": "seekwen.tools.memory",
    "rope": "seekwen.tools.rope_lab",
    "routes": "seekwen.tools.routes",
    "context": "seekwen.tools.context",
    "serve": "seekwen.tools.serve",
}


class UserError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="seekwen", description="Run, explain and train DeepSeek and Qwen models from Hugging Face checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"seekwen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .loader import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"seekwen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
