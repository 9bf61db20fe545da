"""Training throughput of `seekwen train`: one process, then 2 ranks with DDP and with FSDP2 (torchrun,
gloo on CPU), the same global batch and steps; prints each run's global tokens/s (median of the logged
windows after the first), its final training loss and wall time.

    python scripts/bench_train_parallel.py [--preset tiny-v3] [--steps 40] [--batch-size 8] [--seq-len 64]

Each run uses OMP_NUM_THREADS = cores / processes (or --threads), so the three runs use the same cores. Runs go to a
temporary folder (removed at the end).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "genesis.txt"
LINE = re.compile(r"^step (\d+)/\d+ loss ([\d.]+) lr \S+ (\d+) tok/s", re.M)


def run(label: str, nproc: int, fsdp: bool, args: argparse.Namespace, out: Path) -> dict:
    train = ["train", str(TEXT), "--out", str(out / label), "--preset", args.preset, "--vocab-size", "400",
             "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--log-interval", str(args.log_interval), "--eval-interval", "100000", "--save-interval", "100000",
             "--device", "cpu", "--quiet", *(["--fsdp"] if fsdp else [])]
    cmd = [sys.executable, "-m", "seekwen", *train] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "seekwen",
         *train]
    threads = args.threads or max(1, (os.cpu_count() or 2) // nproc)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{label} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    windows = [(int(s), float(loss), int(tps)) for s, loss, tps in LINE.findall(p.stdout)]
    rates = [tps for _, _, tps in windows[1:]] or [windows[-1][2]]
    return {"label": label, "threads": threads, "tok_s": statistics.median(rates), "loss": windows[-1][1],
            "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-v3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="OMP threads per process (default: cores / processes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run("1 process", 1, False, args, Path(tmp)), run("2 ranks DDP", 2, False, args, Path(tmp)),
                run("2 ranks FSDP2", 2, True, args, Path(tmp))]
    print(f"seekwen train --preset {args.preset}: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
          f"(global batch), {os.cpu_count()} cores")
    print(f"{'run':<14} {'threads/proc':>12} {'tok/s':>8} {'final loss':>10} {'wall s':>7}")
    for r in rows:
        print(f"{r['label']:<14} {r['threads']:>12} {r['tok_s']:>8.0f} {r['loss']:>10.4f} {r['wall']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
