"""Helpers shared by the command-line tools."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..runtime.load import BUNDLED_NAME, bundled_model_path, load_model, model_path, pick_device  # noqa: F401


def add_model_arg(p: argparse.ArgumentParser, positional: bool = False, default_bundled: bool = True) -> None:
    help_ = "checkpoint folder, Hugging Face cache folder or hub id"
    if default_bundled:
        help_ += f" (default: the bundled {BUNDLED_NAME})"
    if positional:
        p.add_argument("model", nargs="?" if default_bundled else None, default=None, help=help_)
    else:
        p.add_argument("--model", "-m", default=None, help=help_)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight/activation dtype (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tp/--tensor-parallel-size, --ep, --enable-expert-parallel (vLLM's flags): how a torchrun job
    splits the model. Without torchrun they must stay 1."""
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=None, metavar="N",
                   help="ranks splitting heads, dense MLPs, shared experts and the vocabulary "
                        "(default under torchrun: all of them)")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="ranks splitting the routed experts by index (default 1: each expert's "
                        "intermediate dimension is split over the tp ranks instead)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="split the routed experts by index over all ranks (= --ep WORLD_SIZE)")


def parallel_kwargs(args: argparse.Namespace) -> dict:
    """tp= and ep= for seekwen.load from the flags of `add_parallel_args` (absent flags: defaults)."""
    from ..parallel import env_world_size

    tp, ep = getattr(args, "tp", None), getattr(args, "ep", None)
    if getattr(args, "enable_expert_parallel", False):
        world = env_world_size()
        if ep not in (None, world):
            raise UserError(f"--enable-expert-parallel means --ep {world}; got --ep {ep}")
        ep = world
    return {"tp": tp, "ep": ep}


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """--quantize and --plain: inference commands run the fast path (fused, re-laid-out, optionally
    quantized layers; tested equal to the plain modules) unless --plain asks for the reference modules."""
    p.add_argument("--quantize", default=None, choices=["bf16", "f16", "q8_0", "q4_0", "int8", "int4"],
                   help="weight format of linear layers and experts at load time (fast path): bf16 / f16 weights, "
                        "GGUF's q8_0 / q4_0 blocks of 32, or per-channel int8 / group-64 int4; activations fp32")
    p.add_argument("--plain", action="store_true",
                   help="run the plain reference modules instead of the inference fast path")
