"""The process group: joined or created (gloo on CPU, NCCL for CUDA), and the few collectives a parallel
model runs, each turning a timeout into an error that says what happened.

Under `torchrun` every process has RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in its environment;
`ensure_group` initialises the default group from them unless the caller already did. The group's
timeout (SEEKWEN_DIST_TIMEOUT seconds, default 600) bounds every collective, so a rank that died or
took another path makes the others fail with `CollectiveTimeout` instead of hanging forever.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout."""


class RankFailure(RuntimeError):
    """A collective failed because another rank died or left (e.g. in a training step)."""


def timeout_s() -> float:
    return float(os.environ.get("SEEKWEN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def env_world_size() -> int:
    """The world size of the running job: the process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_device(device: str | torch.device) -> torch.device:
    """This rank's device: 'cuda' means cuda:LOCAL_RANK under torchrun (an explicit cuda:N stays)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def ensure_group(device: torch.device) -> None:
    """Join the default process group, creating it from torchrun's environment if needed: NCCL for CUDA
    (after selecting cuda:LOCAL_RANK), gloo on CPU; timeout from SEEKWEN_DIST_TIMEOUT."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("no process group and no torchrun environment (MASTER_ADDR): launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


class Comm:
    """The collectives of one parallel model over `group` (None: the default group)."""

    def __init__(self, group=None, timeout: float | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.timeout = timeout_s() if timeout is None else timeout

    @contextmanager
    def _guard(self, op: str):
        """Run one collective; a timeout becomes a `CollectiveTimeout` naming the rank and the operation."""
        try:
            yield
        except RuntimeError as e:
            if not _is_timeout(e):
                raise
            raise CollectiveTimeout(
                f"rank {self.rank}: {op} over {self.world} ranks did not complete within {self.timeout:g}s: "
                f"another rank died, is stuck, or runs a different plan (SEEKWEN_DIST_TIMEOUT sets the wait)"
            ) from e

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        with self._guard("all_reduce"):
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world * n], rank r's piece at [r*n, (r+1)*n)."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self._guard("all_gather"):
            dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` on every rank (in place); returns it."""
        buf = t.contiguous()
        with self._guard("broadcast"):
            dist.broadcast(buf, src=src, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        with self._guard("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        with self._guard("broadcast_object_list"):
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        with self._guard("barrier"):
            dist.barrier(group=self.group)
