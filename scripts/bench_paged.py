"""The paged engine (`Engine(paged=True)`) against the row-pool engine, same process, paired runs.

    python scripts/bench_paged.py --models bundled,dense,moe --sections memory,prefix,chunked,throughput

Sections (each prints medians and ranges over --repeats paired runs; the host is shared and noisy):
- memory: for one fixed KV budget (the row pool's max_batch x max_len bytes), how many sequences of mixed
  lengths run at once; KV bytes held = blocks in use x block bytes (the bundled model runs it for real, the
  bench shapes are computed from their block bytes with the same lengths);
- prefix: time to first token of a request whose --prefix-len-token prefix is cached vs not;
- chunked: per-step inter-token latency of 8 decoding sequences while a --long-len-token prompt joins:
  the paged engine's p99 (chunked prefill) vs its steady step (a paired run with nothing joining, over
  the same steps), and the row-pool engine's stall;
- throughput: generated tokens/s at 1, 8, 32 concurrent sequences, paged vs row pool.
`dense` / `moe` are `seekwen bench`'s Qwen2.5-0.5B / DeepSeek-V2-Lite-shaped checkpoints (random weights).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import seekwen
from seekwen.runtime.engine import Engine, SamplingParams
from seekwen.tools.bench.checkpoints import build_checkpoint
from seekwen.tools.common import bundled_model_path


def load(name: str, cache_dir: str):
    folder = bundled_model_path() if name == "bundled" else build_checkpoint(name, cache_dir)
    return seekwen.load(folder, dtype=torch.float32, fast=True)


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} (range {min(xs):.3g}-{max(xs):.3g}, n={len(xs)})"


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def rand_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# ---- memory -------------------------------------------------------------------------------------------


def bench_memory(model, name: str, args) -> None:
    """Fixed budget = the row pool (max_batch rows x max_len). Paged: requests of mixed lengths admitted
    until the blocks run out; count how many run at once."""
    rows, max_len, bs, new = 8, args.max_len, 16, 32
    rng = random.Random(0)
    lens = [rng.randint(16, 768) for _ in range(200)]  # mixed prompt lengths, mean ~390
    probe = Engine(model, max_batch=1, max_len=max_len, paged=True, block_size=bs, num_blocks=1)
    block_bytes = sum(g.block_bytes for g in probe.paged.cache.groups)
    budget_blocks = rows * -(-max_len // bs)  # the row pool's bytes, in blocks
    print(f"  [{name}] memory: budget = row pool {rows} x {max_len} = {budget_blocks * block_bytes / 1e6:.1f} MB "
          f"({block_bytes} B per {bs}-token block); prompts uniform 16-768 tokens + {new} new")
    fit, used = 0, 0  # analytic: sequences whose final length fits, in arrival order
    for n in lens:
        b = -(-(n + new) // bs)
        if used + b > budget_blocks:
            break
        used, fit = used + b, fit + 1
    print(f"    row pool: {rows} sequences at once; paged (computed): {fit} ({fit / rows:.1f}x), "
          f"{used * block_bytes / 1e6:.1f} MB held")
    if name != "bundled":
        return
    engine = Engine(model, max_batch=256, max_len=max_len, paged=True, block_size=bs, num_blocks=budget_blocks,
                    max_num_batched_tokens=4096, enable_prefix_caching=False)
    for n in lens[: fit + 8]:
        engine.add_request(rand_prompt(rng, model.cfg.vocab_size, n), params(new))
    peak, peak_bytes = 0, 0
    while engine.has_work():
        engine.step()
        s = engine.cache_stats()
        if s["preemptions"] == 0:
            peak, peak_bytes = max(peak, s["running"]), max(peak_bytes, s["kv_bytes_held"])
    s = engine.cache_stats()
    print(f"    paged (run): {peak} sequences at once before any preemption ({peak / rows:.1f}x the row pool), "
          f"peak {peak_bytes / 1e6:.1f} MB held; {s['preemptions']} preemptions later; blocks in use at the end "
          f"{s['blocks_used']}")


# ---- prefix caching -----------------------------------------------------------------------------------


def bench_prefix(model, name: str, args) -> None:
    rng = random.Random(1)
    V, P = model.cfg.vocab_size, args.prefix_len
    cold, warm = [], []
    for _ in range(args.repeats):
        prefix = rand_prompt(rng, V, P)
        engine = Engine(model, max_batch=2, max_len=P + 64, paged=True, block_size=16, max_num_batched_tokens=2048)
        for times in (cold, warm):  # first request: nothing cached; second: same prefix, new suffix
            engine.add_request(prefix + rand_prompt(rng, V, 16), params(1))
            t = time.perf_counter()
            while engine.has_work():
                engine.step()
            times.append(time.perf_counter() - t)
        assert engine.cache_stats()["prefix_hit_tokens"] == P // 16 * 16
    ratio = [c / w for c, w in zip(cold, warm, strict=True)]
    print(f"  [{name}] prefix caching, {P}-token cached prefix + 16 new tokens: TTFT cold {med(cold)} s, "
          f"cached {med(warm)} s, speedup {med(ratio)}x")


# ---- chunked prefill ----------------------------------------------------------------------------------


def _itl_run(engine: Engine, prompts: list[list[int]], long_prompt: list[int] | None, n_steps: int = 0
             ) -> list[float]:
    """8 sequences decode; after 5 steps of decoding a long prompt joins (None: nothing joins). Returns
    the step times from the join until the long prompt's first token (or, with no join, n_steps)."""
    ids = [engine.add_request(p, params(2400)) for p in prompts]
    started: set[int] = set()
    while len(started) < len(ids):  # admission (possibly over several steps), until all 8 decode
        started |= {e.id for e in engine.step()}
    for _ in range(5):
        engine.step()
    lid = None if long_prompt is None else engine.add_request(long_prompt, params(1))
    times: list[float] = []
    done = False
    while not done:
        t = time.perf_counter()
        evs = engine.step()
        times.append(time.perf_counter() - t)
        done = any(e.id == lid for e in evs) if lid is not None else len(times) >= n_steps
    for i in ids:
        engine.abort(i)
    while engine.has_work():
        engine.step()
    return times


