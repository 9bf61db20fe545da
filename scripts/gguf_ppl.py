"""Perplexity of the bundled model stored as GGUF in each type, on its held-out text.

The bundled checkpoint is written as F32 / F16 / BF16 / Q8_0 / Q4_0 GGUF files the way llama.cpp's
converter writes them (tests/gguf_writer.py: norms, routers and biases F32; rows that do not split into
blocks of 32 fall back to F16), loaded with `seekwen.load` (computing in fp32) and scored on the held-out
chunks `seekwen train` never saw (seekwen/tools/bench/ppl.py), against the safetensors checkpoint.

    python scripts/gguf_ppl.py runs/kjv.txt [--chunks 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_writer import tokenizer_keys, write_gguf  # noqa: E402

import seekwen  # noqa: E402
from seekwen.tools.bench.ppl import held_out_text, perplexity  # noqa: E402
from seekwen.tools.common import bundled_model_path  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", help="the bundled model's training text (scripts/prep_kjv.py output)")
    p.add_argument("--chunks", type=int, default=16)
    args = p.parse_args()
    folder = bundled_model_path()
    base = seekwen.load(folder, dtype=torch.float32, fast=False)
    chunks = held_out_text(base, args.text, seq_len=min(256, base.cfg.max_position_embeddings), n=args.chunks)
    p0 = perplexity(base, chunks)
    print(f"held-out: {chunks.shape[0]} chunks of {chunks.shape[1] - 1} tokens from {args.text}")
    print(f"  {'checkpoint (safetensors, fp32)':<32} ppl {p0:.4f}")
    tok = tokenizer_keys(folder / "tokenizer.json", "gpt-2")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
            path = Path(tmp) / f"kjv-{kind}.gguf"
            types = write_gguf(folder, path, kind, tokenizer=tok)
            model = seekwen.load(path, dtype="float32", fast=False)
            p1 = perplexity(model, chunks)
            mb = path.stat().st_size / 1e6
            fallback = sum(t == "F16" for t in types.values()) if kind in ("Q8_0", "Q4_0") else 0
            note = f", {fallback} tensors F16 (rows not in blocks of 32)" if fallback else ""
            print(f"  GGUF {kind:<27} ppl {p1:.4f}  change {100 * (p1 / p0 - 1):+.3f}%  ({mb:.1f} MB{note})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
