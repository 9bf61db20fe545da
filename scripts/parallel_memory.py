"""Memory of a sharded load: per-rank parameter bytes and peak memory growth, one process vs torchrun.

    python scripts/parallel_memory.py [--dir DIR] [--nproc 2]

Writes two random checkpoints of realistic layout (fp32, a Qwen2-shaped dense model of ~140 MB and a
DeepSeek-V3-shaped MoE of ~120 MB), then loads each once in one process and once per rank under
`torchrun --nproc-per-node N` (tp = N; the MoE also with ep = N) and prints, per process: the parameter
bytes it holds, its peak resident-memory growth during `seekwen.load` (VmHWM - RSS before, which
includes checkpoint pages mapped while reading) and its peak anonymous-memory growth (sampled every
millisecond: the memory the load itself allocates). Each process first loads a tiny checkpoint, unmeasured,
so library initialisation is not counted.

    python scripts/parallel_memory.py --measure DIR [--tp N --ep N]   # one measurement (per rank)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MODELS = {
    "qwen2-dense": {
        "model_type": "qwen2", "vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1536,
        "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "deepseek-v3-moe": {
        "model_type": "deepseek_v3", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
        "moe_intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "q_lora_rank": 192, "kv_lora_rank": 128,
        "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
        "moe_layer_freq": 1,
    },
}


# loaded first, unmeasured: the first load in a process initialises libraries (~70 MB here, whatever the size)
WARMUP = {**MODELS["deepseek-v3-moe"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64,
          "moe_intermediate_size": 32, "num_hidden_layers": 2, "q_lora_rank": 32, "kv_lora_rank": 32}


def make(folder: Path, raw: dict) -> None:
    import seekwen
    from seekwen.hf import parse_config, save_hf

    if (folder / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    model = seekwen.build(parse_config(raw), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02)
    save_hf(model, folder)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every millisecond in a thread; `.peak` is the largest seen."""

    def __enter__(self):
        self.peak, self.done = _status("RssAnon"), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.done:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def measure(folder: Path, tp: int | None, ep: int | None) -> dict:
    import seekwen
    from seekwen.parallel import env_world_size

    if env_world_size() > 1:  # join the group first: its setup is not the load's memory
        import torch.distributed as dist

        dist.init_process_group("gloo")
    warm = seekwen.load(folder.parent / "warmup", dtype=torch.float32, fast=False, tp=tp, ep=ep)
    del warm
    rss0, anon0 = _status("VmRSS"), _status("RssAnon")
    t0 = time.perf_counter()
    with PeakAnon() as peak:
        model = seekwen.load(folder, dtype=torch.float32, fast=False, tp=tp, ep=ep)
    dt = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rank": int(os.environ.get("RANK", 0)), "param_mb": params / 2**20,
            "peak_rss_growth_mb": (_status("VmHWM") - rss0) / 2**20, "peak_anon_growth_mb": (peak.peak - anon0) / 2**20,
            "load_s": dt}


def run_measure(folder: Path, nproc: int, tp: int | None = None, ep: int | None = None) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--measure", str(folder)]
    if tp:
        script += ["--tp", str(tp)]
    if ep:
        script += ["--ep", str(ep)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.tp, args.ep)), flush=True)
        return 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="seekwen-mem-"))
    n = args.nproc
    make(root / "warmup", WARMUP)
    print(f"{'checkpoint':<16} {'run':<14} {'rank':>4} {'params MB':>10} {'peak RSS +MB':>13} {'peak anon +MB':>14} "
          f"{'load s':>7}")
    for name, raw in MODELS.items():
        folder = root / name
        make(folder, raw)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        runs = [("1 process", 1, None, None), (f"tp={n}", n, n, None)]
        if "moe" in name:
            runs.append((f"tp={n} ep={n}", n, n, n))
        for label, nproc, tp, ep in runs:
            for r in run_measure(folder, nproc, tp, ep):
                print(f"{name + f' {size:.0f}MB':<16} {label:<14} {r['rank']:>4} {r['param_mb']:>10.1f} "
                      f"{r['peak_rss_growth_mb']:>13.1f} {r['peak_anon_growth_mb']:>14.1f} {r['load_s']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
