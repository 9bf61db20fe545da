"""Paired decode-speed runs with and without speculative decoding, batch 1, greedy (BENCHMARKS.md).

    python scripts/bench_speculative.py ngram --runs 5      # bundled model, rewriting a given passage
    python scripts/bench_speculative.py draft --runs 3      # Qwen2.5-0.5B-shaped random target, 2-layer draft
    python scripts/bench_speculative.py mtp --runs 5 -k 1   # bundled model + its MTP layer, free continuation

Each run times plain generation and speculative generation back to back (order alternating), so
both see the same load on a shared host; decode tokens/s counts from the first new token to the last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import seekwen
from seekwen.runtime.speculative import SpecStats

PASSAGE = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
           "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
           "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
           "and God divided the light from the darkness.")


def timed(model, ids, n, **kw) -> tuple[float, torch.Tensor]:
    stamps = []
    out = model.generate(ids, max_new_tokens=n, eos_token_id=[], on_token=lambda t: stamps.append(time.perf_counter()),
                         **kw)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def paired(model, ids, n, runs, **spec):
    plain_r, spec_r, stats = [], [], SpecStats()
    for r in range(runs):
        order = ["plain", "spec"] if r % 2 == 0 else ["spec", "plain"]
        for which in order:
            if which == "plain":
                rate, ref = timed(model, ids, n)
                plain_r.append(rate)
            else:
                s = SpecStats()
                rate, out = timed(model, ids, n, speculative_stats=s, **spec)
                spec_r.append(rate)
                stats = s
    assert torch.equal(ref, out), "speculative output differs from plain greedy output"
    ratios = [s / p for s, p in zip(spec_r, plain_r, strict=True)]
    print(f"plain decode tok/s: {[round(x, 1) for x in plain_r]} median {statistics.median(plain_r):.1f}")
    print(f"spec  decode tok/s: {[round(x, 1) for x in spec_r]} median {statistics.median(spec_r):.1f}")
    print(f"speed-up per pair: {[round(x, 2) for x in ratios]} median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(stats.format())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["ngram", "draft", "mtp"])
    p.add_argument("--model", default=None, help="mtp/ngram: checkpoint (default: the bundled model)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("-n", type=int, default=128)
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "mtp":
        from seekwen.tools.common import bundled_model_path

        model = seekwen.load(args.model or bundled_model_path(), dtype=torch.float32, fast=True)
        # a free continuation (nothing to copy): what the MTP layer predicts is all the speed-up there is
        ids = torch.tensor([model.tokenizer.encode("And it came to pass, when the king heard these words,")])
        print(f"{args.model or 'bundled model'} with {len(model.mtp)} MTP layer(s), prompt {ids.shape[1]} tokens, "
              f"{args.n} new, k={args.k}")
        paired(model, ids, args.n, args.runs, speculative="mtp", num_speculative_tokens=args.k)
    elif args.task == "ngram":
        from seekwen.tools.common import bundled_model_path

        model = seekwen.load(args.model or bundled_model_path(), dtype=torch.float32, fast=True)
        # "rewrite the passage": the passage, then its first words again; the model copies it
        ids = torch.tensor([model.tokenizer.encode(PASSAGE + "\n\n" + PASSAGE[:40])])
        print(f"bundled model, prompt {ids.shape[1]} tokens, {args.n} new, k={args.k}")
        paired(model, ids, args.n, args.runs, speculative="ngram", num_speculative_tokens=args.k)
    else:
        import json
        import tempfile

        from seekwen.hf.families import parse_config
        from seekwen.tools.bench.checkpoints import BENCH_MODELS, build_checkpoint
        from seekwen.train.init import init_weights

        folder = build_checkpoint("dense", tempfile.gettempdir() + "/seekwen-bench")
        target = seekwen.load(folder, dtype=torch.float32, fast=True)
        raw = {**json.loads(json.dumps(BENCH_MODELS["dense"])), "num_hidden_layers": 2}
        draft = seekwen.build(parse_config(raw), torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            init_weights(draft, std=0.02)
        from seekwen.fast import prepare

        draft = prepare(draft.eval())
        ids = torch.randint(0, 151643, (1, 32), generator=torch.Generator().manual_seed(0))
        print(f"Qwen2.5-0.5B-shaped random target (24 layers), 2-layer random draft, prompt 32, {args.n} new, "
              f"k={args.k}")
        paired(target, ids, args.n, args.runs, speculative="draft", draft_model=draft, num_speculative_tokens=args.k)


if __name__ == "__main__":
    main()
