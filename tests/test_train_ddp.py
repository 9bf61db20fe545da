"""Data-parallel `seekwen train` (seekwen/train/distributed.py) on CPU with gloo, 2 ranks under torchrun
(tests/train_worker.py), against one process training on the same global batches:

- DDP and FSDP2 (fully_shard): the logged losses, the validation loss and the final weights equal the
  one-process run's (fp32, 1e-5 relative), the router biases (aux-loss-free balancing, all-reduced
  expert counts) exactly equal on both ranks and to the one-process run's; a DeepSeek-V3 model with an
  MTP layer and the sequence-wise balance loss on, so every part of the objective is covered;
- only rank 0 writes files (each rank works in its own folder with a relative --out);
- a DDP run stopped at step 3 and resumed under FSDP2 ends where the uninterrupted run ends;
- a rank that dies makes the job end with an error within the timeout instead of hanging;
- `torchrun -m seekwen train` trains the model the one-process `Trainer` trains and exports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seekwen.train import TrainConfig, Trainer
from seekwen.train.distributed import local_rows
from seekwen.train.presets import preset

HERE = Path(__file__).parent
TEXT = str(HERE / "data" / "genesis.txt")
STEPS = 6
REL = 1e-5
LAUNCH_TIMEOUT_S = 600


def torchrun(args: list[str], cwd: Path, timeout: float = LAUNCH_TIMEOUT_S, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEKWEN_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def model_config() -> dict:
    # DeepSeek-V3 layout: MLA, a dense layer then an MoE layer with noaux_tc router biases, one MTP layer
    return {**preset("tiny-v3"), "hidden_size": 48, "moe_intermediate_size": 24, "intermediate_size": 96,
            "num_nextn_predict_layers": 1}


def cfg_fields(out: str, **kw) -> dict:
    base = dict(model=model_config(), texts=[TEXT], out=out, vocab_size=400, seq_len=32, batch_size=4,
                steps=STEPS, lr=3e-3, warmup=2, val_every=10, eval_interval=3, save_interval=3, log_interval=1,
                seed=7, seq_aux_alpha=1e-2, bias_update_rate=1e-2)
    return {**base, **kw}


def quiet(_msg: str) -> None:
    pass


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error of a whole tensor."""
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_same_weights(got: dict, ref: dict, what: str) -> None:
    """Each parameter within 1e-5 relative (norm) and 1e-5 absolute (element). Splitting a batch changes
    the order of the gradient sums; Adam turns those rounding differences in tiny gradients into
    updates of ~1e-6 (the same as one process accumulating the two halves' gradients gives)."""
    assert got.keys() == ref.keys(), what
    worst = max((rel_err(got[n], ref[n]), n) for n in ref)
    assert worst[0] <= REL, f"{what}: {worst}"
    worst = max((float((got[n] - ref[n]).abs().max()), n) for n in ref)
    assert worst[0] <= 1e-5, f"{what}: {worst}"
    for n in ref:
        if n.endswith("gate.bias"):  # the balancing step is a sign of integer counts: exactly the same
            assert torch.equal(got[n], ref[n]), f"{what}: {n}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The one-process run: losses, validation and final weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single") / "run"
    tr = Trainer(TrainConfig(**cfg_fields(str(out))), log=quiet)
    hist = tr.run(progress=False)
    torch.set_num_threads(before)
    biases = [n for n, _ in tr.model.named_parameters() if n.endswith("gate.bias")]
    assert biases and any(tr.model.get_parameter(n).abs().sum() > 0 for n in biases)  # the biases moved
    return {"train": [r["loss"] for r in hist.train], "val": [r["loss"] for r in hist.val],
            "params": {n: p.detach().clone() for n, p in tr.model.named_parameters()}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch for the DDP run, the FSDP2 run and the resume (stopped DDP -> resumed FSDP2)."""
    root = tmp_path_factory.mktemp("ddp")
    result = root / "result"
    result.mkdir()
    runs = []
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        dirs = [root / name / f"rank{r}" for r in range(2)]
        for d in dirs:
            d.mkdir(parents=True)
        runs.append({"name": name, "fsdp": fsdp, "cfg": cfg_fields("run"), "cwd": [str(d) for d in dirs],
                     "result": str(result)})
    resume_out = str(root / "resume" / "run")
    runs.append({"name": "part", "cfg": cfg_fields(resume_out), "stop_at": 3, "result": str(result)})
    runs.append({"name": "resumed", "fsdp": True, "resume": True, "cfg": cfg_fields(resume_out),
                 "result": str(result)})
    job = root / "job.json"
    job.write_text(json.dumps({"runs": runs}))
    p = torchrun([str(HERE / "train_worker.py"), str(job)], cwd=root)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return root


def _rank_result(root: Path, name: str, rank: int) -> tuple[dict, dict]:
    res = root / "result"
    return (load_file(str(res / f"{name}.rank{rank}.safetensors")),
            json.loads((res / f"{name}.rank{rank}.json").read_text()))


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(launched, single, name):
    w0, rec0 = _rank_result(launched, name, 0)
    w1, rec1 = _rank_result(launched, name, 1)
    assert (rec0["world"], rec0["rows"], rec1["rows"]) == (2, "slice(0, 2, None)", "slice(2, 4, None)")
    losses = [r["loss"] for r in rec0["train"]]
    assert len(losses) == STEPS == len(single["train"])
    assert max(abs(a - b) / b for a, b in zip(losses, single["train"], strict=True)) <= REL, (losses, single["train"])
    val = [r["loss"] for r in rec0["val"]]
    assert len(val) == 2 and max(abs(a - b) / b for a, b in zip(val, single["val"], strict=True)) <= REL
    assert_same_weights(w0, single["params"], f"{name} rank 0 vs one process")
    for n in w0:  # the ranks hold the same model
        assert torch.equal(w0[n], w1[n]), f"{name}: {n} differs between the ranks"


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_only_rank0_writes(launched, name):
    rank0, rank1 = (launched / name / f"rank{r}" for r in range(2))
    files = {p.name for p in (rank0 / "run").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors", "trainer_state.json",
            "train_log.jsonl"} <= files
    assert list(rank1.iterdir()) == [], "rank 1 wrote files"
    state = json.loads((rank0 / "run" / "trainer_state.json").read_text())
    assert state["step"] == STEPS


def test_resume_ddp_checkpoint_under_fsdp(launched, single):
    _, part = _rank_result(launched, "part", 0)
    assert part["step"] == 3
    w, rec = _rank_result(launched, "resumed", 0)
    assert rec["step"] == STEPS
    assert_same_weights(w, single["params"], "DDP 3 steps, then FSDP2 resumed to 6, vs one process")


def test_a_dying_rank_ends_the_job(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": [{"name": "die", "cfg": cfg_fields(str(tmp_path / "run"), steps=50),
                                         "die_at": 2, "result": str(tmp_path)}]}))
    t0 = time.monotonic()
    p = torchrun([str(HERE / "train_worker.py"), str(job)], cwd=tmp_path, timeout=240)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "rank 1: exiting on purpose after step 2" in out
    # rank 0 either fails in the step's all-reduce with the message, or torchrun stops it first
    assert "RankFailure: rank 0: training step 3: a collective over 2 ranks failed" in out or "SIGTERM" in out
    assert "exitcode  : 3" in out or "exitcode: 3" in out, out[-3000:]
    assert took < 200, took


def test_torchrun_cli_matches_trainer(tmp_path):
    args = ["-m", "seekwen", "train", TEXT, "--out", str(tmp_path / "cli"), "--preset", "tiny-v3",
            "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--warmup", "2",
            "--val-every", "10", "--eval-interval", "2", "--log-interval", "2", "--seed", "3", "--device", "cpu",
            "--export", str(tmp_path / "export"), "--quiet", "--fsdp"]
    p = torchrun(args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert p.stdout.count("validation loss") == 2, p.stdout  # rank 0 prints, once
    assert "2 ranks (FSDP2)" in p.stdout, p.stdout
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(model=preset("tiny-v3"), texts=[TEXT], out=str(tmp_path / "one"), vocab_size=400, seq_len=32,
                      batch_size=4, steps=4, lr=2e-3, warmup=2, val_every=10, eval_interval=2, log_interval=2,
                      save_interval=500, seed=3)
    tr = Trainer(cfg, log=quiet)
    tr.run(progress=False)
    torch.set_num_threads(before)
    ref = load_file(str(tr.save() / "model.safetensors"))
    for folder in ("cli", "export"):
        got = load_file(str(tmp_path / folder / "model.safetensors"))
        assert got.keys() == ref.keys()
        assert_same_weights(got, ref, folder)


def test_batch_must_split_evenly():
    class Two:
        world, rank = 2, 1

    assert local_rows(6, Two()) == slice(3, 6)
    with pytest.raises(ValueError, match="batch size 5 is not divisible by the 2 ranks"):
        local_rows(5, Two())


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over the ranks of a torchrun job"):
        Trainer(TrainConfig(**cfg_fields(str(tmp_path / "run"))), log=quiet, fsdp=True)
