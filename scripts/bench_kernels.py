"""Microbenchmark of the few-row decode kernels (seekwen/fast/kernels.py, C++ in seekwen/fast/csrc/), per
weight format, against the machine's read bandwidth measured in the same run.

For each format (fp32, bf16, f16, q8_0, q4_0, and the older int8 per-channel / int4 group-64) and each of
Qwen2.5-0.5B's matrix shapes (q/o 896x896, k/v 128x896, up/gate 4864x896, down 896x4864, head 151936x896;
out x in), y[M, out] = x[M, in] . W^T through the fast layer (`linear.make_linear(w, None, fmt)`) at
M = 1, 8, 16 rows, with enough copies of the weights rotated that they come from RAM (> 256 MB per
pass): GB/s of weight bytes streamed (codes + scales) and that as % of the read bandwidth, measured first
as `x.sum()` over 1 GiB of fp32 (2 threads, the best of 5). Each figure is the median of `--repeats`
passes over all copies. `--isa avx2` forces the AVX2 code. Also the older BLAS baseline (F.linear) for fp32.

    python scripts/bench_kernels.py [--formats fp32,q4_0] [--shapes up,head] [--rows 1,8,16] [--isa avx2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seekwen.fast import kernels
from seekwen.fast import linear as L

SHAPES = {"qo": (896, 896), "kv": (128, 896), "up": (4864, 896), "down": (896, 4864), "head": (151936, 896)}
FORMATS = ("fp32", "bf16", "f16", "q8_0", "q4_0", "int8", "int4")
POOL = 256e6  # bytes of weights rotated per pass: more than any L3 here


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of x.sum() over `gib` GiB of fp32 (best of `repeats`)."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(layer) -> int:
    return sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias")


def make(fmt: str, w: torch.Tensor):
    return L.make_linear(w, None, None if fmt == "fp32" else fmt)


def bench_shape(fmt: str, out_f: int, in_f: int, rows: list[int], repeats: int) -> dict[int, float]:
    """GB/s of weights streamed per row count, the median of `repeats` passes over the copies."""
    w = torch.randn(out_f, in_f) * 0.05
    layers = [make(fmt, w)]
    nbytes = weight_bytes(layers[0])
    while len(layers) * nbytes < POOL:
        layers.append(make(fmt, torch.randn(out_f, in_f) * 0.05))
    res = {}
    with torch.inference_mode():
        for M in rows:
            x = torch.randn(M, in_f)
            for la in layers:
                la(x)

            def one_pass(x=x):
                for la in layers:
                    la(x)

            t = statistics.median(_timed(one_pass) for _ in range(repeats))
            res[M] = nbytes * len(layers) / t / 1e9
    return res


def bench_blas(out_f: int, in_f: int, rows: list[int], repeats: int) -> dict[int, float]:
    ws = [torch.randn(out_f, in_f) for _ in range(max(1, int(POOL / (out_f * in_f * 4))))]
    res = {}
    for M in rows:
        x = torch.randn(M, in_f)

        def one_pass(x=x):
            for w in ws:
                F.linear(x, w)

        one_pass()
        t = statistics.median(_timed(one_pass) for _ in range(repeats))
        res[M] = out_f * in_f * 4 * len(ws) / t / 1e9
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--isa", default=None, help="force avx2 or avx512")
    p.add_argument("--blas", action="store_true", help="also F.linear with fp32 weights")
    a = p.parse_args()
    k = kernels.get()
    assert k is not None, f"kernels unavailable: {kernels.describe()}"
    if a.isa:
        k.set_isa(a.isa)
    rows = [int(r) for r in a.rows.split(",")]
    bw = read_bandwidth()
    print(f"{torch.get_num_threads()} threads, kernels {k.isa()}; read bandwidth (x.sum over 1 GiB) {bw:.1f} GB/s")
    print("format  shape           " + "  ".join(f"M={M:<2} GB/s (% of read)" for M in rows))
    for fmt in a.formats.split(","):
        for name in a.shapes.split(","):
            out_f, in_f = SHAPES[name]
            res = bench_shape(fmt, out_f, in_f, rows, a.repeats)
            cells = "  ".join(f"{res[M]:6.1f} ({100 * res[M] / bw:3.0f}%)     " for M in rows)
            print(f"{fmt:<7} {name:<4} {out_f:>6}x{in_f:<5} {cells}", flush=True)
    if a.blas:
        for name in a.shapes.split(","):
            res = bench_blas(*SHAPES[name], rows, a.repeats)
            print(f"F.linear {name:<4} " + "  ".join(f"{res[M]:6.1f} ({100 * res[M] / bw:3.0f}%)" for M in rows))


if __name__ == "__main__":
    main()
