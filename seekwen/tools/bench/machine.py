"""This machine's limits for the roofline (read bandwidth, matmul peak), timing and memory probes."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def median_time(fn, n: int) -> float:
    """Median seconds of `n` calls of `fn` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so a timer read afterwards includes it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_machine(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float, str]:
    """(read bandwidth GB/s: sum over 1 GiB; matmul GFLOP/s in `dtype`: 2048^3 on CPU, 8192^3 on CUDA;
    a label saying so)."""
    x = torch.ones(256 * 1024 * 1024, device=device)

    def timed(fn):
        def run():
            fn()
            sync(device)
        return median_time(run, 5)

    bw = x.numel() * 4 / timed(x.sum) / 1e9
    del x
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timed(lambda: torch.mm(a, b)) / 1e9
    name = str(dtype).removeprefix("torch.")
    return bw, flops, f"read bandwidth {bw:.1f} GB/s (sum over 1 GiB), {name} matmul {flops:.0f} GFLOP/s ({n}^3)"


def rss_gb() -> float:
    """The process's resident memory now, GB (0 where /proc is missing)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return 0.0


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def mem_gb(device: torch.device) -> float:
    """Memory in use: the process's RSS on CPU, PyTorch's allocated GPU memory on CUDA."""
    return torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else rss_gb()

