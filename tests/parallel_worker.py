"""The per-rank side of tests/test_parallel.py, launched with `torchrun --nproc-per-node N`.

    torchrun --standalone --nproc-per-node 2 tests/parallel_worker.py JOB.json OUT.json

JOB.json lists cases (a checkpoint folder, the inputs and transformers' logits saved by the test, and the
(tp, ep) modes to run); every rank runs every check, rank 0 writes one JSON of measurements that the test
asserts on. Checks never raise: a failure is recorded, so one broken case does not hide the others.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch
import torch.distributed as dist

import seekwen
from seekwen.hf.loader import load as load_one
from seekwen.model.mtp import mtp_logits
from seekwen.runtime.engine import Engine, SamplingParams

N_NEW = 8


def max_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).abs().max())


def engine_run(model, prompts: list[list[int]]) -> list[list[int]]:
    """Staggered requests through 2 rows: joins, leaves and row moves (greedy)."""
    eng = Engine(model, max_batch=2, max_len=64)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 9, 3, 7)]
    return eng.generate(prompts, params)


def mtp_outputs(model, tokens: torch.Tensor) -> dict:
    """DeepSeek-V3's MTP layer: its logits over `tokens` [B, T] (depth 1) and greedy MTP speculation."""
    _, hidden = model(tokens[:, :-1], return_hidden=True)
    depth1 = mtp_logits(model, hidden, tokens)[0]  # [B, T-2, vocab]
    spec = model.generate(tokens, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False, speculative="mtp")
    return {"n_mtp": len(model.mtp), "logits": depth1, "spec": spec}


def same_on_every_rank(obj) -> bool:
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, obj)
    return all(v == views[0] for v in views)


@torch.inference_mode()
def run_case(case: dict, out: dict) -> None:
    data = torch.load(case["inputs"])
    ids, mask, gen_ids = data["ids"], data["mask"], data["gen_ids"]
    prompts = data["prompts"]
    ref_hf = data.get("hf_logits")
    singles = {}
    for fast in (False, True):
        m = load_one(case["folder"], dtype=torch.float32, fast=fast)
        singles[fast] = dict(logits=m(ids, attention_mask=mask),
                             gen=m.generate(gen_ids, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False),
                             engine=engine_run(m, prompts))
        if case.get("mtp"):
            singles[fast]["mtp"] = mtp_outputs(m, gen_ids)
        del m
    for tp, ep in case["modes"]:
        for fast in case.get("fast_modes", {}).get(f"tp{tp}ep{ep}", [False, True]):
            key = f"{case['name']}/tp{tp}ep{ep}/{'fast' if fast else 'plain'}"
            try:
                t0 = time.perf_counter()
                model = seekwen.load(case["folder"], dtype=torch.float32, tp=tp, ep=ep, fast=fast)
                r = {"load_s": time.perf_counter() - t0}
                logits = model(ids, attention_mask=mask)
                single = singles[fast]
                r["vs_single"] = max_err(logits, single["logits"], mask)
                if ref_hf is not None:
                    r["vs_hf"] = max_err(logits, ref_hf, mask)
                gen = model.generate(gen_ids, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False)
                r["generate_equal"] = bool(torch.equal(gen, single["gen"]))
                eng = engine_run(model, prompts)
                r["engine_equal"] = eng == single["engine"]
                r["ranks_agree"] = same_on_every_rank([gen.tolist(), eng])
                if case.get("mtp"):
                    got, want = mtp_outputs(model, gen_ids), single["mtp"]
                    r["mtp_layers"] = got["n_mtp"]
                    r["mtp_vs_single"] = max_err(got["logits"], want["logits"])
                    r["mtp_spec_equal"] = bool(torch.equal(got["spec"], want["spec"]))
                    r["mtp_spec_is_greedy"] = bool(torch.equal(got["spec"], gen))
                r["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
                r["kv_bytes_per_token"] = model.cfg.kv_bytes_per_token(4)
                del model
            except Exception as e:  # recorded, asserted on by the test
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            out[key] = r
    if case.get("int8"):
        key = f"{case['name']}/tp2ep1/int8"
        try:
            q1 = load_one(case["folder"], dtype=torch.float32, quantize="int8")
            q2 = seekwen.load(case["folder"], dtype=torch.float32, quantize="int8")
            a, b = q2(ids, attention_mask=mask), q1(ids, attention_mask=mask)
            fp32 = singles[False]["logits"]
            out[key] = {"vs_single_int8": max_err(a, b, mask), "vs_single_fp32": max_err(a, fp32, mask),
                        "single_int8_vs_fp32": max_err(b, fp32, mask),
                        "generate_equal": bool(torch.equal(
                            q2.generate(gen_ids, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False),
                            q1.generate(gen_ids, max_new_tokens=N_NEW, eos_token_id=[], stop_at_eos=False)))}
        except Exception as e:
            out[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run_errors(job: dict, out: dict) -> None:
    """Each error case: the message every rank raises (or "no error")."""
    rank = dist.get_rank()

    def attempt(key: str, fn) -> None:
        try:
            fn()
            out[key] = "no error"
        except Exception as e:
            out[key] = f"{type(e).__name__}: {e}"
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, out[key] != "no error")
        out[key + "/every_rank_failed"] = all(views)

    folder = job["folder"]
    for key, overrides, tp, ep in job["config_cases"]:
        attempt(key, lambda o=overrides, t=tp, e=ep: seekwen.load(folder, dtype=torch.float32, config_overrides=o,
                                                                 tp=t, ep=e, fast=False))
    other = job["other_folder"] if rank == 1 else folder
    attempt("disagree", lambda: seekwen.load(other, dtype=torch.float32, fast=False))
    missing = job["missing_folder"] if rank == 1 else folder
    attempt("missing_on_rank1", lambda: seekwen.load(missing, dtype=torch.float32, fast=False))
    attempt("tp3", lambda: seekwen.load(folder, dtype=torch.float32, tp=3, fast=False))
    # a collective that one rank never joins, on a group with a short timeout
    from datetime import timedelta

    from seekwen.parallel import Comm

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    comm = Comm(group, timeout=3)
    if rank == 0:
        attempt_local = None
        try:
            comm.all_reduce(torch.ones(4))
            attempt_local = "no error"
        except Exception as e:
            attempt_local = f"{type(e).__name__}: {e}"
        out["timeout"] = attempt_local
    dist.barrier()


def main() -> int:
    job, out_path = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    torch.set_num_threads(1)
    out: dict = {}
    for case in job.get("cases", []):
        run_case(case, out)
    if "errors" in job:
        run_errors(job["errors"], out)
    if dist.is_initialized() and dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
