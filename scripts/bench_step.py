"""Per-step overhead: batch-1 decode of the bundled model and short-prompt prefill, with where a step's
time goes (C++ kernels vs everything else: Python, small ATen ops, allocation).

    python scripts/bench_step.py                          # bundled b1 decode + prefill-32 of the dense shape
    python scripts/bench_step.py --sections decode --threads 1
    python scripts/bench_step.py --compare /path/to/other/checkout   # same measurements, alternating A/B

Sections:
- decode: the bundled model (fp32, fast path), an 8-token prompt, then --steps `Decoder.step` calls with a
  greedy pick per step; tokens/s and ms/step as medians over --repeats runs of the compiled step
  (`fast.compiled_step`, one C++ call per step) and of the Python step (the layers from Python), the two
  alternated run by run, plus `model.generate` end to end; then one cProfile'd run of the Python step split
  into time inside the C++ kernels (`seekwen_kernels_*` calls) and the rest (cProfile inflates the rest:
  read the split as proportions);
- prefill: `Decoder.prefill` of a --prefill-len-token prompt on `seekwen bench`'s Qwen2.5-0.5B-shaped
  checkpoint (random weights, built once under ~/.cache/seekwen/bench), tokens/s.
`--compare DIR` runs this script from both checkouts in alternation (subprocesses, one at a time), so
before/after figures come from the same minutes of a shared, noisy host.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4g} (range {min(xs):.4g}-{max(xs):.4g}, n={len(xs)})"


def decode_runs(model, steps: int, repeats: int, cpu: list[float] | None = None, compiled: bool = False) -> list[float]:
    """Wall seconds per step of `repeats` runs of `steps` greedy decode steps after an 8-token prompt;
    `cpu` receives this process's CPU seconds per step (on a shared host, time spent descheduled is not
    in it: with one torch thread it is the step's own work). compiled: the compiled step, else the Python one."""
    from seekwen.runtime.decoder import Decoder

    dec = Decoder(model, 1, 8 + steps + 1, compiled_step=compiled)
    ids = torch.arange(3, 11)[None]
    out = []
    for r in range(repeats + 1):
        tok = dec.prefill(ids).argmax(-1)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
        if r:  # the first run warms up
            out.append((time.perf_counter() - t) / steps)
            if cpu is not None:
                cpu.append((time.process_time() - c) / steps)
    return out


def kernel_split(model, steps: int) -> dict:
    """One cProfile'd run: ms per step inside the C++ kernels and in total, C++ kernel calls and Python
    function calls per step; and one run counting the ATen ops dispatched per step (load-independent)."""
    prof = cProfile.Profile()
    prof.enable()
    per_step = decode_runs(model, steps, 1)[0]
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    n = 2 * steps  # decode_runs ran 2 x steps (warm-up + 1), plus two prefills (counted in, negligible)
    kern = [v for (_, _, name), v in stats.items() if "seekwen_kernels" in name]
    ops, compiled_ops = OpCounter(), OpCounter()
    with ops:
        decode_runs(model, steps, 1)
    with compiled_ops:  # the ATen calls the compiled step makes from C++ (its outputs, views)
        decode_runs(model, steps, 1, compiled=True)
    return {"profiled_step_ms": per_step * 1e3, "kernel_ms": sum(v[2] for v in kern) / n * 1e3,
            "kernel_calls": sum(v[1] for v in kern) / n, "python_calls": sum(v[1] for v in stats.values()) / n,
            "aten_ops": ops.n / n, "compiled_aten_ops": compiled_ops.n / n}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that reach the dispatcher (views included; the C++ kernels are not ATen ops)."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def bench_decode(args) -> dict:
    import seekwen
    from seekwen.runtime.load import bundled_model_path

    model = seekwen.load(bundled_model_path(), dtype=torch.float32)
    runs, cpu, py_runs, py_cpu = [], [], [], []
    for _ in range(args.repeats):  # the two steps alternated, so both see the same minutes of the host
        runs += decode_runs(model, args.steps, 1, cpu, compiled=True)
        py_runs += decode_runs(model, args.steps, 1, py_cpu, compiled=False)
    ids = torch.arange(3, 11)[None]
    gen = []
    for r in range(args.repeats + 1):
        t = time.perf_counter()
        n = model.generate(ids, max_new_tokens=args.steps, temperature=0.0, stop_at_eos=False).shape[1]
        if r:
            gen.append(n / (time.perf_counter() - t))
    return {"step_ms": [s * 1e3 for s in runs], "tok_s": [1 / s for s in runs], "generate_tok_s": gen,
            "cpu_step_ms": [s * 1e3 for s in cpu], "cpu_tok_s": [1 / s for s in cpu],
            "py_step_ms": [s * 1e3 for s in py_runs], "py_tok_s": [1 / s for s in py_runs],
            "py_cpu_tok_s": [1 / s for s in py_cpu], **kernel_split(model, args.steps)}


