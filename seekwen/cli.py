"""`seekwen` command line. Each subcommand lives in its own module under seekwen/tools/ and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import sys

from .errors import UserError

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


def follower_rank() -> int:
    """Under torchrun, this process's rank when it is not rank 0 (it computes but prints nothing); else 0."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .hf.loader import CheckpointError
    from .parallel.comm import CollectiveTimeout, RankFailure

    follower = follower_rank()
    if follower:  # rank 0 prints what the one-process command prints; the others stay silent
        sys.stdout = sys.stderr = open(os.devnull, "w")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    done = False
    try:
        code = int(args.func(args) or 0)
        done = True
        return code
    except (UserError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"seekwen {args.command}: error: {e}", file=sys.stderr)  # (a follower: rank 0 says the same)
        return 2
    except (CollectiveTimeout, RankFailure) as e:  # every rank says which rank it is and what it waited for
        print(f"seekwen {args.command}: error: {e}", file=sys.__stderr__)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except BaseException:
        if follower:  # a follower's crash must not vanish with its output
            sys.stderr = sys.__stderr__
            print(f"seekwen {args.command}: rank {follower} failed:", file=sys.stderr)
        raise
    finally:
        _leave_group(sync=done)


def _leave_group(sync: bool) -> None:
    """Tear the torchrun process group down on the way out (NCCL warns about a group left behind). After a
    command that ran to its end, the ranks first meet at a barrier: a rank tearing gloo down while its peer
    still has a send in flight could abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if sync:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a peer that is gone: nothing left to wait for
            pass
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
