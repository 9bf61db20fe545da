"""Data-parallel training under torchrun: DistributedDataParallel, or FSDP2 (`fully_shard`) with `--fsdp`.

    torchrun --standalone --nproc-per-node 2 -m seekwen train TEXT --out RUN [--fsdp]

- `--batch-size` is the **global** batch: every rank draws the same global batch from the same seeded
  order and trains on its own contiguous rows (batch_size / world each), as nanoGPT keeps the tokens per
  optimizer step fixed when it is launched on more GPUs. So the learning rate, the schedule and the
  tokens per step do not depend on the number of ranks, a run resumes on any number of them, and N
  ranks train the same model as one process (up to the order of floating-point sums).
- Every rank starts from the same seed and the same initialisation (DDP also broadcasts rank 0's
  weights); the gradients are averaged over the ranks (each rank's loss is the mean over its equal
  share, so the average is the global batch's mean).
- The expert counts behind DeepSeek-V3's auxiliary-loss-free bias update are summed over the ranks
  before the update, so every rank moves its (replicated, never sharded) router biases by the same step
  as one process would on the whole batch. The sequence-wise balance loss is per sequence: unchanged.
- Only rank 0 logs, prints and writes files; validation is split over the ranks and its sums added.
- FSDP2 shards every decoder block (the MTP blocks included) and the rest (embedding, head, norms) as
  one group; the router biases are `ignored_params` (plain tensors on every rank). Checkpoints gather
  the full tensors (a collective on every rank) and rank 0 writes them: the files are the same as a
  one-process run's, so `--resume` works with or without `--fsdp` and with any number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.comm import CollectiveTimeout, Comm, RankFailure, ensure_group, env_world_size, local_device


class Single:
    """One process: no collectives (the plain `seekwen train`)."""

    world, rank, is_main, fsdp = 1, 0, True, False

    def wrap(self, net: nn.Module, model: nn.Module) -> nn.Module:
        return net

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj):
        return obj

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shard_like(self, full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return full.to(p.device)

    def barrier(self) -> None:
        pass

    def failure(self, e: RuntimeError, step: int) -> RuntimeError:
        return e


class DataParallel(Single):
    """The ranks of a torchrun job training one model: DDP, or FSDP2 with `fsdp`."""

    def __init__(self, device: torch.device, fsdp: bool):
        ensure_group(device)
        self.comm = Comm()
        self.world, self.rank = self.comm.world, self.comm.rank
        self.is_main = self.rank == 0
        self.fsdp = fsdp
        self.device = device

    def wrap(self, net: nn.Module, model: nn.Module) -> nn.Module:
        """`net` (the training forward of `model`) made data-parallel: DDP around it, or FSDP2 in place
        (every decoder block a group, then the rest), the router biases left out of both."""
        from ..model.moe import Gate

        biases = {m.bias for m in model.modules() if isinstance(m, Gate) and m.bias is not None}
        if not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the buffers (rotary tables) are computed, the same on every rank: no sync before each forward
            return nn.parallel.DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))  # the training device's, not the default
        for block in model.blocks():
            fully_shard(block, mesh=mesh, ignored_params=biases or None)
        fully_shard(net, mesh=mesh, ignored_params=biases or None)
        return net

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (in place, on the group's device)."""
        buf = t.to(self.device)
        self.comm.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_object(self, obj):
        return self.comm.broadcast_object(obj)

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a sharded (FSDP2) parameter or optimizer state, on every rank; a plain
        tensor as it is."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    def shard_like(self, full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """`full` (e.g. a saved AdamW moment) split as parameter `p` is (FSDP2), or as it is."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(p, DTensor):
            return distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
        return full.to(p.device)

    def barrier(self) -> None:
        self.comm.barrier()

    def failure(self, e: RuntimeError, step: int) -> RuntimeError:
        """A collective's error as a `RankFailure` naming this rank and the step; other errors unchanged."""
        if not (isinstance(e, (dist.DistError, CollectiveTimeout)) or _is_collective_error(e)):
            return e
        return RankFailure(f"rank {self.rank}: training step {step + 1}: a collective over {self.world} ranks "
                           f"failed ({str(e).splitlines()[0]}): another rank has died or left (its own error "
                           f"is above); every rank stops")


def _is_collective_error(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def data_parallel(device: str, fsdp: bool) -> tuple[Single, str]:
    """This process's place in the job and its device: `Single` without torchrun (then `fsdp` is an
    error), else `DataParallel` on cuda:LOCAL_RANK or the CPU."""
    if env_world_size() == 1:
        if fsdp:
            raise ValueError("--fsdp shards the model over the ranks of a torchrun job: launch with "
                             "torchrun --nproc-per-node N (N >= 2) -m seekwen train ...")
        return Single(), device
    dev = local_device(device)
    return DataParallel(dev, fsdp), str(dev)


def local_rows(batch_size: int, dp: Single) -> slice:
    """This rank's rows of a global batch of `batch_size`."""
    if batch_size % dp.world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {dp.world} ranks (--batch-size is "
                         f"the global batch, split evenly over the ranks)")
    n = batch_size // dp.world
    return slice(dp.rank * n, (dp.rank + 1) * n)