@torch.inference_mode()
def bench_prefill(args) -> dict:
    import seekwen
    from seekwen.runtime.decoder import Decoder
    from seekwen.tools.bench.checkpoints import build_checkpoint

    model = seekwen.load(build_checkpoint("dense", args.cache_dir), dtype=torch.float32, quantize=args.quantize)
    S = args.prefill_len
    ids = torch.randint(0, model.cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(0))
    dec = Decoder(model, 1, S + 1)
    out, cpu = [], []
    for r in range(args.repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        dec.prefill(ids)
        if r:
            out.append(S / (time.perf_counter() - t))
            cpu.append(S / (time.process_time() - c) * torch.get_num_threads())  # per-thread CPU time, summed
    return {"prefill_tok_s": out, "prefill_cpu_tok_s": cpu, "prefill_len": S}


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    import seekwen

    res: dict = {"threads": torch.get_num_threads(), "seekwen": str(Path(seekwen.__file__).parent.parent)}
    if "decode" in args.sections:
        res.update(bench_decode(args))
    if "prefill" in args.sections:
        res.update(bench_prefill(args))
    return res


def report(label: str, res: dict) -> None:
    print(f"[{label}] seekwen from {res['seekwen']}, torch threads {res['threads']}")
    if "tok_s" in res:
        print(f"  bundled b1 decode   {med(res['tok_s'])} tok/s   ms/step {med(res['step_ms'])} (compiled step)")
        print(f"  by CPU time         {med(res['cpu_tok_s'])} tok/s   ms/step {med(res['cpu_step_ms'])}")
        if "py_tok_s" in res:
            ratio = statistics.median(res["tok_s"]) / statistics.median(res["py_tok_s"])
            print(f"  Python step         {med(res['py_tok_s'])} tok/s   ms/step {med(res['py_step_ms'])} "
                  f"(compiled / Python {ratio:.2f}x)")
            print(f"  by CPU time         {med(res['py_cpu_tok_s'])} tok/s")
        print(f"  bundled generate    {med(res['generate_tok_s'])} tok/s (prefill + steps + sampling)")
        k, p = res["kernel_ms"], res["profiled_step_ms"]
        print(f"  Python step profiled {p:.3f} ms/step, {k:.3f} in C++ kernels ({100 * k / p:.0f}%), rest host work")
        print(f"  per step            {res['aten_ops']:.0f} ATen ops, {res['kernel_calls']:.0f} C++ kernel calls, "
              f"{res['python_calls']:.0f} Python calls; compiled step: {res['compiled_aten_ops']:.0f} ATen ops "
              "(from C++), one Python call")
    if "prefill_tok_s" in res:
        print(f"  dense prefill       {med(res['prefill_tok_s'])} tok/s of a {res['prefill_len']}-token prompt")
        print(f"  by CPU time         {med(res['prefill_cpu_tok_s'])} tok/s (x threads: what the host's idle "
              "cores would give)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="decode,prefill")
    p.add_argument("--steps", type=int, default=200, help="decode steps per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantize", default=None, help="prefill: the dense model's weight format (e.g. bf16)")
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench")
    p.add_argument("--compare", default=None, help="another checkout: run both, alternating, --rounds times")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the raw results as JSON (used by --compare)")
    args = p.parse_args()
    if args.compare is None:
        res = measure(args)
        print(json.dumps(res) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            report("this checkout", res)
        return
    here = Path(__file__).resolve().parent.parent
    passed = [a for a in sys.argv[1:] if not a.startswith("--compare") and a != args.compare]
    merged: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, root in (("A: this checkout", here), (f"B: {args.compare}", Path(args.compare))):
            cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--json"]
            done = subprocess.run(cmd, cwd=root, env={"PYTHONPATH": str(root), **_env()}, capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr}")
            out = done.stdout.strip().splitlines()[-1]
            for key, val in json.loads(out).items():
                slot = merged.setdefault(name, {})
                if isinstance(val, list):
                    slot.setdefault(key, []).extend(val)
                else:
                    slot[key] = val
    for name, res in merged.items():
        report(name, res)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


if __name__ == "__main__":
    main()
