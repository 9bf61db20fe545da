"""What `seekwen bench` prints: one line per measurement with the same-run ratio to transformers, and the
per-model summary (size, KV cache against the formula, roofline inputs, memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...fast import format_plan
from ...runtime.decoder import Decoder, runtime_plan
from .machine import peak_rss_gb

if TYPE_CHECKING:
    from .sections import Bench


def ratio(res: dict[str, float], higher_better: bool = True) -> str:
    """"  (1.23x transformers)": seekwen's figure over transformers' (inverted for times), or "" without
    both."""
    if "transformers" not in res or "seekwen" not in res:
        return ""
    a, b = res["seekwen"], res["transformers"]
    return f"  ({a / b if higher_better else b / a:.2f}x transformers)"


def line(label: str, res: dict[str, float], unit: str, extra: str = "", higher_better: bool = True) -> None:
    """Print one measurement: each runner's figure, the ratio, then `extra` (e.g. a roofline fraction)."""
    vals = "   ".join(f"{k} {v:8.2f} {unit}" for k, v in res.items())
    # times (lower is better) are still reported as a speed ratio: transformers' time / seekwen's
    ratio_ = ratio(res, higher_better).replace("x transformers", "x transformers' speed") if not higher_better \
        else ratio(res)
    print(f"  {label:<36} {vals}{ratio_}{extra}")


def mode(b: Bench) -> str:
    """How seekwen runs this model: fast or plain path, weights, and on CUDA whether decode is graphed."""
    args = b.args
    text = "plain reference path" if args.no_fast else f"fast path, {args.quantize or args.dtype} weights"
    if b.device.type == "cuda":
        if b.graphs:
            text += ", torch.compile + CUDA graphs" if args.compile else ", CUDA graphs"
        else:
            text += f", eager decode ({'--no-graphs' if args.no_graphs else b.blocker})"
    return text


def print_summary(b: Bench, n_params: int) -> None:
    """The model's size and run mode, its real KV-cache bytes per token checked against the formula, the
    bytes a decode step reads (-> the roofline), and the memory seekwen's model took."""
    args, cfg, size, bw = b.args, b.model.cfg, b.dtype_bytes, b.bw
    kv, formula = Decoder(b.model, 1, 8, graphs=False).bytes_per_token(), cfg.kv_bytes_per_token(size)
    print(f"  {cfg.model_type}: {n_params / 1e6:.0f}M parameters, seekwen {mode(b)}, on {b.device}")
    print("  implementation plan:")
    print(format_plan(b.model, runtime_plan(b.model, graphs=b.graphs), indent=4))
    what = "MLA (kv_lora_rank + qk_rope) x layers" if cfg.mla else "2 x kv_heads x head_dim x layers"
    check = "  OK" if kv == formula else "  MISMATCH"
    print(f"  KV cache: {kv} bytes/token (formula {formula}: {what} x {size}){check}")
    print(f"  weights read per batch-1 decode step: seekwen {b.step_bytes / 1e9:.3f} GB"
          f" -> roofline {bw * 1e9 / b.step_bytes:.1f} tok/s; {args.dtype} {b.hf_bytes / 1e9:.3f} GB"
          f" -> {bw * 1e9 / b.hf_bytes:.1f}")
    where = "GPU memory allocated" if b.device.type == "cuda" else "RSS"
    print(f"  {where} by seekwen's model after load{'' if args.no_fast else ' + prepare'}: {b.mem_ours:.2f} GB")


def print_peak_memory(device: torch.device) -> None:
    """Peak memory after a model's sections: GPU (on CUDA) and the process's RSS."""
    if device.type == "cuda":
        print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print(f"  peak RSS of the process: {peak_rss_gb():.2f} GB")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, each storage once): under torchrun,
    this rank's shard."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def print_ranks(b: Bench) -> None:
    """Under torchrun: every rank's model bytes, memory and tok/s, gathered to rank 0 and printed as one
    table (the ranks run each measurement together, so their tok/s agree up to timer noise)."""
    from ...parallel import Comm

    comm = Comm()
    peak = torch.cuda.max_memory_allocated() / 1e9 if b.device.type == "cuda" else peak_rss_gb()
    mine = {"bytes": model_bytes(b.model), "load": b.mem_ours, "peak": peak, **b.results}
    rows = comm.all_gather_object(mine)
    plan = getattr(b.model, "parallel", None)
    where = "GPU allocated" if b.device.type == "cuda" else "RSS"
    print(f"  per rank ({plan.describe().split(',')[0] if plan else ''}, {comm.backend}; {where}):")
    names = list(b.results)
    print("    " + f"{'rank':<5} {'model MB':>9} {'load GB':>8} {'peak GB':>8}" + "".join(f" {n:>16}" for n in names))
    for r, row in enumerate(rows):
        cells = "".join(f" {row.get(n, float('nan')):>12.2f} tok/s" for n in names)
        print(f"    {r:<5} {row['bytes'] / 1e6:>9.2f} {row['load']:>8.2f} {row['peak']:>8.2f}{cells}")
