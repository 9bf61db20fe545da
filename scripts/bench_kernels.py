"""Microbenchmark of the few-row decode kernels (seekwen/model/kernels.py) against the BLAS.

y[M, 896] x [896, 4864] (the dense bench model's MLP gate/up shape) for M = 1, 2, 4, 8, weights from
RAM (64 copies rotated, > L3): GB/s of weights streamed. Compared: `torch.mm(x, W)` with W stored
[in, out] (the old FastLinear), `F.linear(x, W)` with W [out, in], the fp32 kernel on W [out, in], and
the int8 kernel (GB/s of int8 bytes). Run on a quiet machine: `python scripts/bench_kernels.py`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from seekwen.model import kernels
from seekwen.model import linear as L

K, N, COPIES = 896, 4864, 64


def gbps(fn, nbytes: int) -> tuple[float, float]:
    """Best of 5 passes over all copies: (GB/s, microseconds per call)."""
    for i in range(COPIES):
        fn(i)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(COPIES):
            fn(i)
        best = min(best, (time.perf_counter() - t) / COPIES)
    return nbytes / best / 1e9, best * 1e6


def main() -> None:
    k = kernels.get()
    assert k is not None, "kernels unavailable (no compiler / no AVX2)"
    print(f"{torch.get_num_threads()} torch threads; [M, {K}] x [{K}, {N}], weights from RAM")
    ws = [torch.randn(N, K) for _ in range(COPIES)]
    wts = [w.t().contiguous() for w in ws]
    qs = [L.quantize_int8(w) for w in ws]
    for M in (1, 2, 4, 8):
        x = torch.randn(M, K)
        res = {
            "mm [in,out]": gbps(lambda i, x=x: torch.mm(x, wts[i]), N * K * 4),
            "F.linear [out,in]": gbps(lambda i, x=x: F.linear(x, ws[i]), N * K * 4),
            "f32_mm": gbps(lambda i, x=x: k.f32_mm(x, ws[i], None), N * K * 4),
            "int8_mm": gbps(lambda i, x=x: k.int8_mm(x, qs[i][0], qs[i][1], None), N * K),
        }
        print(f"M={M}: " + "  ".join(f"{n} {g:.1f} GB/s ({us:.0f} us)" for n, (g, us) in res.items()))


if __name__ == "__main__":
    main()
