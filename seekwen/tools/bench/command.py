"""`seekwen bench`: inference speed on this machine, optionally against Hugging Face transformers.

Builds (once, cached under ~/.cache/seekwen/bench/) Hub-format checkpoints with random weights and
realistic shapes, or takes `--model`. For each model: prefill tokens/s and time to first token,
batch-1 decode at several prompt lengths, batched decode, a context sweep (decode speed with the
cache filled to 32..4096 tokens), peak RSS, KV-cache bytes per token (checked against the formula),
and how close decode gets to the read-bandwidth roofline (weight bytes read per step / step time)
and prefill to the measured matmul peak. `--vs-hf` runs transformers on the same checkpoint in the
same process, interleaved section by section, and prints the ratios. `--quantize int8` also prints
the perplexity change on held-out text.

Under torchrun (`torchrun --nproc-per-node 2 -m seekwen bench --model PATH`) the model is this rank's
tensor-parallel shard; every rank runs every measurement together, rank 0 prints, and each model ends
with a per-rank table: model bytes, memory after load, peak memory, tok/s.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from ...errors import UserError
from ...parallel import env_world_size
from . import report, sections
from .checkpoints import build_checkpoint
from .machine import measure_machine
from .ppl import ppl_check
from .roofline import count_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference speed (prefill, decode, batch, context), optionally vs transformers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help="checkpoint to bench instead of the built-in shapes")
    p.add_argument("--models", default="dense,moe", help="built-in shapes to bench: dense, moe (default both)")
    p.add_argument("--sections", default="prefill,decode,batch,context",
                   help="comma list of prefill, decode, batch, context, speculative, ppl (default: the first "
                        "four)")
    p.add_argument("--spec-k", type=int, default=3, help="speculative section: drafts per round")
    p.add_argument("--prompt-lens", default="32,512", help="batch-1 decode prompt lengths")
    p.add_argument("--batch-sizes", default="8,32", help="batched decode sizes (prompt 32)")
    p.add_argument("--contexts", default="32,512,2048,4096", help="context sweep: cache lengths (seekwen only)")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=24, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats per measurement (best kept)")
    p.add_argument("--vs-hf", action="store_true", help="also run transformers, same checkpoint, interleaved")
    p.add_argument("--vs-llamacpp", default=None, metavar="GGUF_OR_DIR",
                   help="seekwen and llama.cpp (LLAMA_CPP_BIN or llama-bench on PATH) on this GGUF file (llamacpp.py)")
    p.add_argument("--quantize", choices=["bf16", "f16", "q8_0", "q4_0", "int8", "int4"], default=None,
                   help="weight format (fast path; see seekwen.fast.linear.make_linear)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument("--no-fast", action="store_true", help="run seekwen's plain reference path (no prepare)")
    p.add_argument("--ppl-model", default=None, help="model for the int8 perplexity check (default: bundled)")
    p.add_argument("--ppl-text", default=None, help="text file for the perplexity check (held-out chunks)")
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench", help="where built-in checkpoints are written")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines run there)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager decode steps instead of CUDA graphs")
    p.add_argument("--compile", action="store_true", help="CUDA: torch.compile the decode step before capturing it")
    p.set_defaults(func=run)



def bench_model(args: argparse.Namespace, folder: Path, machine: tuple[float, float]) -> None:
    """One checkpoint: load it, print its summary, run the chosen sections, print peak memory."""
    print(f"\n== {folder}")
    b = sections.load(args, folder, machine)
    report.print_summary(b, count_params(b.model.cfg))
    sections.run_sections(b)
    report.print_peak_memory(b.device)
    if env_world_size() > 1:
        report.print_ranks(b)


def run(args: argparse.Namespace) -> int:
    """Probe the machine, then bench each model (built-in shapes or --model) and, with --quantize or the
    ppl section, the perplexity change."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if env_world_size() > 1 and args.vs_hf:
        raise UserError("--vs-hf under torchrun: transformers' model is not sharded; bench it in one process")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this torch build")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    bw, peak, probe = measure_machine(args.device, getattr(torch, args.dtype))
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"machine: {where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"  {probe}")
    if args.vs_llamacpp:
        from .llamacpp import run_vs_llamacpp

        return run_vs_llamacpp(args, bw)
    chosen = args.sections.split(",")
    if args.model:
        from ...gguf import gguf_file, is_gguf
        from ...hf.loader import resolve
        from ..common import model_path

        path = model_path(args.model)
        folders = [gguf_file(path) if is_gguf(path) else resolve(path)]
    else:
        folders = [build_checkpoint(name, args.cache_dir) for name in args.models.split(",") if name]
    if chosen != ["ppl"]:
        for folder in folders:
            bench_model(args, folder, (bw, peak))
    if args.quantize or "ppl" in chosen:
        ppl_check(args)
    return 0