def bench_chunked(model, name: str, args) -> None:
    """The p99 step of the 8 decoding sequences while the long prompt joins, against their steady step:
    the median step of a paired control run (same engine settings, same 8 prompts, same steps from the
    same point, nothing joining), so the growing context of the 8 counts the same in both."""
    rng = random.Random(2)
    V, L = model.cfg.vocab_size, args.long_len
    chunks = [int(c) for c in str(args.chunk).split(",")]
    res = {"row pool": ([], [], [])} | {f"paged, token budget {c}/step": ([], [], []) for c in chunks}
    for _ in range(args.repeats):
        prompts, long_prompt = [rand_prompt(rng, V, 32) for _ in range(8)], rand_prompt(rng, V, L)
        for kind in res:
            def make(kind=kind):
                if kind.startswith("paged"):
                    return Engine(model, max_batch=9, max_len=L + 2600, paged=True, block_size=16,
                                  max_num_batched_tokens=int(kind.split()[-1].split("/")[0]))
                return Engine(model, max_batch=9, max_len=L + 2600)
            joined = _itl_run(make(), prompts, long_prompt)
            steady = _itl_run(make(), prompts, None, n_steps=len(joined))
            s = sorted(joined)
            res[kind][0].append(statistics.median(steady))
            res[kind][1].append(s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))])  # p99 over the join
            res[kind][2].append(len(joined))
    for kind, (steady, p99, steps) in res.items():
        ratio = [p / s for p, s in zip(p99, steady, strict=True)]
        print(f"  [{name}] {kind}: 8 decoding + a {L}-token prompt joining over {med(steps)} steps: steady step "
              f"{med(steady)} s, p99 step while it joins {med(p99)} s = {med(ratio)}x steady")


# ---- throughput ---------------------------------------------------------------------------------------


def bench_throughput(model, name: str, args) -> None:
    rng = random.Random(3)
    V = model.cfg.vocab_size
    for B in [int(b) for b in args.concurrency.split(",")]:
        res: dict[str, list[float]] = {"row pool": [], "paged": []}
        for _ in range(args.repeats):
            prompts = [rand_prompt(rng, V, 32) for _ in range(B)]
            for kind in res:
                kw = dict(paged=True, block_size=16, max_num_batched_tokens=max(512, 32 * B)) if kind == "paged" else {}
                engine = Engine(model, max_batch=B, max_len=32 + args.new_tokens + 1, **kw)
                engine.generate([prompts[0]], [params(2)])  # warm-up
                t = time.perf_counter()
                engine.generate(prompts, [params(args.new_tokens)] * B)
                res[kind].append(B * args.new_tokens / (time.perf_counter() - t))
        ratio = [p / r for p, r in zip(res["paged"], res["row pool"], strict=True)]
        print(f"  [{name}] throughput, {B} concurrent, 32-token prompts, {args.new_tokens} new: row pool "
              f"{med(res['row pool'])} tok/s, paged {med(res['paged'])} tok/s, paged/row {med(ratio)}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled,dense,moe")
    p.add_argument("--sections", default="memory,prefix,chunked,throughput")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-len", type=int, default=2048, help="memory: the row pool's row length")
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--long-len", type=int, default=2000)
    p.add_argument("--chunk", default="32,128", help="chunked: the paged engine's token budgets per step (list)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--cache-dir", default="~/.cache/seekwen/bench")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a loaded host)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        model = load(name, args.cache_dir)
        with torch.inference_mode():
            for section in args.sections.split(","):
                globals()[f"bench_{section}"](model, name, args)
        del model


if __name__ == "__main__":
    main()
