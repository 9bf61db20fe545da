"""One model's bench: load it (and transformers' copy with --vs-hf) into a `Bench`, then the sections,
always in this order: prefill, decode (batch 1), batch (batched decode), context (decode vs cache length)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .machine import median_time, mem_gb, sync
from .report import line
from .roofline import decode_bytes, decode_bytes_plain, matmul_params_per_token
from .runners import HF, Ours, interleaved, time_decode, time_prefill


@dataclass
class Bench:
    """A loaded model, its runners (transformers first with --vs-hf, then seekwen) and the numbers the
    sections compare against."""

    args: argparse.Namespace
    model: torch.nn.Module  # seekwen's, after prepare() unless --no-fast
    ours: Ours
    runners: list
    device: torch.device
    dtype_bytes: int
    bw: float  # read bandwidth, GB/s
    peak: float  # matmul peak, GFLOP/s
    step_bytes: int  # weight bytes one seekwen batch-1 decode step reads
    hf_bytes: int  # the same for the unquantized model in --dtype
    mem_ours: float  # GB taken by loading (and preparing) seekwen's model
    graphs: bool  # CUDA graphs for decode
    blocker: str | None  # why decode cannot be graphed, if it cannot
    generator: torch.Generator  # prompts: the same token ids for every runner and every run
    results: dict[str, float] = field(default_factory=dict)  # seekwen's tok/s per measurement (torchrun table)

    def prompt(self, B: int, S: int) -> torch.Tensor:
        """B random prompts of S tokens, on the bench device."""
        return torch.randint(0, self.model.cfg.vocab_size, (B, S), generator=self.generator).to(self.device)


def load(args: argparse.Namespace, folder: Path, machine: tuple[float, float]) -> Bench:
    """seekwen's model from `folder` (prepared for the fast path unless --no-fast), its runner, and with
    --vs-hf transformers' model of the same checkpoint."""
    import seekwen

    from ...fast import prepare
    from ...runtime.graphs import graph_blocker

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    mem0 = mem_gb(device)
    model = seekwen.load(folder, dtype=dtype, device=device, fast=False)
    if not args.no_fast:
        prepare(model, quantize=args.quantize, group_size=args.group_size)
    blocker = graph_blocker(model)
    graphs = device.type == "cuda" and not args.no_graphs and blocker is None
    ours = Ours(model, graphs=graphs, compile=graphs and args.compile)
    runners = [ours]
    mem_ours = mem_gb(device) - mem0
    if args.vs_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        runners = [HF(hf), ours]
    return Bench(
        args=args, model=model, ours=ours, runners=runners, device=device, dtype_bytes=size, bw=machine[0],
        peak=machine[1], step_bytes=decode_bytes(model), hf_bytes=decode_bytes_plain(model.cfg) * size // 4,
        mem_ours=mem_ours, graphs=graphs, blocker=blocker, generator=torch.Generator().manual_seed(0),
    )


def ints(s: str) -> list[int]:
    """'32,512' -> [32, 512]."""
    return [int(x) for x in s.split(",") if x.strip()]


def prefill(b: Bench) -> None:
    """Prefill tokens/s (and the fraction of the matmul peak), then time to first token of a short prompt."""
    args = b.args
    ids = b.prompt(1, args.prefill_len)
    res = interleaved(b.runners, lambda r: time_prefill(r, ids), args.repeats)
    tps = {k: args.prefill_len / v for k, v in res.items()}
    flops = 2 * matmul_params_per_token(b.model) * args.prefill_len
    pct = f"  [seekwen {flops / res['seekwen'] / 1e9 / b.peak:.0%} of matmul peak]"
    line(f"prefill {args.prefill_len} tokens", tps, "tok/s", pct)
    b.results[f"prefill {args.prefill_len}"] = tps["seekwen"]
    ids = b.prompt(1, 32)
    res = interleaved(b.runners, lambda r: time_prefill(r, ids), args.repeats)
    line("time to first token, 32-token prompt", {k: v * 1000 for k, v in res.items()}, "ms", higher_better=False)


def decode(b: Bench) -> None:
    """Batch-1 decode tokens/s after each --prompt-lens prompt, and how close that is to the roofline."""
    args = b.args
    for S in ints(args.prompt_lens):
        ids = b.prompt(1, S)
        res = interleaved(b.runners, lambda r, ids=ids: time_decode(r, ids, args.decode_tokens), args.repeats)
        tps = {k: 1 / v for k, v in res.items()}
        roof = f"  [roofline: seekwen {b.step_bytes / res['seekwen'] / 1e9 / b.bw:.0%}"
        if "transformers" in res:
            roof += f", transformers {b.hf_bytes / res['transformers'] / 1e9 / b.bw:.0%}"
        line(f"decode batch 1, {S}-token prompt", tps, "tok/s", roof + "]")
        b.results[f"decode b1 @{S}"] = tps["seekwen"]


