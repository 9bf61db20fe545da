"""Tensor and expert parallelism on torch.distributed, launched with torchrun.

    torchrun --nproc-per-node 2 -m seekwen generate --model PATH "prompt"     # tp = 2
    model = seekwen.load(path, tp=None, ep=None)    # under torchrun: tp = world size, ep = 1

- `plan`: what each rank holds (`ParallelPlan`, the local config, the divisibility checks);
- `comm`: the process group (joined or created: gloo on CPU, NCCL on CUDA) and its collectives;
- `modules`: `ParallelTransformer` / `ParallelBlock` / `ParallelMoE`, the reference modules with
  local shapes plus one all-reduce per attention and per MLP/MoE block;
- `loading`: sharded loading (each rank reads only its slices) after the ranks agree on the checkpoint.
"""

from __future__ import annotations

import os

import torch

from ..gguf.loader import is_gguf
from ..gguf.loader import load as load_gguf
from ..hf.loader import load as load_one
from .comm import CollectiveTimeout, Comm, env_rank, env_world_size
from .loading import load_parallel
from .modules import ParallelMoE, ParallelTransformer
from .plan import ParallelError, ParallelPlan, make_plan


def load(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config_overrides: dict | None = None,
    quantize: str | None = None,
    fast: bool = True,
    tp: int | None = None,
    ep: int | None = None,
    mtp: bool = True,
):
    """`seekwen.load`: in one process, `hf.loader.load`; under torchrun (a process group, or WORLD_SIZE > 1)
    this rank's shard of the model, split `tp` ways (default: the world size) over attention heads, dense
    MLPs, shared experts and the vocabulary, and `ep` ways (default 1) over the routed experts by index.
    The other arguments are `hf.loader.load`'s (under torchrun the MTP layers are sharded as the main ones)."""
    if env_world_size() == 1:
        make_plan(1, 0, tp, ep)  # tp or ep > 1 without torchrun: says how to launch
        if is_gguf(path_or_id):  # a llama.cpp / ollama file (seekwen.gguf)
            return load_gguf(path_or_id, dtype, device, config_overrides, quantize, fast)
        return load_one(path_or_id, dtype, device, config_overrides, quantize, fast, mtp)
    if is_gguf(path_or_id):
        raise ParallelError(f"{path_or_id}: GGUF files load in one process only (not under torchrun yet)")
    return load_parallel(path_or_id, dtype, device, config_overrides, quantize, fast, tp, ep, mtp)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints."""
    return env_rank() == 0


__all__ = ["load", "load_parallel", "make_plan", "ParallelPlan", "ParallelError", "ParallelTransformer",
           "ParallelMoE", "Comm", "CollectiveTimeout", "is_main_process", "env_world_size", "env_rank"]
