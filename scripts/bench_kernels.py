"""Microbenchmark of the few-row decode kernels (seekwen/fast/kernels.py, C++ in seekwen/fast/csrc/) against the BLAS.

y[M, 896] x [896, 4864] (the dense bench model's MLP gate/up shape) for M = 1, 2, 4, 8, weights from
RAM (64 copies rotated, > L3): GB/s of weights streamed. Compared: `torch.mm(x, W)` with W stored
[in, out] (the old FastLinear), `F.linear(x, W)` with W [out, in], and the fp32 and int8 kernels
(int8: GB/s of int8 bytes) with each instruction set the CPU has (AVX2, AVX-512). Then MLA's per-head
product (`f32_bmm`, [16 heads, M, 128] x [128, 512] and [16, M, 512] x [512, 128], microseconds per call,
L2-resident weights). Run on a quiet machine: `python scripts/bench_kernels.py [--quick]`.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from seekwen.fast import kernels
from seekwen.fast import linear as L

K, N, COPIES = 896, 4864, 64


def gbps(fn, nbytes: int, copies: int = COPIES) -> tuple[float, float]:
    """Best of 5 passes over all copies: (GB/s, microseconds per call)."""
    for i in range(copies):
        fn(i)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(copies):
            fn(i)
        best = min(best, (time.perf_counter() - t) / copies)
    return nbytes / best / 1e9, best * 1e6


def main() -> None:
    k = kernels.get()
    assert k is not None, "kernels unavailable (no compiler / no AVX2)"
    quick = "--quick" in sys.argv  # kernels only, no BLAS columns
    isas = kernels.isas()
    print(f"{torch.get_num_threads()} torch threads; [M, {K}] x [{K}, {N}], weights from RAM; kernels: {isas}")
    ws = [torch.randn(N, K) for _ in range(COPIES)]
    wts = [w.t().contiguous() for w in ws] if not quick else []
    qs = [L.quantize_int8(w) for w in ws]
    for M in (1, 2, 4, 8):
        x = torch.randn(M, K)
        res = {}
        if not quick:
            res["mm [in,out]"] = gbps(lambda i, x=x: torch.mm(x, wts[i]), N * K * 4)
            res["F.linear [out,in]"] = gbps(lambda i, x=x: F.linear(x, ws[i]), N * K * 4)
        for isa in isas:
            k.set_isa(isa)
            res[f"f32_mm {isa}"] = gbps(lambda i, x=x: k.f32_mm(x, ws[i], None), N * K * 4)
        for isa in isas:
            k.set_isa(isa)
            res[f"int8_mm {isa}"] = gbps(lambda i, x=x: k.int8_mm(x, qs[i][0], qs[i][1], None), N * K)
        print(f"M={M}: " + "  ".join(f"{n} {g:.1f} GB/s ({us:.0f} us)" for n, (g, us) in res.items()))
    H = 16
    for M in (1, 8):
        line = []
        for Kb, Nb in ((128, 512), (512, 128)):
            x, w = torch.randn(H, M, Kb), torch.randn(H, Nb, Kb)
            for isa in isas:
                k.set_isa(isa)
                _, us = gbps(lambda i, x=x, w=w: k.f32_bmm(x, w), 1, copies=16)
                line.append(f"[{H}, {M}, {Kb}] x [{Kb}, {Nb}] {isa} {us:.0f} us")
        print(f"f32_bmm M={M}: " + "  ".join(line))
    k.set_isa(isas[-1])


if __name__ == "__main__":
    main()