def batch(b: Bench) -> None:
    """Batched decode tokens/s (all rows together) for each --batch-sizes, 32-token prompts."""
    args = b.args
    for B in ints(args.batch_sizes):
        ids = b.prompt(B, 32)
        res = interleaved(b.runners, lambda r, ids=ids: time_decode(r, ids, args.decode_tokens), args.repeats)
        line(f"decode batch {B}, 32-token prompts", {k: B / v for k, v in res.items()}, "tok/s")
        b.results[f"decode b{B}"] = B / res["seekwen"]


def context(b: Bench) -> None:
    """seekwen's batch-1 decode speed with the cache holding each --contexts length (prefilled once; the
    same step repeated at that length, rewound after each)."""
    args, ours, device = b.args, b.ours, b.device
    print("  decode batch 1 vs context (seekwen; the cache prefilled to the length once, each step at it):")
    for T in ints(args.contexts):
        if T + args.decode_tokens + 1 > b.model.cfg.max_position_embeddings:
            continue
        _, dec = ours.prefill(torch.zeros(1, T, dtype=torch.long, device=device), args.decode_tokens + 2)
        tok = torch.zeros(1, dtype=torch.long, device=device)

        def step(tok=tok, dec=dec, T=T):
            dec.rewind(T)  # the same slot each time: the step's cost at context T
            ours.step(tok, dec)
            sync(device)

        t = median_time(step, args.decode_tokens)
        print(f"    context {T:>5}: {1 / t:7.2f} tok/s")


PASSAGE = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
           "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")


def speculative(b: Bench) -> None:
    """Batch-1 greedy decode with and without speculative decoding, paired (order alternating), the output
    checked equal: n-gram prompt lookup on a "rewrite this passage" prompt, and DeepSeek-V3's MTP layer
    when the model has one; with each method's acceptance per draft position and tokens per forward.
    Random weights rarely copy their prompt or agree with an untrained MTP layer: expect ~1x there."""
    import statistics

    from ...runtime.speculative import SpecStats

    args, model = b.args, b.model
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ids = tok.encode(PASSAGE + "\n\n" + PASSAGE[:40])
    else:  # a random phrase, repeated: prompt lookup has something to find
        ids = (b.prompt(1, 12)[0].tolist() * 8)[:96]
    ids = torch.tensor([ids], device=b.device)
    n = args.decode_tokens * 4
    if ids.shape[1] + n + args.spec_k + 2 > model.cfg.max_position_embeddings:
        n = model.cfg.max_position_embeddings - ids.shape[1] - args.spec_k - 2
    methods = ["ngram"] + (["mtp"] if len(getattr(model, "mtp", [])) else [])

    def run(**spec) -> tuple[float, torch.Tensor]:
        stamps: list[float] = []
        out = model.generate(ids, max_new_tokens=n, eos_token_id=[], **spec,
                             on_token=lambda t: stamps.append(time.perf_counter()))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out

    for method in methods:
        plain, spec, stats = [], [], SpecStats()
        for r in range(max(args.repeats, 2)):
            for which in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                if which == "plain":
                    rate, ref = run()
                    plain.append(rate)
                else:
                    stats = SpecStats()
                    rate, out = run(speculative=method, num_speculative_tokens=args.spec_k, speculative_stats=stats)
                    spec.append(rate)
        same = "same tokens" if torch.equal(ref, out) else "OUTPUT DIFFERS"
        ratios = [x / y for x, y in zip(spec, plain, strict=True)]
        line(f"decode b1, speculative {method} k={args.spec_k}",
             {"plain": statistics.median(plain), method: statistics.median(spec)}, "tok/s",
             f"  [{statistics.median(ratios):.2f}x, pairs {min(ratios):.2f}-{max(ratios):.2f}; {same}]")
        print(f"    {stats.format()}")


SECTIONS = {"prefill": prefill, "decode": decode, "batch": batch, "context": context, "speculative": speculative}


def run_sections(b: Bench) -> None:
    """The sections named in --sections, in SECTIONS' order, without autograd."""
    chosen = b.args.sections.split(",")
    with torch.inference_mode():
        for name, section in SECTIONS.items():
            if name in chosen:
                section(b)
