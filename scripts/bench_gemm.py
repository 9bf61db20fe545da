"""Microbenchmark of the fp32 prefill GEMM (`kernels.f32_gemm`, seekwen/fast/csrc/gemm.h) against the
BLAS torch ships (`F.linear`: MKL sgemm on x86), on Qwen2.5-0.5B's matrix shapes (out x in: fused qkv
1152x896, o 896x896, fused gate/up 9728x896, down 896x4864), y[M, out] = x[M, in] . W^T.

For each thread count, shape and row count M the two run alternately, `--repeats` rounds of a few calls
each (so both see the same minutes of a shared, noisy host); GFLOP/s (2 M N K / s) as the median and range
over the rounds, and the ratio of the medians; also by CPU time ("cpu": this process's CPU seconds / threads,
the figure a host with its cores to itself would approach). `--isa avx2` forces the AVX2 code; `--rows 17,24` etc. to
look at the threshold against the few-row kernel (`--few` adds `kernels.f32_mm` as a third column).

    python scripts/bench_gemm.py [--threads 1,2] [--rows 32,64,128,512] [--shapes qkv,o,gate_up,down]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seekwen.fast import kernels

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)}


def gflops(fn, flops: float, calls: int, threads: int) -> tuple[float, float]:
    """(GFLOP/s by wall time, by this process's CPU time / threads: what the cores would give undisturbed,
    less the time OpenMP threads spin at joins)."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    wall, cpu = time.perf_counter() - t, (time.process_time() - c) / threads
    return flops * calls / wall / 1e9, flops * calls / cpu / 1e9


def fmt(xs: list[tuple[float, float]]) -> str:
    wall, cpu = [w for w, _ in xs], [c for _, c in xs]
    return f"{statistics.median(wall):5.1f} ({min(wall):.0f}-{max(wall):.0f}) cpu {statistics.median(cpu):5.1f}"


def ratio(r: dict[str, list[tuple[float, float]]], i: int) -> float:
    return statistics.median(v[i] for v in r["gemm"]) / statistics.median(v[i] for v in r["blas"])


def bench(M: int, N: int, K: int, repeats: int, few: bool, threads: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) GFLOP/s per implementation over `repeats` alternating rounds."""
    k = kernels.get()
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    flops = 2.0 * M * N * K
    calls = max(1, int(2e9 / flops))  # ~20 ms of work per round and implementation at ~100 GFLOP/s
    impls = {"blas": lambda: F.linear(x, w), "gemm": lambda: k.f32_gemm(x, w, None)}
    if few:
        impls["f32_mm"] = lambda: k.f32_mm(x, w, None)
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in impls}
    for fn in impls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in impls.items():
            out[name].append(gflops(fn, flops, calls, threads))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="32,64,128,512")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--isa", default=None, help="force avx2 / avx512")
    p.add_argument("--few", action="store_true", help="also time the few-row kernel f32_mm")
    args = p.parse_args()
    k = kernels.get()
    if k is None:
        raise SystemExit(f"kernels unavailable: {kernels.describe()}")
    if args.isa:
        k.set_isa(args.isa)
    print(f"f32_gemm[{k.isa()}] vs F.linear ({torch.__config__.show().count('MKL') and 'MKL' or 'BLAS'}); "
          f"GFLOP/s median (range) over {args.repeats} alternating rounds")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            N, K = SHAPES[shape]
            for M in [int(m) for m in args.rows.split(",")]:
                r = bench(M, N, K, args.repeats, args.few, threads)
                extra = f"  f32_mm {fmt(r['f32_mm'])}" if args.few else ""
                print(f"  {threads}t {shape:8s} {N:5d}x{K:<5d} M={M:4d}  blas {fmt(r['blas'])}  "
                      f"gemm {fmt(r['gemm'])}  x{ratio(r, 0):.2f} (cpu x{ratio(r, 1):.2f}){extra}", flush=True)


if __name__ == "__main__":
    main()
