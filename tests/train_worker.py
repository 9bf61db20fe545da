"""The per-rank side of tests/test_train_ddp.py, launched with `torchrun --nproc-per-node 2`.

    torchrun --standalone --nproc-per-node 2 tests/train_worker.py JOB.json

JOB.json: {"runs": [...]} trained one after the other in the same process group. Each run is
{"name", "cfg": TrainConfig fields, "fsdp", "resume", "stop_at", "cwd": [one folder per rank] (optional:
each rank works there, so a relative `out` is a different folder per rank), "die_at": step (optional:
rank 1 exits with code 3 after that step), "result": folder}. Every rank writes
RESULT/NAME.rank{r}.safetensors (its whole parameters after training, the router biases included) and
RESULT/NAME.rank{r}.json (the logged losses and validation records).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from seekwen.train import TrainConfig, Trainer


def quiet(_msg: str) -> None:
    pass


def run_one(run: dict) -> None:
    rank = int(os.environ["RANK"])
    if "cwd" in run:
        os.chdir(run["cwd"][rank])
    cfg = TrainConfig(**run["cfg"])
    tr = Trainer(cfg, resume=run.get("resume", False), log=quiet, fsdp=run.get("fsdp", False))
    if "die_at" in run:
        while tr.step < cfg.steps:
            tr.train_step()
            if rank == 1 and tr.step == run["die_at"]:
                print(f"rank 1: exiting on purpose after step {tr.step}", file=sys.stderr, flush=True)
                os._exit(3)
        return
    hist = tr.run(stop_at=run.get("stop_at"), progress=False)
    with torch.no_grad():
        params = {n: tr.dp.full(p.detach()).cpu().clone() for n, p in tr.model.named_parameters()}
    result = Path(run["result"])
    save_file(params, str(result / f"{run['name']}.rank{rank}.safetensors"))
    record = {"train": hist.train, "val": hist.val, "step": tr.step, "world": tr.dp.world, "rows": str(tr.rows)}
    (result / f"{run['name']}.rank{rank}.json").write_text(json.dumps(record))


def main() -> int:
    torch.set_num_threads(1)
    job = json.loads(Path(sys.argv[1]).read_text())
    for run in job["runs"]:
        run_one(run)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
