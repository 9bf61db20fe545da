"""Microbenchmark of the fp32 prefill GEMM (`kernels.f32_gemm`, seekwen/fast/csrc/gemm.h) against the
BLAS torch ships (`F.linear`: MKL sgemm on x86), on Qwen2.5-0.5B's matrix shapes (out x in: fused qkv
1152x896, o 896x896, fused gate/up 9728x896, down 896x4864), y[M, out] = x[M, in] . W^T.

For each thread count, shape and row count M the two run alternately, `--repeats` rounds of a few calls
each (so both see the same minutes of a shared, noisy host); GFLOP/s (2 M N K / s) as the median and range
over the rounds, and the ratio of the medians; also by CPU time ("cpu": this process's CPU seconds / threads,
the figure a host with its cores to itself would approach). `--isa avx2` forces the AVX2 code; `--rows 17,24` etc. to
look at the threshold against the few-row kernel (`--few` adds `kernels.f32_mm` as a third column).
`--formats bf16,q8_0` (f16, q4_0) times `kernels.gemm`, which decodes such weights slice by slice, against
what those layers' exact path ran before for many rows: F.linear on the whole weight dequantized per call
(`--few`: the 16-row chunks of `kernels.mm`, linear.chunked_mm, which they run up to CHUNKED_ROWS rows).

    python scripts/bench_gemm.py [--threads 1,2] [--rows 32,64,128,512] [--shapes qkv,o,gate_up,down]
    python scripts/bench_gemm.py --formats bf16,q8_0 --rows 64,128,512 [--few]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seekwen.fast import kernels
from seekwen.fast import linear as L

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)}


def gflops(fn, flops: float, calls: int, threads: int) -> tuple[float, float]:
    """(GFLOP/s by wall time, by this process's CPU time / threads: what the cores would give undisturbed,
    less the time OpenMP threads spin at joins)."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    wall, cpu = time.perf_counter() - t, (time.process_time() - c) / threads
    return flops * calls / wall / 1e9, flops * calls / cpu / 1e9


def fmt(xs: list[tuple[float, float]]) -> str:  # median (range) of the wall rates, median CPU rate
    wall, cpu = [w for w, _ in xs], [c for _, c in xs]
    return f"{statistics.median(wall):5.1f} ({min(wall):.0f}-{max(wall):.0f}) cpu {statistics.median(cpu):5.1f}"


def ratio(r: dict[str, list[tuple[float, float]]], i: int) -> float:  # gemm / blas medians: wall (0), CPU (1)
    return statistics.median(v[i] for v in r["gemm"]) / statistics.median(v[i] for v in r["blas"])


Rates = dict[str, list[tuple[float, float]]]


def bench(M: int, N: int, K: int, repeats: int, few: bool, threads: int, form: str) -> Rates:
    """(wall, CPU) GFLOP/s per implementation over `repeats` alternating rounds."""
    k = kernels.get()
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    flops = 2.0 * M * N * K
    calls = max(1, int(2e9 / flops))  # ~20 ms of work per round and implementation at ~100 GFLOP/s
    if form == "fp32":
        impls = {"blas": lambda: F.linear(x, w), "gemm": lambda: k.f32_gemm(x, w, None)}
        if few:
            impls["f32_mm"] = lambda: k.f32_mm(x, w, None)
    else:
        layer = L.make_linear(w, None, form)
        stored, d = L.kernel_operands(layer)
        impls = {"blas": lambda: F.linear(x, layer.dequantized()), "gemm": lambda: k.gemm(x, stored, d, None)}
        if few:
            impls["f32_mm"] = lambda: L.chunked_mm(k, x, stored, d, None)
    out: Rates = {name: [] for name in impls}
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
    p.add_argument("--few", action="store_true", help="also time the few-row kernel f32_mm (chunked mm)")
    p.add_argument("--formats", default="fp32", help="fp32 (f32_gemm), bf16, f16, q8_0, q4_0 (gemm)")
    args = p.parse_args()
    k = kernels.get()
    if k is None:
        raise SystemExit(f"kernels unavailable: {kernels.describe()}")
    if args.isa:
        k.set_isa(args.isa)
    print(f"f32_gemm / gemm[{k.isa()}] vs F.linear ({torch.__config__.show().count('MKL') and 'MKL' or 'BLAS'}); "
          f"GFLOP/s median (range) over {args.repeats} alternating rounds")
    for form, threads in [(f, int(t)) for f in args.formats.split(",") for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            N, K = SHAPES[shape]
            for M in [int(m) for m in args.rows.split(",")]:
                r = bench(M, N, K, args.repeats, args.few, threads, form)
                extra = f"  {'f32_mm' if form == 'fp32' else 'chunked'} {fmt(r['f32_mm'])}" if args.few else ""
                print(f"  {form} {threads}t {shape:8s} {N:5d}x{K:<5d} M={M:4d}  blas {fmt(r['blas'])}  "
                      f"gemm {fmt(r['gemm'])}  x{ratio(r, 0):.2f} (cpu x{ratio(r, 1):.2f}){extra}", flush=True)


if __name__ == "__main__":
    main()
