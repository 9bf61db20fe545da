"""Microbenchmark of the few-row decode kernels (seekwen/fast/kernels.py, C++ in seekwen/fast/csrc/), per
weight format, against the machine's read bandwidth measured in the same run.

For each format (fp32, bf16, f16, q8_0, q4_0, and the older int8 per-channel / int4 group-64) and each of
Qwen2.5-0.5B's matrix shapes (q/o 896x896, k/v 128x896, up/gate 4864x896, down 896x4864, head 151936x896;
out x in), y[M, out] = x[M, in] . W^T through the fast layer (`linear.make_linear(w, None, fmt)`) at
M = 1, 8, 16 rows, with enough copies of the weights rotated that they come from RAM (> 256 MB per
pass): GB/s of weight bytes streamed (codes + scales) and that as % of the read bandwidth, measured first
as `x.sum()` over 1 GiB of fp32 (2 threads, the best of 5). Each figure is the median of `--repeats`
passes over all copies. `--isa avx2` forces the AVX2 code. Also the older BLAS baseline (F.linear) for fp32.
q8_0 / q4_0 run as the layers do by default: int8 activations through `kernels.qmm` (the integer code
`--qisa` forces: avx512vnni, avxvnni, avx2, scalar); `--activations fp32,q8` measures both their exact path
(`kernels.mm` with fp32 activations) and that, one row per path. bf16 runs both of its paths unless
`--activations` names one: "bf16/bf16" its default on AVX512-BF16 CPUs (activations rounded to bf16,
`kernels.bf16_mm`, vdpbf16ps), "bf16/fp32" the exact one (`kernels.mm` up to 64 rows, then BLAS on the
widened weight). Rows above 16 also get G MAC/s (M x out x in multiply-adds per second): prefill is
compute-bound there.

    python scripts/bench_kernels.py [--formats fp32,q4_0] [--shapes up,head] [--rows 1,8,16] [--isa avx2]
    python scripts/bench_kernels.py --formats q8_0,q4_0 --activations fp32,q8 [--rows 1,8,16,64,512]
    python scripts/bench_kernels.py --formats bf16 --rows 1,8,16,32,512 --shapes qo,kv,up,down

`--decode` instead times whole-model decode on `seekwen bench`'s Qwen2.5-0.5B-shaped checkpoint (random
weights, built once under ~/.cache/seekwen/bench): the fp32 model prepared in each format, batch 1 and
batch 8 (prompt 32), tokens/s as the median step time over `--steps` steps, the formats interleaved
`--repeats` times (best kept), with the weight bytes a batch-1 step reads and that over the read bandwidth:

    python scripts/bench_kernels.py --decode [--formats fp32,bf16,f16,q8_0,q4_0] [--batches 1,8]
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


def bench_shape(fmt: str, out_f: int, in_f: int, rows: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    """(median, best) GB/s of weights streamed per row count, over `repeats` passes over the copies."""
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

            ts = [_timed(one_pass) for _ in range(repeats)]
            res[M] = (nbytes * len(layers) / statistics.median(ts) / 1e9, nbytes * len(layers) / min(ts) / 1e9)
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


def bench_decode(formats: list[str], batches: list[int], steps: int, repeats: int, bw: float) -> None:
    """Decode tokens/s per format and batch size on the dense bench checkpoint, formats interleaved."""
    import copy

    import seekwen
    from seekwen.fast import prepare
    from seekwen.tools.bench.checkpoints import build_checkpoint
    from seekwen.tools.bench.roofline import decode_bytes
    from seekwen.tools.bench.runners import Ours, time_decode

    plain = seekwen.load(build_checkpoint("dense", "~/.cache/seekwen/bench"), dtype=torch.float32, fast=False)
    models = {f: prepare(copy.deepcopy(plain), quantize=None if f == "fp32" else f) for f in formats}
    del plain
    g = torch.Generator().manual_seed(0)
    prompts = {B: torch.randint(0, models[formats[0]].cfg.vocab_size, (B, 32), generator=g) for B in batches}
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for rep in range(repeats):
            print(f"  decode round {rep + 1}/{repeats}", flush=True)
            for f in formats:
                for B in batches:
                    t = time_decode(Ours(models[f]), prompts[B], steps)
                    best[f, B] = min(best.get((f, B), float("inf")), t)
    for f in formats:
        gb = decode_bytes(models[f]) / 1e9
        cells = "  ".join(f"b{B} {B / best[f, B]:6.1f} tok/s" for B in batches)
        roof = bw / gb
        print(f"{f:<5} {gb:5.2f} GB/step  {cells}   b1 roofline {roof:5.1f} tok/s "
              f"({100 * (1 / best[f, batches[0]]) / roof:3.0f}% of it)" if batches[0] == 1 else f"{f:<5} {cells}")


def activations(fmt: str, asked: str | None) -> list[str]:
    """The activation modes (linear.block_activations) to measure a format with."""
    if fmt not in ("q8_0", "q4_0", "bf16"):
        return ["fp32"]
    if asked:
        return asked.split(",")
    return ["q8", "fp32"] if fmt == "bf16" else ["q8"]


def label(fmt: str, act: str) -> str:
    if fmt == "bf16":
        return f"bf16/{'bf16' if act == 'q8' and kernels.get().has_bf16_mm() else 'fp32'}"
    return f"{fmt}/{act}" if fmt in ("q8_0", "q4_0") else fmt


def cells(res: dict, rows: list[int], bw: float, fmt: str, out_f: int, in_f: int) -> str:
    """GB/s median [best] (% of the read bandwidth) per row count; above 16 rows also G MAC/s (median)."""
    nbytes = weight_bytes(make(fmt, torch.zeros(out_f, in_f)))
    out = []
    for M in rows:
        c = f"{res[M][0]:5.1f} [{res[M][1]:5.1f}] ({100 * res[M][0] / bw:3.0f}%)"
        if M > 16:
            c += f" {res[M][0] * M * out_f * in_f / nbytes:5.1f} GMAC/s"
        out.append(c)
    return "  ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--isa", default=None, help="force avx2 or avx512")
    p.add_argument("--qisa", default=None, help="q8_0 / q4_0: force qmm's integer code (avx512vnni, avxvnni, ...)")
    p.add_argument("--activations", default=None,
                   help="q8_0 / q4_0 / bf16: fp32 (exact path), q8 (rounded: int8 blocks, bf16 for bf16), or both; "
                        "default q8 for q8_0 / q4_0, both for bf16")
    p.add_argument("--blas", action="store_true", help="also F.linear with fp32 weights")
    p.add_argument("--decode", action="store_true", help="whole-model decode per format instead (see above)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    k = kernels.get()
    assert k is not None, f"kernels unavailable: {kernels.describe()}"
    if a.isa:
        k.set_isa(a.isa)
    if a.qisa:
        k.set_qisa(a.qisa)
    rows = [int(r) for r in a.rows.split(",")]
    bw = read_bandwidth()
    print(f"{torch.get_num_threads()} threads, kernels {k.isa()} (qmm: {k.qisa()}); read bandwidth (x.sum over 1 GiB) "
          f"{bw:.1f} GB/s")
    if a.decode:
        formats = a.formats.split(",") if a.formats != ",".join(FORMATS) else ["fp32", "bf16", "f16", "q8_0", "q4_0"]
        bench_decode(formats, [int(b) for b in a.batches.split(",")], a.steps, max(1, a.repeats // 2), bw)
        return
    print(f"GB/s of weights streamed, median of {a.repeats} [best] (% of read bandwidth, median)")
    print("format    shape           " + "  ".join(f"M={M:<2} GB/s              " for M in rows))
    for fmt in a.formats.split(","):
        for name in a.shapes.split(","):
            out_f, in_f = SHAPES[name]
            for act in activations(fmt, a.activations):
                with L.block_activations(act):
                    res = bench_shape(fmt, out_f, in_f, rows, a.repeats)
                print(f"{label(fmt, act):<9} {name:<4} {out_f:>6}x{in_f:<5} {cells(res, rows, bw, fmt, out_f, in_f)}",
                      flush=True)
    if a.blas:
        for name in a.shapes.split(","):
            res = bench_blas(*SHAPES[name], rows, a.repeats)
            print(f"F.linear {name:<4} " + "  ".join(f"{res[M]:6.1f} ({100 * res[M] / bw:3.0f}%)" for M in rows))


if __name__ == "__main__":
    main()
